"""lmtiny.cli: one-line errors where a config file is the messenger (an error a config file's
get_config() raises, as lmtiny.sft reading a base run's config.json, reaches the user as its own
one line, not as config_flags' flattened traceback), and the entry points' process exit."""
import ast
import gc
import glob
import os
import subprocess
import sys

import pytest

from lm_fixtures import ROOT
from lmtiny import cli, train
from lmtiny.errors import ConfigError


def _define(fv):
  return {}


def test_an_error_from_get_config_is_its_own_one_line(tmp_path, capsys):
  config = tmp_path / "raises.py"
  config.write_text("from lmtiny.config import ConfigError\n\n"
                    "def get_config():\n  raise ConfigError('--init=data/x: not a run directory')\n")
  with pytest.raises(ConfigError) as e:
    cli.parse_config_flags(["prog", f"--config={config}"], _define, "usage")
  assert str(e.value) == "--init=data/x: not a run directory"
  assert train.main(["train", f"--config={config}"]) == 2
  assert capsys.readouterr().err == "error: --init=data/x: not a run directory\n"


def test_other_flag_errors_stay_one_line(tmp_path):
  config = tmp_path / "bad.py"
  config.write_text("def get_config():\n  raise ValueError('not a config')\n")
  with pytest.raises(ConfigError) as e:
    cli.parse_config_flags(["prog", f"--config={config}"], _define, "usage")
  assert "\n" not in str(e.value) and "not a config" in str(e.value)


def test_a_command_process_exits_with_its_mains_status_and_its_heap_frozen():
  probe = ("import gc\nfrom lmtiny import cli\n"
           "def main():\n  print(gc.get_threshold(), gc.get_freeze_count() > 0)\n  return 3\n"
           "cli.exit_with(main)\n")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
  assert (out.returncode, out.stdout) == (3, "(10000, 10, 10) True\n"), out.stderr
  assert gc.get_freeze_count() == 0  # a test calling main() in-process keeps its collector


def test_every_command_module_exits_through_cli_exit_with():
  """Each `python -m lmtiny.X`, and benchmarks/quantization.py (the journeys' costliest benchmark),
  ends with `cli.exit_with(main)`, so none pays the collector's full walks of the heap (the
  HumanEval sandbox's child is not a command)."""
  paths = [p for p in glob.glob(os.path.join(ROOT, "lmtiny", "**", "*.py"), recursive=True)
           if not p.endswith("sandbox_child.py")] + [os.path.join(ROOT, "benchmarks", "quantization.py")]
  ends = {}
  for path in paths:
    tree = ast.parse(open(path, encoding="utf-8").read())
    for node in tree.body:
      if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
        ends[os.path.relpath(path, ROOT)] = ast.unparse(node.body[-1])
  assert len(ends) >= 18 and "lmtiny/train.py" in ends
  assert {path: end for path, end in ends.items() if end != "cli.exit_with(main)"} == {}
