"""Command-line plumbing shared by the entry points: `--config FILE` with `--config.a.b=v`
overrides plus each tool's own flags, parsed into a private FlagValues, with every parsing
problem turned into a one-line ConfigError (the entry point prints it and exits with 2)."""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable, NoReturn

from absl import flags
from ml_collections import config_flags

from lmtiny.config import no_bytecode_beside_the_file
from lmtiny.errors import ConfigError, RunFailed, UserError


def run_main(run: Callable[[list[str]], int | None], argv: list[str] | None = None) -> int:
  """Calls `run(argv)`; a UserError becomes one `error: ...` line on stderr and exit status 2,
  a RunFailed (diverged, checkpoint save failed) one line and exit status 1."""
  try:
    return run(list(sys.argv if argv is None else argv)) or 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except RunFailed as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


def collect_garbage_for_jax() -> None:
  """Python's cyclic garbage collector set for a process that traces and compiles JAX programs.
  Measured on a 3-step tiny run (16 s on one core): collections took 0.93 s and the interpreter's
  last one at exit 0.57 s; with the heap the imports built frozen (it lives until exit anyway) and
  a first generation of 10,000 objects instead of 700 (tracing allocates in bursts, most of it
  freed by reference count), 0.35 s in all with exit_with's final freeze. A process's own entry
  point calls this (a command, tests/multiprocess_worker.py), never a library function."""
  gc.collect()
  gc.freeze()
  gc.set_threshold(10_000, 10, 10)


def exit_with(main: Callable[[], int | None]) -> NoReturn:
  """`sys.exit(main())` for a command that is its whole process (`python -m lmtiny.X`), with the
  collector set by collect_garbage_for_jax(). Tests that call main() keep their process's
  collector."""
  collect_garbage_for_jax()
  code = main()
  gc.freeze()  # nothing is left to collect that exiting will not free
  sys.exit(code)


def _one_line(error: BaseException) -> str:
  """The innermost message on one line (config_flags wraps a KeyError inside an AttributeError)."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
  return " ".join(text.split())


def _user_error_inside(error: BaseException) -> UserError | None:
  """The innermost UserError that `error` was raised while handling. A config file's get_config()
  that raises one reaches us as a flags.Error whose text is config_flags' flattened traceback
  (config_flags re-raises it with the traceback as its message, absl wraps that): the original
  already says what is wrong in one line."""
  found, seen = None, set()
  error = error.__cause__ or error.__context__
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _underscored(arg: str) -> str:
  """'--target-params=3' -> '--target_params=3' (the issue's spelling); config overrides untouched."""
  if not arg.startswith("--") or arg.startswith("--config."):
    return arg
  name, eq, value = arg.partition("=")
  return "--" + name[2:].replace("-", "_") + eq + value


def _loaded_config(holder, path: str | None):
  """The parsed config, or a ConfigError naming the file (config_flags defers load errors)."""
  try:
    value = holder.value
    if not hasattr(value, "get"):
      raise ConfigError(f"--config={path}: get_config() returned a {type(value).__name__}, not a ConfigDict")
    value.get("model")  # a failed load surfaces on first use
    return value
  except OSError as e:
    last = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise ConfigError(f"--config={path}: cannot load config file: {last}") from None


def _config_arg(argv: list[str]) -> str:
  """The config file named on the command line (for messages)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def flag_value(argv: list[str], name: str) -> str | None:
  """The value argv gives flag `--name` (`--name=V` or `--name V`; the last one), else None."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def config_overrides(argv: list[str]) -> list[str]:
  """The config fields argv overrides: ["rl.steps", "mesh.data"] for `--config.rl.steps=8
  --config.mesh.data 2` (config_flags' two spellings)."""
  return [arg[len("--config."):].split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")]


# A config file for config_flags that reads a run's config.json: `--config RUN_CONFIG:RUN_DIR`.
RUN_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "run_config.py")


def with_run_config(argv: list[str]) -> list[str]:
  """argv, with `--config RUN_CONFIG:INIT` inserted when it names no --config but an --init run:
  that run's config.json is then the config, and `--config.<section>.<field>=...` overrides it
  (lmtiny.sft, lmtiny.rl)."""
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    return argv
  init = flag_value(argv, "init")
  if init is None:
    return argv
  if not os.path.isdir(init) and "://" not in init:
    raise ConfigError(f"--init={init}: no such directory")
  return argv[:1] + [f"--config={RUN_CONFIG}:{init}"] + argv[1:]


def default_workdir(config_path: str) -> str:
  """runs/<config name>: where a run goes when --workdir is not given."""
  return os.path.join("runs", os.path.splitext(os.path.basename(config_path.split(":")[0]))[0])


def parse_config_flags(argv: list[str], define, usage: str):
  """parse_flags for tools that need a config: ConfigError when --config is missing."""
  parsed = parse_flags(argv, define, usage)
  if parsed is not None and parsed[1] is None:
    raise ConfigError("--config is required, e.g. --config configs/tiny.py")
  return parsed


def parse_flags(argv: list[str], define, usage: str):
  """Parses argv: `--config FILE` (with `--config.a.b=v` overrides) plus the flags `define` adds.

  Flags live in a private FlagValues, so importing a CLI module registers nothing globally and
  `main(argv)` can run in-process. `define(fv)` returns {name: flag holder}; `--some-name` is
  accepted for `--some_name`. Returns ({name: value, "config": the config file's path or None},
  config or None), or None after printing help. Raises ConfigError with one line for any bad
  flag, override or config file.
  """
  with no_bytecode_beside_the_file():  # config_flags imports the user's config file
    return _parse_flags(argv, define, usage)


def _parse_flags(argv: list[str], define, usage: str):
  argv = [argv[0]] + [_underscored(a) for a in argv[1:]]
  # config_flags loads the file as module "config_config" with the deprecated load_module(), which
  # reuses an existing sys.modules entry: a second in-process parse would keep the first file's
  # get_config() when the new file lacks one.
  sys.modules.pop("config_config", None)
  fv = flags.FlagValues()
  config = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/<size>.py); --config.x.y=... overrides.", flag_values=fv,
      sys_argv=argv)  # config_flags finds the overrides in argv, not in the FlagValues
  holders = define(fv)
  if any(a in ("-h", "--help", "-help") for a in argv[1:]):
    print(usage + "\n" + fv.get_help())
    return None
  try:
    rest = fv(argv)
  except flags.Error as e:
    inner = _user_error_inside(e)
    if inner is not None:  # e.g. lmtiny.sft's --init read as a config (lmtiny/runs/run_config.py)
      raise inner from None
    raise ConfigError(_one_line(e)) from None
  except (AttributeError, KeyError) as e:  # config_flags on an override naming no field
    if "'config_config'" in _one_line(e):  # config_flags' own name for the user's module
      raise ConfigError(f"--config={_config_arg(argv)}: the file defines no get_config() "
                        "returning the config") from None
    raise ConfigError(f"--config override: {_one_line(e)}") from None
  except Exception as e:  # parsing only loads the user's config file and applies overrides
    raise ConfigError(f"--config: {type(e).__name__}: {_one_line(e)}") from None
  if len(rest) > 1:
    raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
  path = fv["config"].config_filename if config.present else None
  cfg = _loaded_config(config, path) if path else None
  return dict({name: holder.value for name, holder in holders.items()}, config=path), cfg
