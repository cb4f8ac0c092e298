"""The report card, rebuilt from the files a pipeline run leaves."""
import json
import os

import pytest

from lm_fixtures import tiny_config
from lmtiny.plan import counts
from lmtiny import report as report_cli
from lmtiny.runs import card as report
from readonly import ReadOnly


def _write_metrics(d, records):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def pipeline(tmp_path):
  root = str(tmp_path / "run")
  cfg = tiny_config(steps=10)
  _write_metrics(root, [
      {"step": 0, "split": "val", "loss": 4.8, "bpb": 3.0},
      {"step": 5, "split": "train", "loss": 4.0}, {"step": 10, "split": "train", "loss": 3.0},
      {"step": 10, "split": "val", "loss": 3.1, "bpb": 2.0},
      {"step": 5, "split": "core", "core": 0.0123, "core:hellaswag": 0.01}, {"step": 10, "split": "core", "core": 0.0456},
      {"step": 10, "split": "hf6", "hf6": 0.2, "hellaswag": 0.3},
      {"step": 10, "split": "sample", "prompt": "def ", "text": "foo():"},
      {"step": 6, "split": "run", "seconds": 1800.0, "chips": 8, "chip": "h100", "peak_flops": 8e15},
      {"step": 10, "split": "run", "seconds": 1800.0, "chips": 8, "chip": "h100", "peak_flops": 8e15}])
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(cfg.to_json())
  os.makedirs(os.path.join(root, "tokenizer"))
  with open(os.path.join(root, "tokenizer", "report.json"), "w") as f:
    json.dump({"vocab_size": 4096, "characters": 123456, "sources": [{"spec": "x"}]}, f)
  _write_metrics(os.path.join(root, "rl"), [
      {"step": 1, "split": "rl", "reward": 0.1, "pass@8": 0.4}, {"step": 2, "split": "rl", "reward": 0.5, "pass@8": 0.9},
      {"step": 2, "split": "rl_eval", "accuracy": 0.25, "items": 8},
      {"step": 2, "split": "run", "seconds": 60.0, "sampled_tokens": 999}])
  with open(os.path.join(root, "rl", "eval.json"), "w") as f:
    json.dump({"step": 2, "results": {"gsm8k": {"accuracy": 0.5, "items": 4}}}, f)
  return root, cfg


def test_sections_figures_and_cost(pipeline):
  root, cfg = pipeline
  path = report.write_report(root, price=2.0)
  text = open(path).read()
  assert text.index("## Tokenizer") < text.index("## Base model") < text.index("## RL") < text.index("## Evaluation")
  assert "- vocab_size: 4,096" in text and "- characters: 123,456" in text and "sources" not in text
  tokens = 10 * cfg.train.batch_tokens
  flops = tokens * counts.train_flops_per_token(cfg.model, cfg.train.seq_len)
  assert f"tokens: {tokens:,}" in text and f"training FLOPs: {flops:.3e}" in text
  assert "wall time: 1h00m on 8 x h100" in text
  assert f"MFU: {100 * flops / (3600 * 8e15):.2f}%" in text
  assert "estimated cost: $16.00 at $2.0/chip-hour" in text  # 1 h x 8 chips x $2
  assert "val bpb: 3.0000 -> 2.0000" in text and "def foo():" in text
  assert "- DCLM CORE during training: 0.0123 (step 5) -> 0.0456 (step 10)" in text
  assert "- HF6 mean during training: 0.2000 (step 10) -> 0.2000 (step 10)" in text
  assert "mean reward: 0.100 (first step) -> 0.500 (last)" in text and "pass@8: 0.400 -> 0.900" in text
  assert "![RL reward](rl/reward.png)" in text and os.path.exists(os.path.join(root, "rl", "reward.png"))
  assert "| gsm8k | accuracy (4 problems) | 0.5000 |" in text
  assert os.path.exists(os.path.join(root, "loss.png"))


