"""The report card, rebuilt from the files a pipeline run leaves."""
import json
import os

import pytest

from lm_fixtures import tiny_config
from lmtiny import arch, report


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
      {"step": 5, "split": "core", "core": 0.0123, "hellaswag": 0.01}, {"step": 10, "split": "core", "core": 0.0456},
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
  flops = tokens * arch.train_flops_per_token(cfg.model, cfg.train.seq_len)
  assert f"tokens: {tokens:,}" in text and f"training FLOPs: {flops:.3e}" in text
  assert "wall time: 1h00m on 8 x h100" in text
  assert f"MFU: {100 * flops / (3600 * 8e15):.2f}%" in text
  assert "estimated cost: $16.00 at $2.0/chip-hour" in text  # 1 h x 8 chips x $2
  assert "val bpb: 3.0000 -> 2.0000" in text and "def foo():" in text
  assert "- CORE during training: 0.0123 (step 5) -> 0.0456 (step 10)" in text
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
  flops = 10 * cfg.train.batch_tokens * arch.train_flops_per_token(cfg.model, cfg.train.seq_len)
  assert "wall time: 1h00m on 8 x h100" in text and f"MFU: {100 * flops / (3600 * 8e15):.2f}%" in text


def test_a_stage_updates_the_card_of_its_pipeline_and_keeps_the_price(pipeline):
  root, _ = pipeline
  report.write_report(root, price=3.0)
  assert report.report_root(os.path.join(root, "rl")) == os.path.abspath(root)
  os.remove(os.path.join(root, "report.md"))
  assert report.update_for(os.path.join(root, "rl")) == os.path.join(os.path.abspath(root), "report.md")
  assert "at $3.0/chip-hour" in open(os.path.join(root, "report.md")).read()


def test_cli(pipeline, capsys):
  root, _ = pipeline
  assert report.main(["--workdir", root]) == 0 and "report.md" in capsys.readouterr().out
  assert report.main(["--workdir", root + "/nope"]) == 2
  assert report.main(["--workdir", root, "--price-per-chip-hour", "-1"]) == 2
  assert capsys.readouterr().err.endswith("error: --price-per-chip-hour=-1: must be a number >= 0\n")


def test_an_object_store_stage_finds_its_pipeline(monkeypatch):
  # A pod's stages write to gs://: the card's root is found by path text (abspath mangled it).
  monkeypatch.setattr(report, "_exists", lambda *parts: "/".join(parts) == "gs://b/run/config.json")
  assert report.report_root("gs://b/run/sft") == "gs://b/run"
  assert report.report_root("gs://b/run/") == "gs://b/run"


def test_the_tokenizer_section_shows_whole_values(pipeline):
  root, _ = pipeline
  with open(os.path.join(root, "tokenizer", "report.json"), "w") as f:
    json.dump({"recipe": "tokenizer_data/embedded.py", "hash": "0123456789abcdef0123"}, f)
  text = open(report.write_report(root)).read()
  assert "- recipe: tokenizer_data/embedded.py" in text and "- hash: 0123456789abcdef\n" in text
