"""A sweep's summary: its table, plots and scaling-law fits, written into the sweep directory.

  summarize(workdir, runs) -> lines to print
      results.csv, results.md        every child's final metrics (lmtiny.research.results)
      loss_vs_flops.png              train loss against training FLOPs, one colour per configuration
                                     (the overrides other than the horizon's), final val losses marked
      frontier.png                   every finished child's final loss against its FLOPs, the compute
                                     frontier, and the fitted L(C) where there is one
      isoflop.png                    loss against parameters per FLOPs budget with each parabola
                                     (only when a budget has three sizes or more)
      report.md                      the table, the fits with their standard errors, Chinchilla's
                                     approaches 1 and 2 (lmtiny.research.scaling), or why a fit is
                                     missing (too few points), and the plots

The loss fitted is the final validation loss (nats per token) when every finished child has one,
else the final train loss (the report says which).
"""
from __future__ import annotations

import math

import numpy as np
from etils import epath

from lmtiny.fs.atomic import atomic_write
from lmtiny.plan import counts
from lmtiny.research import results, scaling
from lmtiny.research.sweep import child_dir, ChildRun
from lmtiny.runs import metrics
from lmtiny.runs.figures import new_figure, save_figure

HORIZON_FIELDS = ("train.flops_budget", "train.steps", "train.tokens_per_param")


def fit_points(rows: list[dict]) -> tuple[list[dict], str]:
  """(the finished children as scaling.py's points, which loss they carry)."""
  done = [r for r in rows if r["status"] == "done"]
  key = "val_loss" if done and all(r["val_loss"] is not None for r in done) else "train_loss"
  points = [dict(r, loss=r[key]) for r in done if r[key] is not None]
  return points, ("final validation loss" if key == "val_loss" else "final train loss (no validation loss)")


def configuration(row: dict) -> str:
  """The child's overrides without the horizon's: what one line of loss_vs_flops.png follows."""
  rest = {k: v for k, v in row["overrides"].items() if k not in HORIZON_FIELDS}
  return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest.items()) or "base"


def _curve(workdir: str, child: ChildRun) -> list[tuple[float, float]]:
  m, t = child.run.cfg.model, child.run.cfg.train
  per_step = t.batch_tokens * counts.train_flops_per_token(m, t.seq_len)
  return [(r["step"] * per_step, r["loss"]) for r in metrics.read_metrics(child_dir(workdir, child.child.name))
          if r.get("split") == "train" and "loss" in r and r["step"] > 0]


def _save(fig, ax, xlabel: str, ylabel: str, path) -> str:
  """A log-x plot's labels, grid and legend, written as a PNG."""
  ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  return save_figure(fig, path)


def plot_loss_vs_flops(workdir: str, runs: list[ChildRun], rows: list[dict], key: str) -> str:
  fig, ax = new_figure(7, 4.5)
  colours = {}
  for child, row in zip(runs, rows):
    config = configuration(row)
    label = None if config in colours else config  # one legend entry per configuration
    colour = colours.setdefault(config, f"C{len(colours) % 10}")
    curve = _curve(workdir, child)
    if curve:
      ax.plot(*zip(*curve), ".-", color=colour, lw=1, ms=3, alpha=0.8, label=label)
    if row[key] is not None and row["flops"]:
      ax.plot(row["flops"], row[key], "o", color=colour, ms=5, label=None if curve else label)
  return _save(fig, ax, "training FLOPs (6N + attention, causal-half)", "loss (nats/token): train lines, final points",
               epath.Path(workdir) / "loss_vs_flops.png")


def plot_frontier(workdir: str, points: list[dict], front: list[dict], law) -> str:
  fig, ax = new_figure(7, 4.5)
  ax.plot([p["flops"] for p in points], [p["loss"] for p in points], "o", color="0.6", label="runs")
  ax.plot([p["flops"] for p in front], [p["loss"] for p in front], "s-", color="C3", label="frontier")
  if isinstance(law, scaling.LossLaw):
    c = np.logspace(math.log10(min(p["flops"] for p in points)), math.log10(max(p["flops"] for p in points)), 100)
    ax.plot(c, law(c), "--", color="C0", label=f"fit: {law.E:.3f} + {law.A:.3g} C^-{law.alpha:.3f}")
  return _save(fig, ax, "training FLOPs", "final loss (nats/token)", epath.Path(workdir) / "frontier.png")


def plot_isoflop(workdir: str, points: list[dict], profiles: list[dict]) -> str | None:
  usable = [p for p in profiles if "why" not in p]
  if not usable:
    return None
  fig, ax = new_figure(7, 4.5)
  for i, profile in enumerate(profiles):
    group = [p for p in points if p["budget"] == profile["budget"]]
    colour = f"C{i % 10}"
    ax.plot([p["params"] for p in group], [p["loss"] for p in group], "o", color=colour,
            label=f"C = {profile['budget']:.3g}")
    if "why" not in profile:
      c0, c1, c2 = profile["coefficients"]
      u = np.linspace(math.log(min(p["params"] for p in group)), math.log(max(p["params"] for p in group)), 50)
      ax.plot(np.exp(u), c0 + c1 * u + c2 * u ** 2, "-", color=colour, lw=1)
      ax.plot(profile["params"], profile["loss"], "*", color=colour, ms=10)
  return _save(fig, ax, "parameters N", "final loss (nats/token)", epath.Path(workdir) / "isoflop.png")