def test_a_segment_ended_by_kill_9_counts_in_wall_time_and_mfu(pipeline):
  # Segment 0 was killed after 40 min (its last kept record); segment 5 ran 20 min and finished.
  root, cfg = pipeline
  _write_metrics(root, [
      {"step": 5, "split": "train", "loss": 4.0, "seconds": 2400.0, "segment": 0},
      {"step": 10, "split": "train", "loss": 3.0, "seconds": 1100.0, "segment": 5},
      {"step": 10, "split": "run", "seconds": 1200.0, "segment": 5, "chips": 8, "chip": "h100", "peak_flops": 8e15}])
  text = open(report.write_report(root)).read()
  flops = 10 * cfg.train.batch_tokens * counts.train_flops_per_token(cfg.model, cfg.train.seq_len)
  assert "wall time: 1h00m on 8 x h100" in text and f"MFU: {100 * flops / (3600 * 8e15):.2f}%" in text


def test_the_card_says_what_ended_a_run(pipeline):
  root, cfg = pipeline  # segment 0 preempted, segment 6 ended by train.time_budget
  _write_metrics(root, [
      {"step": 10, "split": "train", "loss": 3.0},
      {"step": 6, "split": "run", "seconds": 100.0, "segment": 0, "ended_by": "preempted", "train_seconds": 90.0},
      {"step": 10, "split": "run", "seconds": 300.0, "segment": 6, "ended_by": "time_budget", "train_seconds": 300.0}])
  text = open(report.write_report(root)).read()
  assert f"({cfg.train.batch_tokens:,} per step); ended by time_budget after 5m00s of training" in text


def test_a_stage_updates_the_card_of_its_pipeline_and_keeps_the_price(pipeline):
  root, _ = pipeline
  report.write_report(root, price=3.0)
  assert report.report_root(os.path.join(root, "rl")) == os.path.abspath(root)
  os.remove(os.path.join(root, "report.md"))
  assert report.update_for(os.path.join(root, "rl")) == os.path.join(os.path.abspath(root), "report.md")
  assert "at $3.0/chip-hour" in open(os.path.join(root, "report.md")).read()


def test_cli(pipeline, capsys):
  root, _ = pipeline
  assert report_cli.main(["--workdir", root]) == 0 and "report.md" in capsys.readouterr().out
  assert report_cli.main(["--workdir", root + "/nope"]) == 2
  assert report_cli.main(["--workdir", root, "--price-per-chip-hour", "-1"]) == 2
  assert capsys.readouterr().err.endswith("error: --price-per-chip-hour=-1: must be a number >= 0\n")


def test_an_object_store_stage_finds_its_pipeline(monkeypatch):
  # A pod's stages write to gs://: the card's root is found by path text (abspath mangled it).
  monkeypatch.setattr(report, "exists", lambda *parts: "/".join(parts) == "gs://b/run/run_kind.json")
  assert report.report_root("gs://b/run/sft") == "gs://b/run"
  assert report.report_root("gs://b/run/") == "gs://b/run"


def test_the_tokenizer_section_shows_whole_values(pipeline):
  root, _ = pipeline
  with open(os.path.join(root, "tokenizer", "report.json"), "w") as f:
    json.dump({"recipe": "tokenizer_data/embedded.py", "hash": "0123456789abcdef0123"}, f)
  text = open(report.write_report(root)).read()
  assert "- recipe: tokenizer_data/embedded.py" in text and "- hash: 0123456789abcdef\n" in text


