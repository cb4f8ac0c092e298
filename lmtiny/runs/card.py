"""The report card: RUN/report.md, rebuilt from the files every stage leaves in the run.

Built by `python -m lmtiny.report` and by each stage as it ends (`update_for`).

Layout read (nanochat-style pipeline, as launch/speedrun.sh lays it out):
  RUN/tokenizer/report.json   tokenizer stage (vocab, characters, bytes per token if measured)
  RUN/metrics.jsonl           base pretraining; RUN/mid, RUN/sft: midtraining and SFT runs
  RUN/rl/metrics.jsonl        RL (reward, pass@k, held-out accuracy)
  */eval.json                 `lmtiny.eval` results of any of those runs (eval_int8/int4.json: quantized)
  RUN/{mid,sft}/turn_ending.json  `lmtiny.sft --report`: replies that end their turn, before/after
The card opens with the run as one row of nanochat's leaderboard (lmtiny.runs.leaderboard, from
the summary's figures), then a summary table, one row per figure, '-' where its stage did not run
(or did not measure it): tokenizer bytes per token (the base run's shards), base val bpb, DCLM CORE (the
22-task metric; split "core" / eval.json "core") and the HF6 mean (six tasks from Hugging Face
sources, not CORE; split "hf6" / eval.json "hf6"), mid/SFT
held-out loss and turn-ending rate, RL reward and held-out accuracy, GSM8K, int8/int4 against
full precision, and wall time per stage and in total.
Per training stage: parameters, steps, tokens, wall time, FLOPs (6N + attention convention of
lmtiny.plan.counts.train_flops_per_token), MFU = FLOPs / (wall time x chips x peak), estimated cost =
wall time x chips x price per chip-hour, first/last val loss and bpb, the loss plot and the last
sample. Wall time and chips come from the "run" records the trainer and RL write at the end of
each (possibly resumed) segment. Each stage calls `update_for(its workdir)` when it finishes,
which rewrites the whole card, so a stage run again replaces its own section.
"""
from __future__ import annotations

import json
import os
import sys

from etils import epath

from lmtiny.data import shards as shards_lib
from lmtiny.data.mixture import parse_weighted
from lmtiny.errors import UserError
from lmtiny.fs.atomic import atomic_write
from lmtiny.plan import counts
from lmtiny.plan.units import duration
from lmtiny.runs import kind as runkind
from lmtiny.runs import leaderboard
from lmtiny.runs.config_file import read_run_config, read_saved_config
from lmtiny.runs.figures import new_figure, save_figure
from lmtiny.runs.metrics import plot_loss_curve, read_metrics, wall_seconds

STAGES = (("base", ""), ("mid", "mid"), ("sft", "sft"), ("rl", "rl"))
CARD_TITLE = "# lmtiny report card: "  # the first line of every card: what marks a report.md as lmtiny's
SETTINGS = "report_settings.json"
TURN_ENDING_FILE = "turn_ending.json"  # written by lmtiny.chat.turn_ending
_TOKENIZER_FIGURES = ("vocab_size", "recipe", "documents", "characters", "byte_fallback_fraction", "train_seconds",
                      "hash")
_SUITES = (("core", "DCLM CORE"), ("hf6", "HF6 mean"))  # metrics split / eval.json key -> the card's label


class ReportError(UserError):
  """A report card that cannot be written without replacing what lmtiny did not write."""


def is_run(d: str) -> bool:
  """`d` holds an lmtiny run: its kind recorded (lmtiny.runs.kind), or, for runs from before the
  record, a config.json beside metrics or checkpoints (a config.json alone is anybody's)."""
  return exists(d, runkind.MARKER) or (exists(d, "config.json") and (exists(d, "metrics.jsonl") or exists(d, "checkpoints")))


def report_root(workdir: str) -> str:
  """The pipeline's run directory: the parent of a mid/sft/rl stage run when the parent is an
  lmtiny run itself, else the run itself."""
  path = workdir.rstrip("/") if "://" in workdir else os.path.abspath(workdir)
  parent, name = path.rsplit("/", 1)
  if name in {s for _, s in STAGES if s} and is_run(parent):
    return parent
  return path


def check_card(root: str) -> str:
  """RUN/report.md's path; ReportError when it exists and is not a card lmtiny wrote (every card
  opens with CARD_TITLE, older ones too)."""
  path = os.path.join(root, "report.md")
  if exists(path):
    with epath.Path(path).open("rb") as f:
      first = f.readline()
    if not first.startswith(CARD_TITLE.encode()):
      raise ReportError(f"{path}: not a report card lmtiny wrote (its first line is not '{CARD_TITLE}...'); "
                        "left as it is: move it to have the card rebuilt")
  return path


