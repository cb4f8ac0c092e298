"""The import graph of lmtiny, checked: verbs on top, packages in layers, no cycles.

Every `import` of an lmtiny module counts, at the top of a file or inside a function. LAYERS is
the one written-down direction: a module may import its own package's modules (without a cycle)
and the packages of lower layers, never a higher layer, never a package beside it in the same
layer, and never a verb. Library code imports lmtiny modules at the top only; a verb may import
inside a function (start-up time) but the import still counts.
"""
import ast
import functools
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m lmtiny.<verb>`: parse flags, call the library, exit codes. Nothing imports a verb.
VERBS = ("lmtiny.train", "lmtiny.sft", "lmtiny.rl", "lmtiny.eval", "lmtiny.generate", "lmtiny.serve",
         "lmtiny.export", "lmtiny.import_hf", "lmtiny.lora", "lmtiny.arch", "lmtiny.bench", "lmtiny.lr_find",
         "lmtiny.sweep",
         "lmtiny.report", "lmtiny.data.prepare", "lmtiny.tokenizer.train", "lmtiny.tokenizer.evaluate")

# Top to bottom. Packages in one layer are independent of each other.
LAYERS = (
    ("lmtiny.cli",),                                      # the verbs' flag parsing and exit codes
    ("lmtiny.chat", "lmtiny.interop", "lmtiny.research"),  # chat stages and serving; Hugging Face in and out;
                                                          # sweeps and scaling laws
    ("lmtiny.training",),                                 # steps, the one run loop, optimizers, RL
    ("lmtiny.tasks",),                                    # evaluation tasks and their scoring
    ("lmtiny.runs",),                                     # run directories, checkpoints, metrics, report card
    ("lmtiny.data", "lmtiny.model", "lmtiny.plan"),       # tokenized shards; the network; arithmetic
    ("lmtiny.tokenizer", "lmtiny.parallel"),              # BPE and chat rendering; meshes and sharding rules
    ("lmtiny.corpus", "lmtiny.kernels", "lmtiny.fs", "lmtiny.config"),
    ("lmtiny.errors",),
)


def _modules() -> dict[str, str]:
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "lmtiny")):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(path: str):
  """(line, imported lmtiny module, inside a function) for every import in the file."""
  def walk(node, in_function):
    for child in ast.iter_child_nodes(node):
      yield child, in_function
      yield from walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

  for node, in_function in walk(ast.parse(open(path).read()), False):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f"{path}:{node.lineno}: relative import"
      targets = [f"{node.module}.{a.name}" for a in node.names]
    for t in targets:
      if t.startswith("lmtiny."):
        target = _resolve(t)
        if target and target != "lmtiny":
          yield node.lineno, target, in_function


def _package(module: str) -> str:
  return ".".join(module.split(".")[:2])


def _layer(module: str) -> int:
  if module in VERBS:
    return -1
  package = _package(module)
  for i, layer in enumerate(LAYERS):
    if package in layer:
      return i
  raise AssertionError(f"{module}: its package {package} is in no layer of LAYERS (or add it to VERBS)")


@functools.cache
def edges() -> list[tuple[str, int, str, bool]]:
  """(module, line, imported module, inside a function), read when a test needs them, not while
  pytest collects (every worker collects every module)."""
  return [(m, line, target, inner) for m, path in sorted(MODULES.items()) for line, target, inner in _imports(path)]


def test_every_module_has_a_layer():
  for m in MODULES:
    if m != "lmtiny":
      _layer(m)


def test_no_upward_or_sideways_import_and_no_verb_imported():
  bad = []
  for m, line, target, _ in edges():
    if target in VERBS:
      bad.append(f"{MODULES[m]}:{line}: {m} imports the verb {target}")
    elif m not in VERBS and _package(m) != _package(target) and _layer(target) <= _layer(m):
      bad.append(f"{MODULES[m]}:{line}: {m} (layer {_layer(m)}) imports {target} (layer {_layer(target)})")
  assert not bad, "\n".join(bad)


def test_library_imports_lmtiny_at_the_top_only():
  bad = [f"{MODULES[m]}:{line}: {target}" for m, line, target, inner in edges() if inner and m not in VERBS]
  assert not bad, "imports inside functions in library code:\n" + "\n".join(bad)


def test_no_import_cycle():
  graph = {m: set() for m in MODULES}
  for m, _, target, _ in edges():
    if target != m:
      graph[m].add(target)
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
      if t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)


def test_the_check_sees_an_upward_import(tmp_path):
  """The layer test itself: an import from a lower layer to a higher one is reported."""
  path = tmp_path / "m.py"
  path.write_text("import os\n\ndef f():\n  from lmtiny.training import loop\n")
  found = list(_imports(str(path)))
  assert found == [(4, "lmtiny.training.loop", True)]
  assert _layer("lmtiny.training.loop") < _layer("lmtiny.model.transformer")


def test_the_readme_maps_every_package():
  """The README's code map names every package of LAYERS, so the map cannot drift from the code."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  section = readme[readme.index("## Code map"):]
  section = section[:section.index("\n## ")] if "\n## " in section else section
  missing = [p for layer in LAYERS for p in layer
             if p.removeprefix("lmtiny.") + ("/" if os.path.isdir(os.path.join(ROOT, *p.split("."))) else ".py")
             not in section]
  assert not missing, f"README.md's code map does not name: {missing}"