def _write_json(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def _summary(text):
  """{(stage, figure): value} of the card's summary table, which must open the card."""
  assert text.index("## Summary") < text.index("## Base model")
  table = text.split("## Summary\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
  assert table[:2] == ["| stage | figure | value |", "|---|---|---|"]
  rows = [line.strip("|").split(" | ") for line in table[2:]]
  return {(stage.strip(), figure): value.strip() for stage, figure, value in rows}


@pytest.fixture
def full_pipeline(pipeline, tmp_path):
  """Every stage's files: shards, tokenizer, base (+ eval, int8, int4), mid, sft, rl (+ eval)."""
  root, cfg = pipeline
  shards = str(tmp_path / "shards")
  _write_json(os.path.join(shards, "manifest.json"), {"splits": {"train": {"tokens": 1000, "bytes": 4000},
                                                                 "val": {"tokens": 100, "bytes": 410}}})
  cfg.data.shards = shards
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(cfg.to_json())
  _write_json(os.path.join(root, "tokenizer", "report.json"), {"vocab_size": 4096, "train_seconds": 6.0})
  for stage, (first, last), seconds in (("mid", (2.5, 2.0), 120.0), ("sft", (2.2, 1.8), 30.0)):
    _write_metrics(os.path.join(root, stage), [
        {"step": 0, "split": "val", "loss": first}, {"step": 5, "split": "train", "loss": 2.0},
        {"step": 5, "split": "val", "loss": last}, {"step": 5, "split": "run", "seconds": seconds}])
    with open(os.path.join(root, stage, "config.json"), "w") as f:
      f.write(cfg.to_json())
  _write_json(os.path.join(root, "mid", "turn_ending.json"),
              {"max_new_tokens": 64, "before": {"ended": 0, "total": 10}, "after": {"ended": 9, "total": 10}})
  hellaswag = {"accuracy": 0.3, "centered": 0.0667, "items": 100}
  _write_json(os.path.join(root, "eval.json"), {"step": 10, "core": 0.0667, "results": {
      "bpb": {"bpb": 2.0, "seconds": 5.0}, "core:hellaswag": {**hellaswag, "seconds": 10.0}}})
  _write_json(os.path.join(root, "eval_int8.json"), {"step": 10, "core": 0.0567, "results": {
      "bpb": {"bpb": 2.0012, "seconds": 5.0}, "core:hellaswag": {**hellaswag, "centered": 0.0567}}})
  _write_json(os.path.join(root, "eval_int4.json"), {"step": 9, "results": {"bpb": {"bpb": 2.1}}})  # another step
  return root


def test_summary_table_of_every_stage(full_pipeline):
  summary = _summary(open(report.write_report(full_pipeline)).read())
  assert summary == {
      ("tokenizer", "bytes per token"): "4.009",             # 4410 bytes / 1100 tokens of the base run's shards
      ("base", "val bpb"): "2.0000 (step 10)",
      ("base", "DCLM CORE"): "0.0667 (lmtiny.eval, step 10)",
      ("base", "HF6 mean"): "0.2000 (during training, step 10)",  # eval.json has no hf6: training's
      ("mid", "held-out loss"): "2.5000 -> 2.0000",
      ("mid", "turn-ending rate"): "0/10 (0.0%) -> 9/10 (90.0%) (within 64 tokens)",
      ("sft", "held-out loss"): "2.2000 -> 1.8000",
      ("sft", "turn-ending rate"): "-",                        # sft ran without --report
      ("rl", "mean reward"): "0.100 -> 0.500",
      ("rl", "held-out accuracy"): "0.250 -> 0.250",
      ("eval", "GSM8K accuracy"): "0.5000 (rl, 4 problems)",
      ("eval", "int8 vs full precision"): "base: bpb +0.0012, DCLM CORE -0.0100",
      ("eval", "int4 vs full precision"): "-",                 # scored at another step than eval.json
      ("wall time", "tokenizer"): "6.0s",
      ("wall time", "base"): "1h00m",
      ("wall time", "mid"): "2m00s",
      ("wall time", "sft"): "30.0s",
      ("wall time", "rl"): "1m00s",
      ("wall time", "eval"): "20.0s",
      ("wall time", "total"): "1h03m"}                         # 6 + 3600 + 120 + 30 + 60 + 20 s


def test_summary_of_a_base_run_alone(tmp_path):
  root = str(tmp_path / "run")
  _write_metrics(root, [{"step": 0, "split": "val", "loss": 4.8, "bpb": 3.0},
                        {"step": 4, "split": "train", "loss": 4.0, "seconds": 12.5, "segment": 0},
                        {"step": 4, "split": "val", "loss": 3.9, "bpb": 2.4567},
                        {"step": 4, "split": "core", "core": 0.0123}])
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(tiny_config(steps=4).to_json())
  summary = _summary(open(report.write_report(root)).read())
  assert summary[("base", "val bpb")] == "2.4567 (step 4)"
  assert summary[("base", "DCLM CORE")] == "0.0123 (during training, step 4)"
  assert summary[("wall time", "base")] == "12.5s" and summary[("wall time", "total")] == "12.5s"
  measured = {("base", "val bpb"), ("base", "DCLM CORE"), ("wall time", "base"), ("wall time", "total")}
  assert len(summary) == 20 and all(v == "-" for k, v in summary.items() if k not in measured)


def test_report_onto_a_read_only_run_is_one_line_and_writes_nothing(tmp_path, capsys):
  ro = ReadOnly(tmp_path)
  try:
    run = ro.root
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "split": "val", "loss": 4.0, "bpb": 2.0}) + "\n")
    (run / "config.json").write_text(tiny_config().to_json())
    why = ro.freeze()
    assert report_cli.main(["--workdir", str(run)]) == 2
    assert capsys.readouterr().err == f"error: --workdir={run}: cannot write to {run} ({why})\n"
    assert sorted(os.listdir(run)) == ["config.json", "metrics.jsonl"]
  finally:
    ro.release()


