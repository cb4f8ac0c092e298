"""GSM8K: conversion, answer extraction, and the tool loop (calculator output forced into the
sequence, marked as not sampled), driven by a scripted sampler."""
import json
from types import SimpleNamespace

import pytest

from lmtiny import eval as eval_cli
from lmtiny.model.sampling import Generation, SamplingParams
from lmtiny.tasks import gsm8k, model_loading
from lmtiny.tasks.rows import EvalDataError
from lmtiny.tasks.toy import toy_rows


def test_answer_extraction_and_reward():
  assert gsm8k.extract_answer("so 3 + 4 = 7\n#### 1,234.") == "1234"
  assert gsm8k.extract_answer("#### -5") == "-5" and gsm8k.extract_answer("no answer") is None
  assert gsm8k.reward("x #### 72", "y\n#### 72") == 1.0 and gsm8k.reward("#### 7", "#### 72") == 0.0


def test_problems_are_checked_for_a_question_and_a_numbered_answer():
  gsm8k.check_problems(toy_rows(200), "toy")  # the project's own set passes
  rows = [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "one"}, "not a row",
          {"question": "q", "answer": "none"}]
  with pytest.raises(EvalDataError, match=r"^f.jsonl: row 2 has no text field question, answer$"):
    gsm8k.check_problems(rows, "f.jsonl")
  with pytest.raises(EvalDataError, match=r"^f.jsonl: row 1: the answer has no '#### <number>' line, so no reply "
                                          r"could score \(2 of 3 rows lack one\)$"):
    gsm8k.check_problems(rows[:2] + rows[3:], "f.jsonl")


def test_annotations_become_tool_parts():
  msgs = gsm8k.to_conversation("Q?", "Half is 48/2 = <<48/2=24>>24 cups.\n#### 24")
  assert msgs[1]["content"] == [{"type": "text", "text": "Half is 48/2 = "}, {"type": "python", "text": "48/2"},
                                {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 cups.\n#### 24"}]


class ScriptedSampler:
  """Emits a scripted reply per call in chunks of 4 tokens, like Sampler.generate: stop tokens end
  a row and are left out; on_tokens returning True stops a row after the chunk it saw."""

  def __init__(self, script):
    self.cfg = SimpleNamespace(max_seq_len=256)
    self.script, self.calls = script, []

  def generate(self, prompts, *, max_new_tokens, sampling, seed, rows, stop_ids, on_tokens):
    self.calls.append([list(p) for p in prompts])
    out = Generation([[] for _ in prompts], ["length"] * len(prompts))
    for i, prompt in enumerate(prompts):
      reply = self.script(list(prompt))[:max_new_tokens]
      for at in range(0, len(reply), 4):
        chunk = reply[at:at + 4]
        if any(t in stop_ids for t in chunk):
          chunk = chunk[:min(chunk.index(t) for t in stop_ids if t in chunk)]
          out.tokens[i] += chunk
          out.finish_reasons[i] = "stop_token"
          break
        out.tokens[i] += chunk
        if on_tokens(i, chunk):
          out.finish_reasons[i] = "stopped"
          break
    return out


@pytest.fixture(scope="module")
def tok(chat_run):
  from lmtiny.tokenizer import Tokenizer
  return Tokenizer.load(chat_run + "/tokenizer.model")


def test_tool_loop_forces_calculator_output(tok):
  s = tok.special_id
  prompt = [tok.bos_id, s("user_start")] + tok.encode("Q") + [s("user_end"), s("assistant_start")]
  first = tok.encode("So ") + [s("python_start")] + tok.encode("3+4") + [s("python_end")] + tok.encode("junk")
  output = [s("output_start")] + tok.encode("7") + [s("output_end")]
  second = tok.encode("7.\n#### 7") + [s("assistant_end")] + tok.encode("after the end")
  bad = [s("python_start")] + tok.encode("__import__('os')") + [s("python_end")]

  def script(ids):
    body = ids[len(prompt):]
    if ids[:len(prompt)] != prompt:  # the second prompt: a malicious tool call, then the end
      return bad + [s("assistant_end")] if len(body) == 0 or body[-1] != s("python_end") else [s("assistant_end")]
    return first if not body else second

  prompt2 = [tok.bos_id] + tok.encode("other") + [s("assistant_start")]
  sampler = ScriptedSampler(script)
  g1, g2 = gsm8k.generate_with_tools(sampler, tok, [prompt, prompt2], max_new_tokens=100,
                                     sampling=SamplingParams(0.0, 0, 1.0))
  n1 = len(first) - len(tok.encode("junk"))
  assert g1.ids == first[:n1] + output + second[:len(second) - len(tok.encode("after the end"))]
  assert g1.sampled == [True] * n1 + [False] * len(output) + [True] * (len(g1.ids) - n1 - len(output))
  assert gsm8k.reward(g1.text, "#### 7") == 1.0 and g1.ids[-1] == s("assistant_end")
  # The refused expression gets no output block; the row goes on and ends.
  assert g2.ids == bad + [s("assistant_end")] and all(g2.sampled)
  assert len(sampler.calls) == 2 and sampler.calls[1][0] == prompt + first[:n1] + output


def test_eval_refuses_gsm8k_rows_without_an_answer_before_the_model_loads(chat_run, tmp_path, capsys, monkeypatch):
  # Before, a row without '####' scored 0 whatever the reply, and one without a question crashed
  # after the model had loaded.
  (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "four"}) + "\n")
  monkeypatch.setattr(model_loading, "load_model", lambda *a, **k: pytest.fail("the model loaded before the data"))
  assert eval_cli.main(["--workdir", chat_run, "--tasks", "gsm8k", "--data-dir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {tmp_path / 'gsm8k.jsonl'}: row 0: the answer has no '#### <number>' line, so no reply " \
                "could score (1 of 1 rows lack one)\n"