def exists(*parts: str) -> bool:
  return epath.Path(*parts).exists()


def _read_json(*parts: str):
  return json.loads(epath.Path(*parts).read_text())


def _records(d: str) -> list[dict]:
  return read_metrics(d)


def _chips(records: list[dict]) -> tuple[int, str]:
  """The most chips a "run" record names, and their kind (the last such record's): (1, '?') if none."""
  runs = [r for r in records if r["split"] == "run"]
  top = max(reversed(runs), key=lambda r: r.get("chips", 1), default={})
  return top.get("chips", 1), top.get("chip", "?")


def _cost_lines(records: list[dict], flops: float | None, price: float | None) -> list[str]:
  seconds, runs = wall_seconds(records), [r for r in records if r["split"] == "run"]
  chips, chip = _chips(records)
  lines = [f"- wall time: {duration(seconds)} on {chips} x {chip}"]
  if flops:
    lines.append(f"- training FLOPs: {flops:.3e} (6N + 6LTHDh per token, causal half)")
    peak = runs[-1].get("peak_flops") if runs else None
    if peak and seconds:
      lines.append(f"- MFU: {100 * flops / (seconds * peak):.2f}% of {peak:.3g} FLOP/s dense bf16 peak")
  if price is not None:
    lines.append(f"- estimated cost: {leaderboard.cost(seconds, chips, price)}")
  return lines


def _last_sample(records) -> list[str]:
  samples = [r for r in records if r["split"] == "sample"]
  if not samples:
    return []
  s = samples[-1]
  return ["", f"Sample at step {s['step']}:", "", "```", (s.get("prompt", "") + s.get("text", ""))[:600], "```"]


def _ended_by(records) -> str:
  """What ended the run (its last "run" record's ended_by: steps, tokens_per_param, time_budget...),
  with its training seconds under train.time_budget; "" for runs recorded before the field."""
  runs = [r for r in records if r["split"] == "run" and "ended_by" in r]
  if not runs:
    return ""
  last = runs[-1]
  timed = f" after {duration(last['train_seconds'])} of training" if "train_seconds" in last else ""
  return f"; ended by {last['ended_by']}{timed}"


def train_section(title: str, d: str, rel: str, price) -> list[str]:
  records = _records(d)
  cfg = read_run_config(d)
  train = [r for r in records if r["split"] == "train"]
  val = [r for r in records if r["split"] == "val"]
  steps = max((r["step"] for r in records), default=0)
  tokens = steps * cfg.train.batch_tokens
  flops = tokens * counts.train_flops_per_token(cfg.model, cfg.train.seq_len)
  lines = [f"## {title}", "", f"- model: {counts.count_params(cfg.model) / 1e6:.2f}M parameters, "
           f"{cfg.model.num_layers} layers x {cfg.model.d_model}, context {cfg.model.max_seq_len}",
           f"- steps: {steps}, tokens: {tokens:,} ({cfg.train.batch_tokens:,} per step){_ended_by(records)}"]
  if train:
    lines.append(f"- train loss: {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f}")
  if val:
    lines.append(f"- val loss: {val[0]['loss']:.4f} -> {val[-1]['loss']:.4f} | val bpb: "
                 f"{val[0].get('bpb', float('nan')):.4f} -> {val[-1].get('bpb', float('nan')):.4f}")
  for split, label in _SUITES:
    kept = [r for r in records if r["split"] == split]
    if kept:
      lines.append(f"- {label} during training: {kept[0][split]:.4f} (step {kept[0]['step']}) -> "
                   f"{kept[-1][split]:.4f} (step {kept[-1]['step']})")
  lines += _chat_while_training(records)
  lines += _cost_lines(records, flops, price)
  if plot_loss_curve(d):
    lines += ["", f"![{title} loss]({os.path.join(rel, 'loss.png') if rel else 'loss.png'})"]
  return lines + _last_sample(records)


def _plot_reward(d: str, rl) -> str | None:
  if not rl:
    return None
  fig, ax = new_figure(7, 4)
  ax.plot([r["step"] for r in rl], [r["reward"] for r in rl], label="mean reward")
  k = next((key for key in rl[0] if key.startswith("pass@")), None)
  if k:
    ax.plot([r["step"] for r in rl], [r[k] for r in rl], label=k)
  ax.set_xlabel("step")
  ax.set_ylabel("reward")
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, os.path.join(d, "reward.png"))
  return "reward.png"


