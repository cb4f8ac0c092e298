"""train.profile_steps: a jax.profiler trace of the steps after warm-up on 8 emulated devices, its
summary printed and written, and the windows that cannot be captured said in one line."""
import json
import os

import pytest

from lm_fixtures import memory_data, tiny_config
from lmtiny.runs import trace_summary
from lmtiny.training.profiling import StepProfiler
from lmtiny.training.trainer import Trainer


@pytest.mark.slow(seconds=6)
def test_profile_traces_the_steps_after_warm_up_and_summarizes_them(tmp_path):
  lines = []
  cfg = tiny_config(steps=3, eval_every=3, checkpoint_every=3, profile_steps=2)
  Trainer(cfg, str(tmp_path), memory_data(), log=lines.append).run()
  summary = json.load(open(tmp_path / "profile" / "summary.json"))
  assert (summary["first_step"], summary["last_step"], summary["devices"]) == (2, 3, 8)
  assert sum(summary["shares"].values()) == pytest.approx(1.0)
  # data parallel over 8 devices: the gradients' all-reduce and the model's dots are on the timeline
  assert summary["shares"]["collectives"] > 0 and summary["shares"]["matmul"] > 0
  assert summary["shares"]["elementwise"] > 0
  # the summary is the trace's: read back from the Perfetto file TensorBoard's xplane.pb sits beside
  trace = summary["trace"]
  assert trace.startswith(str(tmp_path / "profile" / "plugins" / "profile"))
  xplane = [f for f in os.listdir(os.path.dirname(trace)) if f.endswith(".xplane.pb")]
  hlo = trace_summary.hlo_ops(open(os.path.join(os.path.dirname(trace), xplane[0]), "rb").read())
  assert trace_summary.summarize(trace_summary.load_trace(trace), hlo=hlo)["shares"] == pytest.approx(summary["shares"])
  # lmtiny's CPU steps give YNNPACK their reductions (lmtiny.parallel.xla_options): by the HLO, not dots
  ynn = {op_name.rsplit("/", 1)[-1] for (module, name), (_, op_name) in hlo.items()
         if module == "jit_train_step" and name.startswith("ynn_fusion")}
  assert ynn and not ynn & {"dot_general", "conv_general_dilated"}, ynn
  by_name = trace_summary.summarize(trace_summary.load_trace(trace))["shares"]
  assert summary["shares"]["matmul"] < by_name["matmul"]
  text = "\n".join(lines)
  assert "profile: steps 2-3 on cpu: 8 devices" in text and "share of device time: matmul " in text
  assert f"summary {tmp_path / 'profile' / 'summary.md'}" in text
  assert "share of device time" in (tmp_path / "profile" / "summary.md").read_text()


def test_a_window_past_the_last_step_is_one_line_and_no_trace(tmp_path):
  lines = []
  cfg = tiny_config(profile_steps=2, profile_skip=5)
  profiler = StepProfiler(cfg.train, str(tmp_path), start=2, total_steps=6, log=lines.append)
  assert not profiler.enabled
  assert lines == ["profile: not captured: step 8 (after train.profile_skip=5 steps of this start, at step 2) "
                   "is past the last step 6"]
  with StepProfiler(cfg.train, "gs://bucket/run", start=0, total_steps=100, log=lines.append) as remote:
    assert not remote.enabled and "writes local files only" in lines[-1]
  assert not os.path.exists(tmp_path / "profile")
