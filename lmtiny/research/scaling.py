"""Scaling-law fits over a sweep's final losses, in NumPy alone.

  frontier(points)                 the compute frontier: the best loss per FLOPs budget (or the
                                   Pareto front: no cheaper point has a lower loss)
  fit_loss_law(C, L)               L(C) = E + A * C**(-alpha), least squares, standard errors
  fit_power_law(C, Y)              Y = k * C**p (a line in log-log), standard error of p
  approach1(points)                Chinchilla's approach 1: the frontier's N and D per budget,
                                   fitted as N_opt ~ C**a and D_opt ~ C**b
  approach2(points)                Chinchilla's approach 2 (IsoFLOP): per budget, a parabola in
                                   ln N, its minimum N*, then N* ~ C**a and D* ~ C**b over the
                                   budgets whose minimum lies within the sizes tried

A point is a dict with `flops` (C, training FLOPs), `params` (N), `tokens` (D), `loss` and
`budget` (the FLOPs budget it was trained for; 0 when none). Too few points for a fit raise
TooFew, whose message says what is missing: a report prints that, never a number.

Uncertainty: the loss law's errors are the square roots of the diagonal of s^2 (J^T J)^-1, J the
Jacobian of the residuals at the least-squares optimum and s^2 = RSS / (n - 3); the power laws'
the ordinary least-squares error of the slope, s^2 / sum((x - mean x)^2) with s^2 = RSS / (n - 2).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

MIN_LAW_POINTS = 4  # three parameters and one degree of freedom for their errors
MIN_BUDGETS = 3     # a power law's exponent and an error need three budgets
MIN_SIZES = 3       # a parabola per budget needs three model sizes


class TooFew(ValueError):
  """Too few points for a fit; the message says how many there are and how many it needs."""


@dataclasses.dataclass(frozen=True)
class LossLaw:
  E: float
  A: float
  alpha: float
  se_E: float
  se_alpha: float
  se_log_A: float  # standard error of ln A (A itself spans orders of magnitude)
  n: int
  rms: float  # root-mean-square residual, loss units

  def __call__(self, flops):
    return self.E + self.A * np.asarray(flops, float) ** (-self.alpha)


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  k: float
  p: float
  se_p: float
  n: int

  def __call__(self, flops):
    return self.k * np.asarray(flops, float) ** self.p


def frontier(points: list[dict]) -> list[dict]:
  """The best point of each FLOPs budget when every point has one, else the Pareto front; by C."""
  if points and all(p["budget"] > 0 for p in points):
    best = {}
    for p in points:
      if p["budget"] not in best or p["loss"] < best[p["budget"]]["loss"]:
        best[p["budget"]] = p
    return sorted(best.values(), key=lambda p: p["flops"])
  front, lowest = [], math.inf
  for p in sorted(points, key=lambda p: (p["flops"], p["loss"])):
    if p["loss"] < lowest:
      front.append(p)
      lowest = p["loss"]
  return front


def _linear_fit(x, y):
  """(E, A', rss) of y = E + A' * x by least squares."""
  design = np.stack([np.ones_like(x), x], axis=1)
  coef, *_ = np.linalg.lstsq(design, y, rcond=None)
  return coef[0], coef[1], float(np.sum((design @ coef - y) ** 2))


def fit_loss_law(flops, loss, alphas=np.linspace(1e-3, 5.0, 2000)) -> LossLaw:
  """L = E + A * C**(-alpha): for each alpha on a grid E and A solve a linear least squares
  (variable projection), the best is polished by Gauss-Newton steps on (E, ln A', alpha) with C
  scaled by its geometric mean C0 (A = A' * C0**alpha), and the errors come from the Jacobian."""
  c, y = np.asarray(flops, float), np.asarray(loss, float)
  n = len(c)
  if n < MIN_LAW_POINTS:
    raise TooFew(f"{n} frontier point{'s' * (n != 1)}: L(C) = E + A*C^-alpha has 3 parameters and needs >= "
                 f"{MIN_LAW_POINTS} points for a fit with uncertainty")
  if len(set(c)) < MIN_LAW_POINTS:
    raise TooFew(f"{len(set(c))} distinct FLOPs values: the fit needs >= {MIN_LAW_POINTS}")
  log_c0 = float(np.mean(np.log(c)))
  x = np.log(c) - log_c0
  best = None
  for alpha in alphas:
    e, a, rss = _linear_fit(np.exp(-alpha * x), y)
    if a > 0 and (best is None or rss < best[3]):
      best = (e, math.log(a), alpha, rss)
  if best is None:
    raise TooFew("the loss does not fall with compute on the frontier: no E + A*C^-alpha with A > 0 fits")
  theta = np.array(best[:3])

  def residuals(t):
    f = np.exp(t[1] - t[2] * x)
    return t[0] + f - y, np.stack([np.ones_like(x), f, -x * f], axis=1)

  r, jac = residuals(theta)
  for _ in range(50):  # Gauss-Newton with step halving: never worse than the grid's best
    step, *_ = np.linalg.lstsq(jac, -r, rcond=None)
    scale = 1.0
    while scale > 1e-6:
      trial = theta + scale * step
      r_trial, jac_trial = residuals(trial)
      if trial[2] > 0 and np.sum(r_trial ** 2) <= np.sum(r ** 2):
        theta, r, jac = trial, r_trial, jac_trial
        break
      scale /= 2
    if scale <= 1e-6 or np.max(np.abs(scale * step)) < 1e-12:
      break
  rss = float(np.sum(r ** 2))
  cov = rss / (n - 3) * np.linalg.pinv(jac.T @ jac)
  grad_log_a = np.array([0.0, 1.0, log_c0])  # ln A = ln A' + alpha * ln C0
  var_log_a = float(grad_log_a @ cov @ grad_log_a)
  return LossLaw(E=float(theta[0]), A=float(math.exp(theta[1] + theta[2] * log_c0)), alpha=float(theta[2]),
                 se_E=math.sqrt(max(cov[0, 0], 0.0)), se_alpha=math.sqrt(max(cov[2, 2], 0.0)),
                 se_log_A=math.sqrt(max(var_log_a, 0.0)), n=n, rms=math.sqrt(rss / n))


def fit_power_law(flops, values, what: str = "values") -> PowerLaw:
  """values = k * C**p: a least-squares line through (ln C, ln values)."""
  c, v = np.asarray(flops, float), np.asarray(values, float)
  n = len(c)
  if n < MIN_BUDGETS or len(set(c)) < MIN_BUDGETS:
    raise TooFew(f"{len(set(c))} FLOPs budget{'s' * (len(set(c)) != 1)} with {what}: a power law with an error "
                 f"on its exponent needs >= {MIN_BUDGETS}")
  x, y = np.log(c), np.log(v)
  slope, intercept = np.polyfit(x, y, 1)
  rss = float(np.sum((intercept + slope * x - y) ** 2))
  se = math.sqrt(rss / (n - 2) / float(np.sum((x - x.mean()) ** 2)))
  return PowerLaw(k=float(math.exp(intercept)), p=float(slope), se_p=se, n=n)


def attempt(fit, *args):
  """fit(*args), or the TooFew it raised (a report says why there is no number)."""
  try:
    return fit(*args)
  except TooFew as e:
    return e


def approach1(points: list[dict]) -> tuple[list[dict], PowerLaw | TooFew, PowerLaw | TooFew]:
  """(the frontier, N_opt ~ C**a, D_opt ~ C**b): the frontier's parameters and tokens against its
  FLOPs; a law that cannot be fitted is the TooFew saying why."""
  front = frontier(points)
  flops = [p["flops"] for p in front]
  return (front, attempt(fit_power_law, flops, [p["params"] for p in front], "a frontier point"),
          attempt(fit_power_law, flops, [p["tokens"] for p in front], "a frontier point"))


def isoflop_minimum(params, tokens, loss) -> dict:
  """One budget's IsoFLOP profile: L = c0 + c1 u + c2 u^2 in u = ln N, its minimum u* (needs c2 > 0),
  and D* from a line through (ln N, ln D) at u*. {"params", "tokens", "loss", "inside"} (inside:
  N* lies within the sizes tried)."""
  u, d, y = np.log(np.asarray(params, float)), np.log(np.asarray(tokens, float)), np.asarray(loss, float)
  if len(set(u)) < MIN_SIZES:
    raise TooFew(f"{len(set(u))} model size{'s' * (len(set(u)) != 1)}: a parabola needs >= {MIN_SIZES}")
  c2, c1, c0 = np.polyfit(u, y, 2)
  if c2 <= 0:
    raise TooFew("the loss is not convex in ln N at this budget: no minimum to read")
  best = -c1 / (2 * c2)
  slope, intercept = np.polyfit(u, d, 1)
  return {"params": float(math.exp(best)), "tokens": float(math.exp(intercept + slope * best)),
          "loss": float(c0 + c1 * best + c2 * best ** 2), "inside": bool(u.min() <= best <= u.max()),
          "coefficients": (float(c0), float(c1), float(c2))}


def approach2(points: list[dict]) -> tuple[list[dict], PowerLaw | TooFew, PowerLaw | TooFew]:
  """(per budget: its minimum, or "why" there is none; N* ~ C**a; D* ~ C**b), laws as approach1's."""
  budgets = sorted({p["budget"] for p in points if p["budget"] > 0})
  profiles = []
  for budget in budgets:
    group = [p for p in points if p["budget"] == budget]
    entry = {"budget": budget, "flops": float(np.mean([p["flops"] for p in group])), "sizes": len(group)}
    try:
      entry.update(isoflop_minimum([p["params"] for p in group], [p["tokens"] for p in group],
                                   [p["loss"] for p in group]))
    except TooFew as e:
      entry["why"] = str(e)
    profiles.append(entry)
  usable = [p for p in profiles if "why" not in p and p["inside"]]  # an extrapolated minimum is no measurement
  if not budgets:
    none = TooFew("no run has a FLOPs budget (train.flops_budget): IsoFLOP profiles need runs at fixed budgets")
    return profiles, none, none
  flops = [p["flops"] for p in usable]
  return (profiles, attempt(fit_power_law, flops, [p["params"] for p in usable], "an IsoFLOP minimum"),
          attempt(fit_power_law, flops, [p["tokens"] for p in usable], "an IsoFLOP minimum"))
