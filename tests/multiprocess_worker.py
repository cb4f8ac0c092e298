"""One process of a multi-process test run (started by tests/parallel/test_multiprocess.py, never by pytest).

usage: python tests/multiprocess_worker.py OUT [WORKDIR[:STOP_AFTER][:OPTION=VALUE...] ...]

Joins the run the environment describes (LMTINY_COORDINATOR / LMTINY_NUM_PROCESSES /
LMTINY_PROCESS_ID, LMTINY_CPU_DEVICES), exactly as `python -m lmtiny.train` does, then trains
(or resumes) in each WORKDIR in turn and writes OUT.<process index> (JSON). Bad input exits with
status 2 and `error: ...`, as the entry point does.

A WORKDIR of `score` scores fixed rows with the evals' scorer instead (score()).

Options of one run (so several scenarios share one launch of the processes):
  sigterm=I@N   process I sends itself SIGTERM when it logs step N (a preemption notice reaching
                one host only)
  mesh=D,F,T    the mesh's data, fsdp and tensor sizes
"""
import ctypes
import json
import os
import signal
import sys
import traceback


def _die_with_parent():
  """SIGKILL when the test process dies, so no worker outlives a crashed or killed test."""
  ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  if str(os.getppid()) != os.environ.get("LMTINY_TEST_PARENT", str(os.getppid())):
    os._exit(3)  # the parent died before prctl took effect


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

from lmtiny.parallel import distributed  # noqa: E402  (imports jax, but runs nothing on it)
from lmtiny import cli  # noqa: E402
from lmtiny.errors import ConfigError  # noqa: E402


def multiprocess_config(steps: int = 6, mesh: str = ""):
  """tiny_config on a data x tensor mesh (or `mesh`, "data,fsdp,tensor"), one checkpoint half
  way, one evaluation at the end."""
  from lm_fixtures import tiny_config
  cfg = tiny_config(steps=steps, checkpoint_every=3, eval_every=1000, eval_batches=2, log_every=1)
  cfg.mesh.update(data=-1, fsdp=1, tensor=2)
  if mesh:
    cfg.mesh.update(**dict(zip(("data", "fsdp", "tensor"), map(int, mesh.split(",")))))
  return cfg


def parse_spec(spec: str):
  """WORKDIR[:STOP_AFTER][:OPTION=VALUE...] -> (workdir, stop_after or None, {option: value})."""
  workdir, *fields = spec.split(":")
  options = dict(f.split("=", 1) for f in fields if "=" in f)
  stops = [f for f in fields if f and "=" not in f]
  return workdir, int(stops[0]) if stops else None, options


def one_row_data(cfg):
  """Documents of exactly one row each, as many as the global batch has rows.

  Every step then trains on all documents at once, whatever the process count: each process
  packs its slice of documents into its rows, and the global batch holds the same rows in some
  order. So the losses of a 1-process and a 2-process run agree to fp32 rounding.
  """
  import numpy as np
  from lm_fixtures import VOCAB, memory_data
  t = cfg.train
  rows = t.batch_tokens // t.seq_len
  rng = np.random.default_rng(7)

  def docs(n):
    start, step = rng.integers(1, VOCAB, n), rng.integers(1, 7, n)
    return [(1 + (s + d * np.arange(t.seq_len)) % (VOCAB - 1)).astype(np.int32) for s, d in zip(start, step)]
  data = memory_data()  # the trainer's data interface, with these documents in place of its own
  data.train_docs, data.val_docs = docs(rows), docs(2 * rows)
  return data


def train(spec: str) -> dict:
  from lmtiny.training.trainer import Trainer
  workdir, stop_after, options = parse_spec(spec)
  cfg = multiprocess_config(mesh=options.get("mesh", ""))
  lines = []
  who, _, at = options.get("sigterm", "").partition("@")

  def log(line):
    lines.append(line)
    print(line, flush=True)
    if who and int(who) == distributed.process_index() and line.startswith(f"step {int(at):>6}/"):
      os.kill(os.getpid(), signal.SIGTERM)
  try:
    trainer = Trainer(cfg, workdir, one_row_data(cfg), log=log)
    summary = trainer.run(stop_after=stop_after)
  except Exception as e:  # recorded, so one failing scenario does not hide the others
    traceback.print_exc()
    return {"workdir": workdir, "error": f"{type(e).__name__}: {e}", "log": lines}
  return {"workdir": workdir, "error": None, "log": lines, "train_loss": summary["train_loss"],
          "val": summary["val"], "step": summary["step"]}


def score_rows():
  """Rows of the evals' scorer (lmtiny.tasks.scoring): lengths that need several padded shapes."""
  import numpy as np
  from lm_fixtures import VOCAB
  from lmtiny.tasks.scoring import Row
  rng = np.random.default_rng(3)
  return [Row(tuple(int(i) for i in rng.integers(1, VOCAB, n)), int(rng.integers(1, 5))) for n in rng.integers(6, 60, 11)]


def score(mesh: str = "") -> dict:
  """The scorer's losses for score_rows() with a freshly initialised tiny model on this mesh."""
  import jax
  from flax import nnx
  from lmtiny.parallel import sharding
  from lmtiny.tasks.scoring import Scorer
  from lmtiny.training.steps import build_steps
  cfg = multiprocess_config(mesh=mesh)
  m = sharding.make_mesh(cfg.mesh)
  steps = build_steps(cfg, m, 1)
  with jax.set_mesh(m):
    model = nnx.merge(steps.graphdef, steps.init()["params"])
  scores = Scorer(model, m, rows_per_batch=4).score(score_rows())
  return {"loss_sum": [s.loss_sum for s in scores], "tokens": [s.tokens for s in scores],
          "greedy_match": [s.greedy_match for s in scores]}


def main(argv):
  try:
    plan = distributed.initialize()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  import jax
  result = {"mode": plan.mode, "process_index": distributed.process_index(),
            "process_count": distributed.process_count(), "is_main": distributed.is_main_process(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "runs": [score() if spec == "score" else train(spec) for spec in argv[2:]]}
  out = f"{argv[1]}.{result['process_index']}"
  with open(out + ".tmp", "w") as f:
    json.dump(result, f)
  os.replace(out + ".tmp", out)
  return 0


if __name__ == "__main__":
  _die_with_parent()
  cli.collect_garbage_for_jax()  # as the entry point sets it
  sys.exit(main(sys.argv))
