"""The chat suite while fine-tuning (sft.chat_eval_*), in CORE-while-training's style: records of
split "chat" in metrics.jsonl on the cadence and at the end; bad settings and missing data refused
before anything is written."""
import os

import pytest

from chat_fixtures import conversations, make_base_run, make_tokenizer, write_jsonl
from lm_fixtures import ROOT
from lmtiny.chat import finetune as ft
from lmtiny.errors import UserError
from lmtiny.runs.config_file import read_run_config
from lmtiny.runs.metrics import read_metrics
from lmtiny.training.resolved import resolve_run

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "evals", "chat")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat_eval_sft")
  tok = make_tokenizer()
  return root, make_base_run(str(root), tok), write_jsonl(str(root / "c.jsonl"), conversations(60))


def _cfg(path, convs, **sft):
  cfg = read_run_config(path)
  cfg.sft.update(sources=convs, steps=3, warmup_steps=1, **sft)
  cfg.train.update(eval_every=3, checkpoint_every=3, eval_batches=1)
  return ft.sft_config(cfg, path, None)


@pytest.mark.slow(seconds=25)
def test_chat_records_on_the_cadence_and_at_the_end(base):
  root, path, convs = base
  cfg = _cfg(path, convs, chat_eval_every=2, chat_eval_tasks="arc_easy,mmlu,spelling", chat_eval_items=2,
             chat_eval_data_dir=FIXTURES, chat_eval_max_new_tokens=4)
  lines = []
  ft.finetune(cfg, str(root / "sft"), log=lines.append)
  chat = [r for r in read_metrics(str(root / "sft")) if r.get("split") == "chat"]
  assert [r["step"] for r in chat] == [2, 3]
  for r in chat:
    assert {"arc_easy", "mmlu", "spelling", "seconds"} <= set(r) and "chatcore" not in r  # not all six ran
    assert all(0.0 <= r[k] <= 1.0 for k in ("arc_easy", "mmlu", "spelling"))
  assert sum("| chat: arc_easy " in line for line in lines) == 2


@pytest.mark.parametrize("sft, message", [
    (dict(chat_eval_every=-1), "config.sft.chat_eval_every=-1: must be an integer >= 0"),
    (dict(chat_eval_every=2, chat_eval_items=-5), "config.sft.chat_eval_items=-5: must be an integer >= 0"),
    (dict(chat_eval_every=2, chat_eval_tasks="mmlu,piqa"), "config.sft.chat_eval_tasks='mmlu,piqa': unknown chat task piqa"),
    (dict(chat_eval_every=2, chat_eval_max_new_tokens=0), "config.sft.chat_eval_max_new_tokens=0: must be"),
])
def test_bad_settings_are_one_line_naming_the_field(base, sft, message):
  _, path, convs = base
  with pytest.raises(UserError) as e:
    resolve_run(_cfg(path, convs, **sft))
  assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_missing_data_fails_before_anything_is_written(base, tmp_path):
  root, path, convs = base
  cfg = _cfg(path, convs, chat_eval_every=2, chat_eval_tasks="spelling", chat_eval_data_dir=str(tmp_path))
  with pytest.raises(UserError, match=rf"^config.sft.chat_eval_data_dir={tmp_path}: no words_alpha.txt"):
    ft.finetune(cfg, str(root / "never"), log=lambda _: None)
  assert not os.path.exists(root / "never" / "metrics.jsonl")