def rl_section(d: str, rel: str, price) -> list[str]:
  records = _records(d)
  rl = [r for r in records if r["split"] == "rl"]
  evals = [r for r in records if r["split"] == "rl_eval"]
  lines = ["## RL", ""]
  if rl:
    k = next(key for key in rl[0] if key.startswith("pass@"))
    lines += [f"- steps: {rl[-1]['step']}, sampled tokens: {sum(r.get('sampled_tokens', 0) for r in records if r['split'] == 'run'):,.0f}",
              f"- mean reward: {rl[0]['reward']:.3f} (first step) -> {rl[-1]['reward']:.3f} (last); "
              f"{k}: {rl[0][k]:.3f} -> {rl[-1][k]:.3f}"]
  if evals:
    lines.append(f"- held-out greedy accuracy: {evals[0]['accuracy']:.3f} (step {evals[0]['step']}) -> "
                 f"{evals[-1]['accuracy']:.3f} (step {evals[-1]['step']})")
  lines += _cost_lines(records, None, price)
  if _plot_reward(d, rl):
    lines += ["", f"![RL reward]({os.path.join(rel, 'reward.png')})"]
  return lines + _last_sample(records)


def eval_section(root: str) -> list[str]:
  lines = []
  for title, rel in STAGES:
    if not exists(root, rel, "eval.json"):
      continue
    out = _read_json(root, rel, "eval.json")
    lines += [f"### {title} (step {out.get('step', '?')})", "", "| task | metric | value |", "|---|---|---|"]
    for name, r in out.get("results", {}).items():
      lines.append(_result_row(name, r))
    if "hf6" in out:
      lines.append(f"| **HF6 mean** (not CORE) | mean centered | {out['hf6']:.4f} |")
    if "core" in out:
      n = sum(name.startswith("core:") for name in out["results"])
      lines.append(f"| **DCLM CORE** ({n} tasks) | mean centered | {out['core']:.4f} |")
    lines += _chat_rows(out)
    lines.append("")
  return ["## Evaluation", ""] + lines if lines else []


def _result_row(name: str, r) -> str:
  """One eval.json result as a table row; an entry lmtiny did not write that way (a hand edit)
  is shown as such instead of failing the whole card."""
  try:
    if name == "bpb":
      return f"| bpb | bits per byte | {r['bpb']:.4f} |"
    if "centered" in r:
      return f"| {name} | centered acc (acc {r['accuracy']:.3f}, {r['items']} items) | {r['centered']:.4f} |"
    return f"| {name} | accuracy ({r['items']} problems) | {r['accuracy']:.4f} |"
  except (KeyError, TypeError, ValueError):
    return f"| {name} | (not an lmtiny result) | {_DASH} |"


def _chat_rows(out: dict) -> list[str]:
  """`lmtiny.eval --chat` results: one row per chat task, and ChatCORE when all six ran."""
  if not out.get("chat"):
    return []
  lines = ["", "| chat task | metric | value |", "|---|---|---|"]
  lines += [f"| {n} | accuracy ({r['items']} items) | {r['accuracy']:.4f} |" for n, r in out["chat"].items()]
  if "chatcore" in out:
    lines.append(f"| **ChatCORE** ({len(out['chat'])} tasks) | mean centered | {out['chatcore']:.4f} |")
  return lines


def _chat_while_training(records) -> list[str]:
  """Chat evaluations during SFT (sft.chat_eval_every; split "chat" in metrics.jsonl), first -> last."""
  chat = [r for r in records if r["split"] == "chat"]
  if not chat:
    return []
  tasks = [k for k in chat[-1] if k not in ("step", "split", "seconds", "chatcore") and k in chat[0]]
  return ["- chat evals during training: " + ", ".join(f"{k} {chat[0][k]:.3f} -> {chat[-1][k]:.3f}" for k in tasks)
          + f" (step {chat[0]['step']} -> {chat[-1]['step']})"]


def tokenizer_section(root: str) -> list[str]:
  if not exists(root, "tokenizer", "report.json"):
    return []
  rep = _read_json(root, "tokenizer", "report.json")
  lines = ["## Tokenizer", ""]
  for key in _TOKENIZER_FIGURES:
    value = rep.get(key)
    if isinstance(value, (int, float, str)):
      shown = f"{value:,}" if isinstance(value, int) else str(value)[:16] if key == "hash" else str(value)
      lines.append(f"- {key}: {shown}")
  return lines


_DASH = leaderboard.DASH


