"""Tests for lmtiny.arch and lmtiny.plan.search: the seed's numbers, the model's count, the CLI."""
import glob
import importlib.util
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import pytest

from lmtiny import config as config_lib
from lmtiny.errors import ConfigError
from lmtiny import arch as arch_cli
from lmtiny.plan import counts, search as arch_search
from lm_fixtures import ROOT

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _model(**overrides):
  m = config_lib.base_config().model
  m.update(overrides)
  config_lib.validate_model(m)
  return m


def _seed(**overrides):
  """The seed's 38M-study family: relu^2 4x MLP, untied, no GQA, parameter-free RMSNorm."""
  return _model(**dict(dict(activation="relu2", mlp_ratio=4.0, tie_embeddings=False, norm_scale=False), **overrides))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _brute_force_count(m):
  """Independent count: list every parameter tensor's shape and multiply out."""
  d, v, h, dh = m.d_model, m.vocab_size, m.num_heads, m.head_dim or m.d_model // m.num_heads
  kv, f = m.num_kv_heads or h, m.mlp_dim or int(round(m.mlp_ratio * d))
  shapes = [(v, d)] + ([] if m.tie_embeddings else [(d, v)])
  for _ in range(m.num_layers):
    shapes += [(d, h * dh), (d, kv * dh), (d, kv * dh), (h * dh, d)]
    shapes += [(d, f)] * (2 if m.activation == "swiglu" else 1) + [(f, d)]
    if m.norm_scale:
      shapes += [(d,), (d,)] + ([(dh,), (dh,)] if m.qk_norm else [])
  if m.norm_scale:
    shapes.append((d,))
  total = 0
  for shape in shapes:
    n = 1
    for s in shape:
      n *= s
    total += n
  return total


# ---------------------------------------------------------------------------------------------
# The seed's and nanochat's figures.


def test_d4_512_vocab_24576_is_37_7m_split_exactly_in_thirds():
  p = counts.param_breakdown(_seed(num_layers=4, d_model=512, num_heads=8, vocab_size=24576))
  assert p["total"] == 37_748_736
  assert round(p["total"] / 1e6, 1) == 37.7
  assert p["embedding"] == p["lm_head"] == p["blocks"] == p["total"] // 3
  assert p["attention_per_layer"] == 4 * 512 * 512 and p["mlp_per_layer"] == 2 * 512 * 2048


@pytest.mark.parametrize("depth,width,heads,vocab,millions", [(7, 384, 6, 32768, 37.6), (29, 192, 3, 65536, 38.0)])
def test_seed_alternatives(depth, width, heads, vocab, millions):
  m = _seed(num_layers=depth, d_model=width, num_heads=heads, vocab_size=vocab)
  assert config_lib.head_dim(m) == 64
  assert round(counts.count_params(m) / 1e6, 1) == millions


