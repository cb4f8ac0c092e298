"""lm-eval-harness's `local-completions` model against lmtiny.serve (skipped without lm_eval[api]):
with the server's own tokenizer (vLLM's /tokenizer_info, /tokenize and /detokenize endpoints,
tokenizer_backend="remote"), its log-likelihoods and greedy flags equal the engine's scores of the
same tokens, and generate_until stops where asked."""

import numpy as np
import pytest

from chat_fixtures import make_tokenizer, random_sampler, serve_in_thread
from lmtiny.chat.batching import BatchEngine
from lmtiny.chat.replies import Service
from lmtiny.model.sampling import SamplingParams

pytest.importorskip("tenacity")  # lm_eval[api]
completions = pytest.importorskip("lm_eval.models.openai_completions")
Instance = pytest.importorskip("lm_eval.api.instance").Instance

CONTEXT = 64


@pytest.fixture(scope="module")
def served():
  tok = make_tokenizer()
  sampler = random_sampler(tok, CONTEXT)
  engine = BatchEngine(sampler, max_batch=4, stop_ids=(tok.bos_id,))
  server = serve_in_thread(Service(engine, tok, max_tokens=16, model="tiny"))
  lm = completions.LocalCompletionsAPI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1/completions",
                                       model="tiny", tokenizer_backend="remote", num_concurrent=2,
                                       max_length=CONTEXT)
  yield lm, tok, sampler, engine
  server.shutdown()
  server.server_close()


def _expected(engine, tok, context: str, continuation: str):
  """The engine's log-likelihood of the continuation's tokens after the context's, and whether
  each is the most likely token there."""
  ctx, cont = tok.encode(context), tok.encode(continuation)
  scored = engine.score(ctx + cont)
  where = slice(len(ctx) - 1, len(ctx) + len(cont) - 1)
  return float(scored.logprob[where].sum()), bool(np.all(scored.top_ids[where, 0] == cont))


def test_loglikelihoods_equal_the_engines_scores(served):
  lm, tok, sampler, engine = served
  context = "The json module"
  greedy = sampler.generate([tok.encode(context)], max_new_tokens=3, sampling=SamplingParams(0.0, 0, 1.0)).tokens[0]
  pairs = [(context, " parses text"), (context, " writes files"), (context, tok.decode(greedy))]
  requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
  got = lm.loglikelihood(requests)
  want = [_expected(engine, tok, *pair) for pair in pairs]
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
  assert [g[1] for g in got] == [w[1] for w in want]
  if tok.encode(tok.decode(greedy)) == greedy:  # the decoded greedy text tokenizes back to itself
    assert got[2][1]


def test_generate_until_stops_where_asked(served):
  lm, tok, sampler, _ = served
  prompt = "def main"  # sent as its token ids (no <|bos|>)
  want = tok.decode(sampler.generate([tok.encode(prompt)], max_new_tokens=8, sampling=SamplingParams(0.0, 0, 1.0),
                                     stop_ids=(tok.bos_id,)).tokens[0])
  stop = want.replace("\ufffd", "")[3:5]
  assert len(stop) == 2
  out = lm.generate_until([Instance(request_type="generate_until", doc={},
                                    arguments=(prompt, {"until": [stop], "max_gen_toks": 8}), idx=0)])
  assert out == [want[:want.index(stop)]]
