"""The format report counts replies that end with <|assistant_end|> within the token budget."""
import json

import jax.numpy as jnp
from flax import nnx

from chat_fixtures import chat_config, make_tokenizer
from lmtiny.chat.turn_ending import assistant_end_report
from lmtiny.model.transformer import Transformer


def _constant_model(tok, end_logit: float):
  """Every position's hidden state is the same vector (equal embeddings, blocks that add zero),
  so the <|assistant_end|> logit is `end_logit` everywhere; the other logits stay small."""
  model = Transformer(chat_config(tok).model, nnx.Rngs(0))
  d = model.embed[...].shape[1]
  e = jnp.ones((d,))
  model.embed[...] = jnp.broadcast_to(e, model.embed[...].shape)
  for block in model.layers:
    block.attn.o[...] = jnp.zeros_like(block.attn.o[...])
    block.mlp.down[...] = jnp.zeros_like(block.mlp.down[...])
  model.lm_head[...] = model.lm_head[...].at[:, tok.special_id("assistant_end")].set(end_logit / d)
  return model


def test_counts_replies_that_end_their_turn():
  tok = make_tokenizer()
  questions = ["What does os.path.join() do?", "Hi", "Explain json.dumps."]
  for end_logit, want in ((30.0, 3), (-30.0, 0)):
    report = assistant_end_report(_constant_model(tok, end_logit), tok, questions, max_new_tokens=8)
    assert (report.ended, report.total) == (want, 3) and report.share == want / 3
    assert report.example[0] == questions[0] and (report.example[1] == "") == (want == 3)


def test_turn_ending_figures_are_saved_for_the_report_card(tmp_path):
  from lmtiny.chat.turn_ending import FormatReport, save_turn_ending
  path = save_turn_ending(str(tmp_path), FormatReport(1, 8, ("q", "r")), FormatReport(7, 8, ("q", "r")))
  assert json.load(open(path)) == {"max_new_tokens": 64, "before": {"ended": 1, "total": 8},
                                   "after": {"ended": 7, "total": 8}}
  assert path == str(tmp_path / "turn_ending.json")