@pytest.mark.parametrize("depth,expected", [(20, 560_988_160), (32, 1_879_048_192)])
def test_nanochat_sizes(depth, expected):
  m = _seed(num_layers=depth, d_model=64 * depth, num_heads=depth // 2, head_dim=128, vocab_size=65536)
  assert counts.count_params(m) == expected
  # nanochat's own config (QK-norm, which has no weights without norm scales) agrees.
  assert counts.count_params(config_lib.nanochat_config(depth).model) == expected


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_files_state_the_calculator_count(path):
  module = _load(path)
  assert counts.count_params(module.get_config().model) == module.NUM_PARAMS


# ---------------------------------------------------------------------------------------------
# Formula against an independent shape list; the knobs each change what they should.

_ARCHS = st.fixed_dictionaries(dict(
    num_layers=st.integers(1, 6),
    num_heads=st.sampled_from([1, 2, 4, 6, 8]),
    head_dim=st.sampled_from([8, 16, 32]),
    kv_div=st.sampled_from([1, 2, 4]),
    d_model=st.sampled_from([16, 48, 64, 96]),
    vocab_size=st.integers(5, 300),
    activation=st.sampled_from(config_lib.ACTIVATIONS),
    mlp_ratio=st.sampled_from([1.0, 2.5, 3.0, 4.0]),
    mlp_dim=st.sampled_from([0, 0, 40]),
    tie_embeddings=st.booleans(),
    norm_scale=st.booleans(),
    qk_norm=st.booleans(),
))


def _arch_model(a):
  a = dict(a)
  kv_div = a.pop("kv_div")
  num_kv = a["num_heads"] // kv_div if a["num_heads"] % kv_div == 0 else 0
  return _model(num_kv_heads=num_kv, **a)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(_ARCHS)
def test_count_matches_brute_force_shapes(a):
  m = _arch_model(a)
  p = counts.param_breakdown(m)
  assert p["total"] == _brute_force_count(m)
  assert p["total"] == p["embedding"] + p["lm_head"] + p["num_layers"] * p["layer"] + p["final_norm"]


def test_each_knob_changes_the_count_as_expected():
  base = _model(num_layers=2, d_model=64, num_heads=4, vocab_size=100, norm_scale=False, qk_norm=False)
  n = counts.count_params(base)
  assert counts.count_params(_model(**dict(base, tie_embeddings=True))) == n - 64 * 100
  assert counts.count_params(_model(**dict(base, norm_scale=True))) == n + 2 * (2 * 64) + 64
  assert counts.count_params(_model(**dict(base, norm_scale=True, qk_norm=True))) == n + 2 * (2 * 64 + 2 * 16) + 64
  assert counts.count_params(_model(**dict(base, qk_norm=True))) == n  # parameter-free norms
  assert counts.count_params(_model(**dict(base, num_kv_heads=1))) == n - 2 * 2 * (64 * 3 * 16)
  assert counts.count_params(_model(**dict(base, activation="swiglu"))) == n + 2 * 64 * 256
  assert counts.count_params(_model(**dict(base, head_dim=32))) == n + 2 * 4 * 64 * 4 * 16


# ---------------------------------------------------------------------------------------------
# FLOPs and time.


def test_matmul_params_counts_unembedding_once_and_no_lookup():
  untied = _seed(num_layers=4, d_model=512, num_heads=8, vocab_size=24576)
  assert counts.matmul_params(untied) == 2 * 12_582_912
  tied = _seed(num_layers=4, d_model=512, num_heads=8, vocab_size=24576, tie_embeddings=True)
  assert counts.matmul_params(tied) == counts.matmul_params(untied)
  scaled = _model(num_layers=4, d_model=512, num_heads=8, vocab_size=24576, norm_scale=True, qk_norm=True)
  assert counts.matmul_params(scaled) == counts.matmul_params(untied)  # norm scales do not multiply


def test_flops_per_token_formulas():
  m = _seed(num_layers=4, d_model=512, num_heads=8, vocab_size=24576)
  n, t = 25_165_824, 1024
  assert counts.train_flops_per_token(m, t) == 6 * n + 6 * 4 * t * 8 * 64
  assert counts.inference_flops_per_token(m, t) == 2 * n + 2 * 4 * t * 8 * 64
  # nanochat d20 at T=2048: nanochat's own estimate counts 12*L*T*H*Dh for attention, twice ours.
  d20 = config_lib.nanochat_config(20).model
  nanochat_estimate = 6 * (560_988_160 - 83_886_080) + 12 * 20 * 2048 * 1280
  attention_ours = 6 * 20 * 2048 * 1280
  assert counts.train_flops_per_token(d20, 2048) == nanochat_estimate - attention_ours


def test_training_time_and_budget():
  m = _seed(num_layers=4, d_model=512, num_heads=8, vocab_size=24576)
  tokens = counts.chinchilla_tokens(m, 20)
  assert tokens == 20 * 37_748_736
  seconds = counts.training_seconds(m, 1024, tokens, "v5e", 0.5, num_chips=4)
  assert seconds == pytest.approx(tokens * counts.train_flops_per_token(m, 1024) / (4 * 197e12 * 0.5))
  assert counts.PEAK_FLOPS["h100"] == 989e12 and counts.PEAK_FLOPS["v6e"] == 918e12
  with pytest.raises(ConfigError, match="--chip='tpu9'"):
    counts.training_seconds(m, 1024, tokens, "tpu9", 0.4)
  with pytest.raises(ConfigError, match="--tokens-per-param=0"):
    counts.chinchilla_tokens(m, 0)
  with pytest.raises(ConfigError, match="--mfu"):
    counts.training_seconds(m, 1024, tokens, "h100", 0.0)


# ---------------------------------------------------------------------------------------------
# Search.


def test_search_with_seed_constraints_ranks_d4_512_24576_first():
  template = _seed()
  found = arch_search.search(38e6, 64, [8192, 16384, 24576, 32768, 65536], range(2, 33), template=template)
  top = [(c.depth, c.width, c.vocab) for c in found[:5]]
  assert top[0] == (4, 512, 24576)
  assert (7, 384, 32768) in top and (29, 192, 65536) in top
  best = found[0]
  assert best.params == 37_748_736 and best.heads == 8 and best.imbalance < 1e-12
  assert all(abs(c.params - 38e6) <= 3.8e6 for c in found)
  assert [c.imbalance for c in found] == sorted(c.imbalance for c in found)


def test_search_tied_aims_at_halves_and_gqa_sets_kv_heads():
  found = arch_search.search(38e6, 64, [24576, 32768, 65536], range(2, 33), tied=True, kv_group=2,
                             template=_seed())
  for c in found:
    assert len(c.shares) == 2 and c.heads % 2 == 0 and c.kv_heads == c.heads // 2
    m = _seed(num_layers=c.depth, d_model=c.width, num_heads=c.heads, num_kv_heads=c.kv_heads,
              vocab_size=c.vocab, tie_embeddings=True)
    assert counts.count_params(m) == c.params
    assert c.imbalance == pytest.approx(abs(c.shares[0] - 0.5))


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_params=1e3), "no design within"),
    (dict(target_params=-5), "must be > 0"),
    (dict(head_dim=63), "--head-dim=63"),
    (dict(kv_group=0), "--gqa=0"),
    (dict(tolerance=1.5), "--tolerance"),
])
def test_search_rejects_impossible_requests(kwargs, message):
  args = dict(target_params=38e6, head_dim=64, vocabs=[24576], depths=range(2, 9))
  args.update(kwargs)
  with pytest.raises(ConfigError, match=message):
    arch_search.search(**args)