def _change(first: float, last: float, fmt: str) -> str:
  return f"{first:{fmt}} -> {last:{fmt}}"


def _bytes_per_token(root: str, base_cfg: dict | None) -> str:
  """Measured on the base run's shards (all splits; a mixture's first directory), or the figure
  the tokenizer stage recorded."""
  if exists(root, "tokenizer", "report.json"):
    measured = _read_json(root, "tokenizer", "report.json").get("bytes_per_token")
    if isinstance(measured, (int, float)):
      return f"{measured:.3f}"
  spec = ((base_cfg or {}).get("data") or {}).get("shards")
  if not spec:
    return _DASH
  directory = parse_weighted(spec, "config.data.shards")[0][0]  # relative: to where train ran, as here
  if not exists(directory, shards_lib.MANIFEST_FILE):
    return _DASH
  splits = _read_json(directory, shards_lib.MANIFEST_FILE).get("splits", {}).values()
  tokens, nbytes = sum(s.get("tokens", 0) for s in splits), sum(s.get("bytes", 0) for s in splits)
  return f"{nbytes / tokens:.3f}" if tokens else _DASH


def _val_bpb(records) -> str:
  val = [r for r in records or [] if r["split"] == "val" and "bpb" in r]
  return f"{val[-1]['bpb']:.4f} (step {val[-1]['step']})" if val else _DASH


def _held_out_loss(records) -> str:
  val = [r for r in records or [] if r["split"] == "val"]
  return _change(val[0]["loss"], val[-1]["loss"], ".4f") if val else _DASH


def _suite_value(root: str, records, split: str) -> str:
  """The base run's DCLM CORE ("core") or HF6 mean ("hf6"): lmtiny.eval's, else during training's."""
  if exists(root, "eval.json"):
    out = _read_json(root, "eval.json")
    if split in out:
      return f"{out[split]:.4f} (lmtiny.eval, step {out['step']})"
  kept = [r for r in records or [] if r["split"] == split]
  return f"{kept[-1][split]:.4f} (during training, step {kept[-1]['step']})" if kept else _DASH


def _turn_ending(d: str) -> str:
  if not exists(d, TURN_ENDING_FILE):
    return _DASH
  t = _read_json(d, TURN_ENDING_FILE)
  share = lambda x: f"{x['ended']}/{x['total']} ({100 * x['ended'] / max(x['total'], 1):.1f}%)"
  return f"{share(t['before'])} -> {share(t['after'])} (within {t['max_new_tokens']} tokens)"


def _rl_rows(records) -> list[tuple[str, str, str]]:
  rl = [r for r in records or [] if r["split"] == "rl"]
  evals = [r for r in records or [] if r["split"] == "rl_eval"]
  return [("rl", "mean reward", _change(rl[0]["reward"], rl[-1]["reward"], ".3f") if rl else _DASH),
          ("rl", "held-out accuracy", _change(evals[0]["accuracy"], evals[-1]["accuracy"], ".3f") if evals else _DASH)]


def _evals(root: str, name: str = "eval.json") -> list[tuple[str, dict]]:
  return [(title, _read_json(root, rel, name)) for title, rel in STAGES if exists(root, rel, name)]


def _gsm8k(root: str) -> str:
  found = [f"{r['accuracy']:.4f} ({title}, {r.get('items', '?')} problems)" for title, out in _evals(root)
           if isinstance(r := out.get("results", {}).get("gsm8k"), dict) and isinstance(r.get("accuracy"), (int, float))]
  return "; ".join(found) or _DASH


def _headline(out: dict) -> dict[str, float]:
  """An eval file's figures that a quantized model is compared on."""
  results = out.get("results", {})
  figures = {"bpb": results.get("bpb", {}).get("bpb"), "DCLM CORE": out.get("core"), "HF6": out.get("hf6"),
             "GSM8K": results.get("gsm8k", {}).get("accuracy")}
  return {label: value for label, value in figures.items() if value is not None}


def _quant_delta(root: str, mode: str) -> str:
  """Each figure an eval_<mode>.json shares with the same stage's eval.json (same step), as
  quantized minus full precision."""
  full = dict(_evals(root))
  parts = []
  for title, out in _evals(root, f"eval_{mode}.json"):
    ref = full.get(title)
    if not ref or ref.get("step") != out.get("step"):
      continue
    quantized, reference = _headline(out), _headline(ref)
    deltas = [f"{label} {round(value - reference[label], 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"
              for label, value in quantized.items() if label in reference]
    if deltas:
      parts.append(f"{title}: {', '.join(deltas)}")
  return "; ".join(parts) or _DASH


