"""The calculator tool: arithmetic a model writes between <|python_start|> and <|python_end|>.

The expression is parsed with `ast` and walked by hand; nothing is ever passed to eval or exec.
Allowed: int and float literals, + - * / // % ** (binary), unary + and -, parentheses, and
commas in numbers ("1,000" as GSM8K writes them). Bounded: at most MAX_CHARS characters, an
exponent of at most MAX_EXPONENT, results of at most MAX_DIGITS digits. Anything else (names,
calls, attributes, strings, comparisons) is refused with None, as a tool that failed.
"""
from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200
MAX_EXPONENT = 100
MAX_DIGITS = 60

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(ValueError):
  """The expression is not plain bounded arithmetic."""


def _check_size(value):
  if isinstance(value, float):
    if not math.isfinite(value):
      raise CalculatorError("not a finite number")
    if abs(value) >= 10.0 ** MAX_DIGITS:
      raise CalculatorError("result too large")
  elif abs(value) >= 10 ** MAX_DIGITS:
    raise CalculatorError("result too large")
  return value


def _eval(node):
  if isinstance(node, ast.Expression):
    return _eval(node.body)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return _check_size(node.value)
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_eval(node.operand))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _eval(node.left), _eval(node.right)
    if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or
                                         (abs(left) > 1 and right * math.log10(abs(left)) >= MAX_DIGITS)):
      raise CalculatorError("power too large")
    try:
      value = _BINARY[type(node.op)](left, right)
    except (ZeroDivisionError, OverflowError) as e:
      raise CalculatorError(str(e)) from None
    if isinstance(value, complex):
      raise CalculatorError("complex result")
    return _check_size(value)
  raise CalculatorError(f"{type(node).__name__} is not allowed")


def format_number(value) -> str:
  """Integers (and integral floats) without a decimal point; other floats to 6 significant places."""
  if isinstance(value, float):
    if value.is_integer():
      return str(int(value))
    return f"{value:.6g}"
  return str(value)


def evaluate(expression: str) -> str | None:
  """The value of an arithmetic expression as text, or None if it is not allowed or fails."""
  text = expression.strip().replace(",", "")
  if not text or len(text) > MAX_CHARS:
    return None
  try:
    return format_number(_eval(ast.parse(text, mode="eval")))
  except (SyntaxError, CalculatorError, RecursionError, ValueError, TypeError, MemoryError):
    return None
