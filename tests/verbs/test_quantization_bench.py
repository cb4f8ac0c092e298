"""benchmarks/quantization.py scores a run as the trainer and `lmtiny.eval` do: same function, same
batches, so its full-precision bpb is the val bpb they print; random-weight configs only on request."""
import importlib.util
import json
import os
import re

import pytest

from chat_fixtures import make_tokenizer
from lm_fixtures import ROOT, one_device, tiny_config
from lmtiny.corpus.sources import open_source
from lmtiny.data import shard_writer
from lmtiny.data.dataset import load_data
from lmtiny.tasks.model_loading import load_model
from lmtiny.training.bpb import evaluate_bpb
from lmtiny.training.trainer import Trainer

MAX_CHARS = 120_000


def _bench():
  spec = importlib.util.spec_from_file_location("quantization_bench", os.path.join(ROOT, "benchmarks", "quantization.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 2-step run on real shards whose last val record is at the checkpointed step."""
  root = tmp_path_factory.mktemp("quant_bench")
  tok = make_tokenizer()
  shards = str(root / "shards")
  shard_writer.prepare_dataset(open_source(f"embedded?max_chars={MAX_CHARS}"), tok, shards, val_fraction=0.2,
                          workers=1, docs_per_shard=20)
  cfg = tiny_config(steps=2, eval_every=2, checkpoint_every=2, eval_batches=3, sample_tokens=1)
  cfg.model.vocab_size = tok.vocab_size
  cfg.data.update(shards=shards)
  workdir = str(root / "run")
  data = load_data(cfg.data, vocab_size=cfg.model.vocab_size, seq_len=cfg.train.seq_len)
  Trainer(one_device(cfg), workdir, data, log=lambda _: None).run()
  return workdir


def _trainer_val_bpb(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  val = [r for r in records if r["split"] == "val"]
  assert val[-1]["step"] == 2
  return val[-1]["bpb"]


@pytest.mark.slow  # ~40 s on 2 cores: a 2-step training run (compiles), then 2 x 2 evaluations and decodes
def test_full_precision_bpb_is_the_trainers_and_evals(trained_run, capsys):
  bench = _bench()
  argv = ["--run", trained_run, "--modes", "none", "int8", "--batch-sizes", "1", "--new-tokens", "2",
          "--repeats", "1"]
  assert bench.main(argv) == 0
  out = capsys.readouterr().out
  printed = dict(re.findall(r"(none|int8): params .* val bpb (\d+\.\d+)", out))
  assert printed["none"] == f"{_trainer_val_bpb(trained_run):.4f}"
  full = evaluate_bpb(load_model(trained_run))["bpb"]  # `python -m lmtiny.eval --tasks bpb`'s figure
  int8 = evaluate_bpb(load_model(trained_run, quantize="int8"))["bpb"]  # `... --quantize int8`'s
  assert printed == {"none": f"{full:.4f}", "int8": f"{int8:.4f}"}
  assert "random init" not in out  # no --configs: no random-weight config


def test_random_weight_configs_only_when_asked(capsys):
  bench = _bench()
  assert bench.main([]) == 2
  assert capsys.readouterr().err == ("error: nothing to measure: give --run RUN (a trained run) and/or "
                                     "--configs NAME ...\n")
  assert bench.main(["--configs", "nope"]) == 2
  assert capsys.readouterr().err == "error: --configs: no configs/nope.py\n"
  assert bench.parse_args(["--run", "x"]).configs == []