def test_parse_int_list():
  assert arch_search.parse_int_list("2..5", "--depth") == [2, 3, 4, 5]
  assert arch_search.parse_int_list("8192,24576", "--vocab") == [8192, 24576]
  for bad in ("5..2", "x", "0,4", ""):
    with pytest.raises(ConfigError):
      arch_search.parse_int_list(bad, "--depth")


# ---------------------------------------------------------------------------------------------
# CLI (in-process through main, plus one real subprocess).


def test_cli_report(capsys):
  path = os.path.join(ROOT, "configs", "d4_38m.py")
  assert arch_cli.main(["arch", "--config", path, "--chip", "v5e", "--mfu", "0.5", "--tokens-per-param", "10"]) == 0
  out = capsys.readouterr().out
  assert "37,748,736" in out and "(37.7M)" in out and out.count("33.33%") == 3
  assert "6*N_matmul + 6*L*T*H*Dh" in out and "= 1.636e+08" in out
  assert "10 tokens/param" in out and "377.5M tokens" in out and "1 x v5e" in out and "50% MFU" in out


def test_cli_brief_plan_times_each_mfu(capsys):
  path = os.path.join(ROOT, "configs", "d4_38m.py")
  assert arch_cli.main(["arch", "--config", path, "--brief", "--chip", "v5e", "--chips", "8", "--mfu", "0.4",
                        "--mfu", "0.55"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert len(out) == 4 and out[0].startswith("plan: 37,748,736 parameters (37.7M)") and "on 8 x v5e" in out[3]
  assert "at 40% MFU; " in out[3] and out[3].endswith("at 55% MFU")
  assert arch_cli.main(["arch", "--config", path, "--mfu", "0.4", "--mfu", "0.5"]) == 2
  assert "--mfu given 2 times" in capsys.readouterr().err


def test_cli_overrides_and_search(capsys):
  path = os.path.join(ROOT, "configs", "d4_38m.py")
  assert arch_cli.main(["arch", f"--config={path}", "--config.model.tie_embeddings=True"]) == 0
  assert "25,165,824" in capsys.readouterr().out
  assert arch_cli.main(["arch", "--search", "--target-params", "38e6", "--head-dim", "64", "--config", path,
                    "--top", "3"]) == 0
  rows = capsys.readouterr().out.splitlines()[2:]
  assert len(rows) == 3 and rows[0].split()[1:5] == ["4", "512", "8", "24576"]


@pytest.mark.parametrize("argv,message", [
    (["--config", "configs/d4_38m.py", "--chip", "tpu9"], "--chip='tpu9'"),
    (["--config", "configs/d4_38m.py", "--config.model.num_heads=7"], "config.model.num_heads=7"),
    (["--config", "configs/d4_38m.py", "--config.model.num_kv_heads=3"], "config.model.num_kv_heads=3"),
    (["--config", "configs/d4_38m.py", "--config.model.num_head=7"], "Did you mean"),
    (["--config", "configs/missing.py"], "cannot load config file"),
    (["--search", "--target-params", "1e3"], "no design within"),
    (["--search"], "--target-params is required"),
    (["--search", "--target-params", "38e6", "--top", "-1"], "--top=-1: must be >= 1"),
    (["--bogus"], "bogus"),
    ([], "give --config"),
])
def test_cli_bad_input_one_line_exit_2(argv, message, capsys, monkeypatch):
  monkeypatch.chdir(ROOT)
  assert arch_cli.main(["arch"] + argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert captured.err.startswith("error: ") and message in captured.err and captured.err.count("\n") == 1


def test_cli_subprocess_exit_status(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config(:\n")
  env = dict(os.environ, PYTHONPATH=ROOT)
  ok = subprocess.run([sys.executable, "-m", "lmtiny.arch", "--config", "configs/d29_38m.py"], cwd=ROOT,
                      env=env, capture_output=True, text=True)
  assert ok.returncode == 0 and "37,994,496" in ok.stdout
  err = subprocess.run([sys.executable, "-m", "lmtiny.arch", "--config", str(bad)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
  assert err.returncode == 2 and err.stderr.startswith("error: --config: SyntaxError")
  assert err.stderr.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# One source of truth: the calculator counts what the real model builds (abstract init).


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_calculator_equals_model_for_config_files(path):
  from lmtiny.model import transformer as model_lib
  m = _load(path).get_config().model
  assert counts.count_params(m) == model_lib.count_params(m)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(_ARCHS, st.booleans())
def test_calculator_equals_model_for_random_architectures(a, scan_layers):
  from lmtiny.model import transformer as model_lib
  m = _arch_model(a)
  m.scan_layers = scan_layers
  assert counts.count_params(m) == model_lib.count_params(m)
