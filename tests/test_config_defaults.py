"""No library code restates a config default: `cfg.get("field", default)` and
`getattr(cfg, "field", default)` on a field of `lmtiny.config.base_config()` are refused.

A run's recorded config.json is laid over today's defaults in one place
(`lmtiny.runs.config_file.over_defaults`); everything else reads resolved fields, so a default
lives only in `base_config` and cannot drift (the drift this caught: a loop read `data.prefetch`
as 0 while the default was 2).

The scan is by AST over lmtiny/. A read with a default whose key happens to be a config field's
name but whose receiver is some other dict (a Hugging Face config, a source's options, a mesh's
shape) is listed in OTHER_DICTS with what it is.
"""
import ast
import os

from lm_fixtures import ROOT

from lmtiny import config as config_lib

FIELDS = {name for section in config_lib.base_config().values() for name in section}

# (file, receiver as written, field): reads of dicts that are not lmtiny configs.
OTHER_DICTS = {
    ("lmtiny/model/transformer.py", "k", "name"): "a pytree path entry (GetAttrKey.name)",
    ("lmtiny/interop/llama.py", "params", "rope_theta"): "the HF config's rope_parameters",
    ("lmtiny/interop/llama.py", "hf", "rope_theta"): "a Hugging Face config.json",
    ("lmtiny/chat/conversations.py", "options", "seed"): "a conversation source's `spec?seed=` option",
    ("lmtiny/tokenizer/mixture.py", "recipe", "seed"): "a tokenizer mixture recipe (JSON)",
    ("lmtiny/plan/memory.py", "shape", "data"): "a mesh's axis sizes (an axis of size 1 may be absent)",
    ("lmtiny/plan/memory.py", "shape", "fsdp"): "a mesh's axis sizes",
    ("lmtiny/plan/memory.py", "shape", "tensor"): "a mesh's axis sizes",
    ("lmtiny/training/benchmark.py", "r", "dtype"): "a benchmark result: what the step ran with, else the config's",
    ("lmtiny/training/benchmark.py", "r", "attention"): "a benchmark result: the backend that ran, else the config's",
    ("lmtiny/eval.py", "old", "steps"): "RUN/eval.json's earlier steps",
    ("lmtiny/parallel/sharding.py", "mesh.shape", "tensor"): "a jax Mesh's axis sizes",
    ("lmtiny/parallel/sharding.py", "mesh_shape_", "tensor"): "a mesh's axis sizes",
}


def default_reads(source: str) -> list[tuple[int, str, str]]:
  """(line, receiver, field) for each `x.get(field, default)` / `getattr(x, field, default)` in
  `source` whose key is the name of a config field."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    if isinstance(node.func, ast.Attribute) and node.func.attr == "get" and len(node.args) == 2:
      receiver, key = node.func.value, node.args[0]
    elif isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) == 3:
      receiver, key = node.args[0], node.args[1]
    else:
      continue
    if isinstance(key, ast.Constant) and key.value in FIELDS:
      found.append((node.lineno, ast.get_source_segment(source, receiver), key.value))
  return found


def restated_defaults(path: str, source: str) -> list[tuple[int, str, str]]:
  """default_reads less the OTHER_DICTS entries of `path`."""
  return [(line, receiver, field) for line, receiver, field in default_reads(source)
          if (path, receiver, field) not in OTHER_DICTS]


def _library():
  for dirpath, _, files in os.walk(os.path.join(ROOT, "lmtiny")):
    for f in sorted(files):
      if f.endswith(".py"):
        full = os.path.join(dirpath, f)
        yield os.path.relpath(full, ROOT).replace(os.sep, "/"), open(full).read()


def test_no_library_read_restates_a_config_default():
  found = [f"{path}:{line}: {receiver}.get({field!r}, ...)"
           for path, source in _library() for line, receiver, field in restated_defaults(path, source)]
  assert not found, "read the field (defaults live in lmtiny.config.base_config):\n" + "\n".join(found)


def test_the_scan_flags_a_drifted_default():
  # the drift this test exists for: the loop read prefetch as 0 while base_config says 2
  assert restated_defaults("lmtiny/training/loop.py", 'depth = cfg.data.get("prefetch", 0)\n') == [
      (1, "cfg.data", "prefetch")]
  assert restated_defaults("lmtiny/config.py", 'w = getattr(m, "window_pattern", "")\n') == [
      (1, "m", "window_pattern")]
  assert restated_defaults("lmtiny/x.py", 'v = row.get("answer", "")\nw = m.num_layers\n') == []


def test_every_listed_other_dict_read_still_exists():
  reads = {(path, receiver, field) for path, source in _library() for _, receiver, field in default_reads(source)}
  stale = [entry for entry in OTHER_DICTS if entry not in reads]
  assert not stale, f"OTHER_DICTS lists reads that are gone: {stale}"
