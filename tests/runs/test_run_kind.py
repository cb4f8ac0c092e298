"""What kind of run a directory holds: recorded once in run_kind.json, inferred for older runs,
and a run of another kind refused in one line naming the flag."""
import json
import os

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


@pytest.mark.parametrize("name", runkind.RUN_OUTPUTS)
def test_a_directory_with_a_users_run_file_but_no_run_is_refused(tmp_path, name):
  # Before: "no config.json, no run: any verb may use it"; train, sft and rl truncated a user's
  # metrics.jsonl and replaced their loss.png and report.md.
  (tmp_path / name).write_text("mine")
  with pytest.raises(RunKindError, match=rf"^--workdir={tmp_path}: holds {name} but no lmtiny run \(no config.json\); "
                                         r"a run would replace it: choose a new or empty --workdir$"):
    check_kind(str(tmp_path), "train")


def test_what_a_killed_attempt_or_a_speedrun_leaves_is_no_obstacle(tmp_path):
  for name in (".lock", ".run_marker.json", "notes.txt"):
    (tmp_path / name).write_text("")
  (tmp_path / "tokenizer").mkdir()  # launch/speedrun.sh puts RUN/tokenizer and RUN/shards there first
  (tmp_path / "shards").mkdir()
  check_kind(str(tmp_path), "train")


def test_sft_into_a_directory_holding_a_users_metrics_writes_nothing(chat_run, tmp_path, capsys):
  # The reproduction: mkdir D; echo mine > D/metrics.jsonl; python -m lmtiny.sft --init RUN --workdir D
  from lmtiny import sft
  (tmp_path / "metrics.jsonl").write_text("mine\n")
  assert sft.main(["sft", "--init", chat_run, "--workdir", str(tmp_path), "--config.sft.steps=2"]) == 2
  err = capsys.readouterr().err
  assert err == (f"error: --workdir={tmp_path}: holds metrics.jsonl but no lmtiny run (no config.json); a run "
                 "would replace it: choose a new or empty --workdir\n")
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"] and (tmp_path / "metrics.jsonl").read_text() == "mine\n"