def test_a_hand_written_report_md_is_never_replaced(pipeline, capsys):
  # Before: every stage and `report` rewrote RUN/report.md whatever it held.
  root, _ = pipeline
  mine = os.path.join(root, "report.md")
  with open(mine, "w") as f:
    f.write("# My notes on this run\n")
  assert report_cli.main(["--workdir", root]) == 2
  assert capsys.readouterr().err == (f"error: {mine}: not a report card lmtiny wrote (its first line is not "
                                     f"'{report.CARD_TITLE}...'); left as it is: move it to have the card rebuilt\n")
  assert report.update_for(os.path.join(root, "rl")) is None  # a stage ends with one warning, and succeeds
  assert capsys.readouterr().err.startswith(f"warning: {mine}: not a report card lmtiny wrote")
  assert open(mine).read() == "# My notes on this run\n"
  os.remove(mine)  # a card lmtiny wrote (first line CARD_TITLE, as every card so far) is rebuilt
  report.write_report(root)
  assert report.write_report(root) == mine


def test_a_directory_with_a_config_json_is_not_taken_for_a_pipeline(tmp_path, capsys):
  # Before: any parent with a config.json was the pipeline's root: `eval --workdir PROJECT/sft`
  # replaced PROJECT/report.md; `report --workdir` on a plain directory wrote a card into it.
  project = tmp_path / "project"
  (project / "sft").mkdir(parents=True)
  (project / "config.json").write_text('{"name": "my web app"}')
  (project / "report.md").write_text("mine")
  assert report.report_root(str(project / "sft")) == str(project / "sft")
  assert report_cli.main(["--workdir", str(project)]) == 2
  assert capsys.readouterr().err == (f"error: --workdir={project}: not an lmtiny run (no run_kind.json, no "
                                     "config.json with metrics or checkpoints): nothing to report\n")
  assert sorted(os.listdir(project)) == ["config.json", "report.md", "sft"]
  assert (project / "report.md").read_text() == "mine"


def test_a_hand_edited_eval_json_does_not_break_the_card(pipeline):
  # Before: KeyError 'items' (runs/card.py) when a result lacked a key lmtiny writes.
  root, _ = pipeline
  with open(os.path.join(root, "rl", "eval.json"), "w") as f:
    json.dump({"step": 2, "results": {"gsm8k": {"accuracy": 0.5}, "mine": "looked fine"}, "note": "x"}, f)
  text = open(report.write_report(root)).read()
  assert "| mine | (not an lmtiny result) | - |" in text and "| eval | GSM8K accuracy | 0.5000 (rl, ? problems) |" in text


