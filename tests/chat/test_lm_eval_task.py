"""lm-eval-harness scoring a local multiple-choice task (a YAML task in a temporary directory)
through `local-completions` against lmtiny.serve gives the same log-likelihood per option, the
same pick per item and the same acc and acc_norm as lmtiny's own scorer (lmtiny.tasks.hf6, what
`lmtiny.eval --norm none|char` runs) on the same items. lm-eval tokenizes with the exported
tokenizer and add_bos_token=True, so its rows start with <|bos|> as lmtiny documents do (its
remote tokenizer backend never asks for one). Skipped without the `serve` extra (lm_eval[api])."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from chat_fixtures import chat_config, make_tokenizer, serve_in_thread
from lmtiny.chat.batching import BatchEngine
from lmtiny.chat.replies import Service
from lmtiny.model.sampling import Sampler
from lmtiny.model.transformer import Transformer
from lmtiny.parallel import sharding
from lmtiny.tasks import hf6
from lmtiny.tasks.scoring import Scorer
from lmtiny.tokenizer.huggingface import write_tokenizer

EXTRA = "lm_eval[api] absent: pip install -e '.[serve]'"
pytest.importorskip("lm_eval", reason=EXTRA)
pytest.importorskip("tenacity", reason=EXTRA)
pytest.importorskip("transformers", reason=EXTRA)  # lm-eval's huggingface tokenizer backend
completions = pytest.importorskip("lm_eval.models.openai_completions")
evaluator = pytest.importorskip("lm_eval.evaluator")
TaskManager = pytest.importorskip("lm_eval.tasks").TaskManager

CONTEXT = 128
TASK = "lmtiny_local_mc"
# Contexts ending in a space, a newline or a tab (lm-eval moves that whitespace into the
# continuation), options sharing first words, of very different lengths, starting with punctuation
# or a digit: the cases where the harness's spans and a common-prefix rule part ways.
ITEMS = [
    ("Question: Which module reads JSON?\nAnswer:", ["json", "the csv module", "pickle"], 0),
    ("The capital of France is ", ["Paris.", "Paris, Texas.", "Rome"], 0),
    ("def add(a, b):\n", ["  return a + b", "  return a - b", "pass"], 0),
    ("Count to three:\t", ["1, 2, 3", "one two three", "3"], 1),
    ("A list in Python is", ["a mutable sequence.", "a mutable sequence of items.", "immutable."], 1),
    ("Question: What does len() return?\nAnswer:", ["(an int)", "the length", "the length of a string"], 1),
    ("x = [1, 2, 3]; print(x[0])  #", [" prints 1", "prints 1", "1"], 2),
    ("The sun rises in the", ["east", "west", "east and sets in the west"], 0),
]


def _random_model(cfg, scale: float = 6.0):
  """The config's model with its matrices scaled up from the usual init, so the options'
  log-likelihoods differ by more than rounding."""
  model = Transformer(cfg, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, jax.tree.map(lambda x: x * scale if x.ndim == 2 else x, state))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
  tok = make_tokenizer()
  cfg = chat_config(tok).model
  cfg.max_seq_len = CONTEXT
  model = _random_model(cfg)
  engine = BatchEngine(Sampler(model, chunk=4), max_batch=4, stop_ids=(tok.bos_id,))
  server = serve_in_thread(Service(engine, tok, max_tokens=16, model="tiny"))
  root = tmp_path_factory.mktemp("lm_eval_task")
  write_tokenizer(str(root / "hf"), tok, CONTEXT)  # what `lmtiny.export` writes for the tokenizer
  with open(root / "items.jsonl", "w") as f:
    for query, choices, gold in ITEMS:
      f.write(json.dumps({"query": query, "choices": choices, "gold": gold}) + "\n")
  (root / "tasks").mkdir()
  (root / "tasks" / f"{TASK}.yaml").write_text(
      f"task: {TASK}\ndataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {root / 'items.jsonl'}\n  cache_dir: {root / 'cache'}\n"
      "test_split: test\noutput_type: multiple_choice\n"
      "doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: gold\n"
      "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
  lm = completions.LocalCompletionsAPI(
      base_url=f"http://127.0.0.1:{server.server_address[1]}/v1/completions", model="tiny",
      tokenizer_backend="huggingface", tokenizer=str(root / "hf"), add_bos_token=True, max_length=CONTEXT)
  out = evaluator.simple_evaluate(model=lm, tasks=[TASK], num_fewshot=0, log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False))
  server.shutdown()
  server.server_close()
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices=jax.devices()[:1])
  return out, Scorer(model, mesh, rows_per_batch=8), tok


def _ours(scorer, tok, norm):
  """lmtiny's log-likelihoods per option, picks per item and accuracy under `norm`."""
  task = hf6.Task("multiple_choice", 0, 1 / 3, "", None)
  items = [hf6.Item((q,), tuple(c), g) for q, c, g in ITEMS]
  scores = hf6.score_items(scorer, tok, task, items, norm)
  return ([[-s.loss_sum for s in item_scores] for item_scores in scores],
          [hf6.item_pick(task, item, s, norm) for item, s in zip(items, scores)],
          hf6.evaluate_task(scorer, tok, task, items, norm)["accuracy"])


@pytest.mark.slow(seconds=7)
def test_lm_eval_picks_and_accuracies_equal_lmtiny_evals(harness):
  out, scorer, tok = harness
  samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
  assert [s["doc_id"] for s in samples] == list(range(len(ITEMS)))
  theirs = [[ll for ll, _ in s["filtered_resps"]] for s in samples]  # (log-likelihood, is greedy) per option
  golds = [gold for _, _, gold in ITEMS]
  picks = {}
  for norm, metric in (("none", "acc"), ("char", "acc_norm")):
    lls, picks[norm], accuracy = _ours(scorer, tok, norm)
    for mine, their in zip(lls, theirs):  # the same tokens scored: the same log-likelihoods
      np.testing.assert_allclose(mine, their, rtol=2e-5, atol=2e-5)
    # lm-eval's pick: argmax of the log-likelihoods, for acc_norm over len(option)
    divisors = [np.array([len(c) for c in choices], float) if norm == "char" else 1.0 for _, choices, _ in ITEMS]
    assert picks[norm] == [int(np.argmax(np.array(ll) / d)) for ll, d in zip(theirs, divisors)], norm
    assert [float(p == g) for p, g in zip(picks[norm], golds)] == [s[metric] for s in samples]
    assert accuracy == pytest.approx(out["results"][TASK][f"{metric},none"])
  assert picks["none"] != picks["char"]  # the two rules part ways on this model: acc and acc_norm both tested