def _wall_seconds(root: str, records: dict) -> dict[str, float]:
  """Seconds per stage that left a time: tokenizer, base, mid, sft, rl, eval (every eval file's tasks)."""
  seconds = {}
  if exists(root, "tokenizer", "report.json"):
    train_seconds = _read_json(root, "tokenizer", "report.json").get("train_seconds")
    if isinstance(train_seconds, (int, float)):
      seconds["tokenizer"] = float(train_seconds)
  for title, _ in STAGES:
    if records.get(title) is not None:
      seconds[title] = wall_seconds(records[title])
  evals = [r.get("seconds", 0.0) for name in ("eval.json", "eval_int8.json", "eval_int4.json")
           for _, out in _evals(root, name) for r in [*out.get("results", {}).values(), *out.get("chat", {}).values()]
           if isinstance(r, dict) and isinstance(r.get("seconds", 0.0), (int, float))]
  if evals:
    seconds["eval"] = sum(evals)
  return seconds


def _wall_rows(seconds: dict[str, float]) -> list[tuple[str, str, str]]:
  names = ["tokenizer", *(title for title, _ in STAGES), "eval"]
  rows = [("wall time", name, duration(seconds[name]) if name in seconds else _DASH) for name in names]
  return rows + [("wall time", "total", duration(sum(seconds.values())) if seconds else _DASH)]


def summary_section(root: str, records: dict) -> list[str]:
  """The cross-stage table at the top of the card: every row always, '-' where not measured."""
  base_cfg = read_saved_config(root, missing_ok=True)
  rows = [("tokenizer", "bytes per token", _bytes_per_token(root, base_cfg)),
          ("base", "val bpb", _val_bpb(records["base"])),
          *((("base", label, _suite_value(root, records["base"], split)) for split, label in _SUITES))]
  for title, rel in STAGES[1:3]:
    rows += [(title, "held-out loss", _held_out_loss(records[title])),
             (title, "turn-ending rate", _turn_ending(os.path.join(root, rel)))]
  rows += _rl_rows(records["rl"])
  rows += [("eval", "GSM8K accuracy", _gsm8k(root)),
           *(("eval", f"{mode} vs full precision", _quant_delta(root, mode)) for mode in ("int8", "int4"))]
  rows += _wall_rows(_wall_seconds(root, records))
  return ["## Summary", "", "| stage | figure | value |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def write_report(root: str, price: float | None = None) -> str:
  """Rebuilds RUN/report.md; `price` (per chip-hour) is remembered for later stages. ReportError,
  before anything is written, when RUN/report.md is someone else's (check_card)."""
  check_card(root)
  settings_path = os.path.join(root, SETTINGS)
  settings = _read_json(settings_path) if exists(settings_path) else {}
  if price is not None:
    settings["price_per_chip_hour"] = price
    atomic_write(settings_path, json.dumps(settings).encode())
  price = settings.get("price_per_chip_hour")
  records = {title: _records(os.path.join(root, rel)) if exists(root, rel, "metrics.jsonl") else None
             for title, rel in STAGES}
  name = root.rstrip("/").rsplit("/", 1)[-1]
  row = leaderboard.section(name, core=_suite_value(root, records["base"], "core"),
                            bpb=_val_bpb(records["base"]), evals=_evals(root), seconds=_wall_seconds(root, records),
                            chips=_chips([r for stage in records.values() for r in stage or []]), price=price)
  sections = [row, summary_section(root, records), tokenizer_section(root)]
  for title, rel in STAGES:
    d = os.path.join(root, rel)
    if title == "rl":
      if exists(d, "metrics.jsonl"):
        sections.append(rl_section(d, rel, price))
    elif exists(d, "config.json") and exists(d, "metrics.jsonl"):
      sections.append(train_section({"base": "Base model", "mid": "Midtraining", "sft": "SFT"}[title], d, rel, price))
  sections.append(eval_section(root))
  text = f"{CARD_TITLE}{name}\n\n" + "\n\n".join(
      "\n".join(s) for s in sections if s) + "\n"
  path = check_card(root)
  atomic_write(path, text.encode())
  return path


def update_for(workdir: str) -> str | None:
  """Called by a stage when it ends (main process only); rewrites the card of its pipeline run, or
  says in one warning line why it left a report.md that is not its own (the stage still succeeds)."""
  import jax
  if jax.process_index() != 0:
    return None
  try:
    return write_report(report_root(workdir))
  except ReportError as e:
    print(f"warning: {e}", file=sys.stderr)
    return None