def _leaderboard_row(text):
  """{column: cell} of the card's one-row leaderboard table, which must come before the summary."""
  assert text.index("## Leaderboard row") < text.index("## Summary")
  table = text.split("## Leaderboard row\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
  assert len(table) == 3 and table[1] == "|---|---|---|---|---|---|---|"
  header, cells = ([c.strip() for c in line.strip("|").split(" | ")] for line in (table[0], table[2]))
  return dict(zip(header, cells, strict=True))


_REFERENCE = "Reference (nanochat HEAD's speedrun, not this run): d24 on 8 x H100, 99 min, CORE 0.2565."


def test_leaderboard_row_of_a_whole_run(full_pipeline):
  root = full_pipeline
  chat = {"arc_easy": {"accuracy": 0.5, "items": 10}}
  _write_json(os.path.join(root, "sft", "eval.json"), {"step": 5, "chat": chat, "chatcore": 0.1234})
  _write_json(os.path.join(root, "rl", "eval.json"),  # rl's chat tasks did not all run: no ChatCORE of its own
              {"step": 2, "results": {"gsm8k": {"accuracy": 0.5, "items": 4}}, "chat": chat})
  text = open(report.write_report(root, price=2.0)).read()
  row, summary = _leaderboard_row(text), _summary(text)
  seconds = 6 + 3600 + 120 + 30 + 60 + 20  # tokenizer, base, mid, sft, rl, eval: the summary's total
  assert row == {"run": "run", "DCLM CORE": "0.0667 (lmtiny.eval, step 10)", "val bpb": "2.0000 (step 10)",
                 "ChatCORE": "0.1234 (sft)", "wall time (all stages)": "1h03m", "chips": "8 x h100",
                 "cost": f"${seconds / 3600 * 8 * 2.0:,.2f} at $2.0/chip-hour"}
  assert row["cost"] == "$17.05 at $2.0/chip-hour"
  assert row["wall time (all stages)"] == summary[("wall time", "total")]
  assert row["DCLM CORE"] == summary[("base", "DCLM CORE")] and row["val bpb"] == summary[("base", "val bpb")]
  assert text.split("## Leaderboard row\n\n", 1)[1].split("\n\n")[1] == _REFERENCE  # quoted, not in the row


def test_leaderboard_row_without_core_chatcore_or_price(tmp_path):
  root = str(tmp_path / "d4")
  _write_metrics(root, [{"step": 4, "split": "val", "loss": 3.9, "bpb": 2.4567},
                        {"step": 4, "split": "hf6", "hf6": 0.3141},
                        {"step": 4, "split": "run", "seconds": 90.0, "chips": 4, "chip": "v5e"}])
  with open(os.path.join(root, "config.json"), "w") as f:
    f.write(tiny_config(steps=4).to_json())
  _write_json(os.path.join(root, "eval.json"), {"step": 4, "hf6": 0.2718, "results": {}, "chat": {
      "arc_easy": {"accuracy": 0.5, "items": 10}}})  # one chat task of six: no ChatCORE
  text = open(report.write_report(root)).read()
  row = _leaderboard_row(text)
  assert row == {"run": "d4", "DCLM CORE": "-", "val bpb": "2.4567 (step 4)", "ChatCORE": "-",
                 "wall time (all stages)": "1m30s", "chips": "4 x v5e", "cost": "- (pass --price-per-chip-hour)"}
  assert _summary(text)[("base", "HF6 mean")] == "0.2718 (lmtiny.eval, step 4)"  # measured, shown as HF6 only
  assert "HF6" not in text.split("## Leaderboard row", 1)[1].split("## Summary", 1)[0]
  assert _leaderboard_row(open(report.write_report(root, price=1.5)).read())["cost"] == "$0.15 at $1.5/chip-hour"
