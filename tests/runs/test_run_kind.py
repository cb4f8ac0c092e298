"""What kind of run a directory holds: recorded once in run_kind.json, inferred for older runs,
and a run of another kind refused in one line naming the flag."""
import json

import pytest
from etils import epath

from lm_fixtures import memory_data, tiny_config
from lmtiny.runs import kind as runkind
from lmtiny.runs.kind import check_kind, infer_kind, read_kind, record_kind, RunKindError
from lmtiny.training.loop import write_run_files


@pytest.mark.parametrize("config, imported, kind", [
    ({"model": {}, "sft": {"init": "", "init_step": -1}}, False, "train"),
    ({"model": {}}, False, "train"),  # a run made before config.sft existed
    ({"sft": {"init": "/runs/base", "init_step": 40}}, False, "sft"),
    ({"sft": {"init": "/runs/base"}, "rl": {"steps": 100}}, False, "rl"),  # an RL run also names a base
    ({"sft": {"init": "/runs/base", "merged_from": "/runs/lora step 3"}}, False, "merged"),
    ({"sft": {"init": ""}}, True, "import"),
])
def test_runs_without_a_record_are_inferred_from_their_config(config, imported, kind):
  assert infer_kind(config, imported) == kind


def test_the_kind_is_recorded_once_and_wins_over_the_config(tmp_path):
  assert read_kind(str(tmp_path)) is None  # no config.json: no run yet
  (tmp_path / "config.json").write_text(json.dumps({"sft": {"init": "/base"}}))
  assert read_kind(str(tmp_path)) == ("sft", f"inferred from {tmp_path / 'config.json'}")
  record_kind(str(tmp_path), "rl")
  record_kind(str(tmp_path), "train")  # written when the directory is first written, never again
  assert json.loads((tmp_path / runkind.MARKER).read_text())["kind"] == "rl"
  assert read_kind(str(tmp_path)) == ("rl", f"recorded in {tmp_path / runkind.MARKER}")
  check_kind(str(tmp_path), "rl")


def test_another_kind_is_one_line_naming_the_flag(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model": {}}))
  with pytest.raises(RunKindError) as e:
    check_kind(str(tmp_path), "rl")
  assert str(e.value) == (f"--workdir={tmp_path}: holds a train run (lmtiny.train) (inferred from "
                          f"{tmp_path / 'config.json'}), not an rl run (lmtiny.rl); choose another --workdir")
  check_kind(str(tmp_path / "new"), "rl")  # a directory that does not exist yet holds no run


@pytest.mark.parametrize("marker, message", [("{not json", "unreadable"), ('{"kind": "pretrain"}', "kind 'pretrain'")])
def test_an_unreadable_record_is_one_line(tmp_path, marker, message):
  (tmp_path / runkind.MARKER).write_text(marker)
  with pytest.raises(RunKindError, match=f"^{tmp_path / runkind.MARKER}: {message}"):
    check_kind(str(tmp_path), "train")


def test_the_shared_run_files_record_the_kind(tmp_path):
  cfg, tokenizer = tiny_config(), memory_data().tokenizer
  for name in ("a", "b"):
    (tmp_path / name).mkdir()
  write_run_files(epath.Path(tmp_path / "a"), cfg, tokenizer)
  assert read_kind(str(tmp_path / "a"))[0] == "train"  # the config's kind when none is given
  write_run_files(epath.Path(tmp_path / "b"), cfg, tokenizer, "sft")
  assert json.loads((tmp_path / "b" / runkind.MARKER).read_text())["kind"] == "sft"