def _law_text(law, name: str) -> str:
  if isinstance(law, scaling.TooFew):
    return f"{name}: not fitted: {law}."
  return f"{name}: exponent {law.p:.3f} ± {law.se_p:.3f} (standard error; {law.n} points), coefficient {law.k:.3g}."


def _loss_law_text(law) -> list[str]:
  if isinstance(law, scaling.TooFew):
    return [f"Not fitted: {law}."]
  return [f"L(C) = E + A·C^-alpha over {law.n} frontier points (standard errors from the Jacobian at the "
          "least-squares optimum):", "",
          f"- E = {law.E:.4f} ± {law.se_E:.4f} (the irreducible loss, nats/token)",
          f"- alpha = {law.alpha:.4f} ± {law.se_alpha:.4f}",
          f"- A = {law.A:.4g} (ln A = {math.log(law.A):.3f} ± {law.se_log_A:.3f})",
          f"- residuals: {law.rms:.4f} nats/token root-mean-square"]


def report_text(workdir: str, rows: list[dict], points: list[dict], which: str, fits: dict, plots: list[str]) -> str:
  statuses = {s: sum(r["status"] == s for r in rows) for s in dict.fromkeys(r["status"] for r in rows)}
  lines = [f"# Sweep report: {workdir}", "",
           f"{len(rows)} children: " + ", ".join(f"{n} {s}" for s, n in statuses.items()) + f". Loss fitted: {which}.",
           "FLOPs are training FLOPs, 6·N_matmul + 6·L·T·H·Dh (causal-half).", "",
           "## Results", "", results.markdown_table(rows),
           "## Compute frontier", ""]
  lines += _loss_law_text(fits["law"])
  front, n_law, d_law = fits["approach1"]
  lines += ["", "## Chinchilla approach 1: the frontier's parameters and tokens", "",
            "| FLOPs | child | params N | tokens D | loss |", "|---|---|---|---|---|"]
  lines += [f"| {p['flops']:.3g} | {p['name']} | {p['params']:,} | {p['tokens']:,} | {p['loss']:.4f} |" for p in front]
  lines += ["", "- " + _law_text(n_law, "N_opt ~ C^a"), "- " + _law_text(d_law, "D_opt ~ C^b")]
  profiles, n_iso, d_iso = fits["approach2"]
  lines += ["", "## Chinchilla approach 2: IsoFLOP profiles", ""]
  if profiles:
    lines += ["| budget | sizes | N* | D* | loss at N* | note |", "|---|---|---|---|---|---|"]
    for p in profiles:
      if "why" in p:
        lines.append(f"| {p['budget']:.3g} | {p['sizes']} | | | | {p['why']} |")
      else:
        note = "" if p["inside"] else "minimum outside the sizes tried (extrapolated; not in the power law)"
        lines.append(f"| {p['budget']:.3g} | {p['sizes']} | {p['params']:.4g} | {p['tokens']:.4g} | "
                     f"{p['loss']:.4f} | {note} |")
    lines.append("")
  lines += ["- " + _law_text(n_iso, "N* ~ C^a"), "- " + _law_text(d_iso, "D* ~ C^b"), "", "## Plots", ""]
  lines += [f"![{name}]({name})" for name in plots]
  return "\n".join(lines) + "\n"


def summarize(workdir: str, runs: list[ChildRun]) -> list[str]:
  """Writes the table, plots and report (module docstring); returns the lines to print."""
  rows = results.collect(workdir, runs)
  csv_path, md_path = results.write_table(workdir, rows)
  points, which = fit_points(rows)
  key = "val_loss" if which.startswith("final validation") else "train_loss"
  none = scaling.TooFew("no child has finished yet")
  fits = {"law": none, "approach1": ([], none, none), "approach2": ([], none, none)}
  if points:
    front = scaling.frontier(points)
    fits = {"law": scaling.attempt(scaling.fit_loss_law, [p["flops"] for p in front], [p["loss"] for p in front]),
            "approach1": scaling.approach1(points), "approach2": scaling.approach2(points)}
  plots = [plot_loss_vs_flops(workdir, runs, rows, key)]
  if points:
    plots.append(plot_frontier(workdir, points, scaling.frontier(points), fits["law"]))
    isoflop = plot_isoflop(workdir, points, fits["approach2"][0])
    plots += [isoflop] if isoflop else []
  names = [str(epath.Path(p).name) for p in plots]
  report = epath.Path(workdir) / "report.md"
  atomic_write(report, report_text(workdir, rows, points, which, fits, names).encode())
  law = fits["law"]
  out = [results.markdown_table(rows).rstrip("\n"),
         f"frontier: not fitted: {law}" if isinstance(law, scaling.TooFew) else
         f"frontier: L(C) = {law.E:.3f} + {law.A:.3g}*C^-{law.alpha:.3f} (alpha {law.alpha:.3f} +- {law.se_alpha:.3f})"]
  out.append(f"wrote {csv_path}, {md_path}, {report} and {', '.join(names)}")
  return out
