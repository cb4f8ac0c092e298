"""lmtiny.research.scaling against laws known in advance: the fits recover what generated the points."""
import math

import numpy as np
import pytest

from lmtiny.research import scaling

E, A, ALPHA = 1.8, 400.0, 0.15


def test_loss_law_recovers_known_e_a_alpha_within_its_errors():
  rng = np.random.default_rng(0)
  flops = np.logspace(15, 19, 8)
  loss = (E + A * flops ** -ALPHA) * (1 + 0.003 * rng.standard_normal(8))  # 0.3% noise
  law = scaling.fit_loss_law(flops, loss)
  assert abs(law.E - E) < 0.05 and abs(law.alpha - ALPHA) < 0.01 and abs(math.log(law.A / A)) < 0.2
  # the standard errors are honest: each truth lies within 3 of them
  assert abs(law.E - E) < 3 * law.se_E and abs(law.alpha - ALPHA) < 3 * law.se_alpha
  assert abs(math.log(law.A) - math.log(A)) < 3 * law.se_log_A
  assert 0 < law.se_alpha < 0.01 and law.rms < 0.02


def test_loss_law_without_noise_is_exact():
  flops = np.logspace(12, 16, 5)
  law = scaling.fit_loss_law(flops, E + A * flops ** -ALPHA)
  assert law.E == pytest.approx(E, abs=1e-6) and law.alpha == pytest.approx(ALPHA, abs=1e-7)
  assert law.A == pytest.approx(A, rel=1e-5) and law.rms < 1e-8


def test_too_few_points_say_so_instead_of_a_number():
  with pytest.raises(scaling.TooFew, match="3 frontier points.*needs >= 4"):
    scaling.fit_loss_law([1e12, 1e13, 1e14], [3.0, 2.5, 2.2])
  with pytest.raises(scaling.TooFew, match="2 FLOPs budgets.*needs >= 3"):
    scaling.fit_power_law([1e12, 1e13], [1e5, 3e5])
  with pytest.raises(scaling.TooFew, match="does not fall"):
    scaling.fit_loss_law(np.logspace(12, 15, 4), [2.0, 2.1, 2.2, 2.3])


def test_frontier_is_the_best_per_budget_or_the_pareto_front():
  pts = [dict(flops=1.0, loss=3.0, budget=1.0), dict(flops=1.1, loss=2.9, budget=1.0),
         dict(flops=2.0, loss=3.1, budget=2.0), dict(flops=2.2, loss=2.5, budget=2.0)]
  assert [p["loss"] for p in scaling.frontier(pts)] == [2.9, 2.5]
  free = [dict(p, budget=0.0) for p in pts] + [dict(flops=3.0, loss=2.7, budget=0.0)]
  assert [p["loss"] for p in scaling.frontier(free)] == [3.0, 2.9, 2.5]  # 3.1 and 2.7 are beaten by cheaper runs


# Chinchilla's parametric loss: L(N, D) = E + A / N^a + B / D^b with D = C / (6 N). Its compute-optimal
# N_opt ~ C^(b / (a + b)) and D_opt ~ C^(a / (a + b)).
PA, PB, CA, CB = 406.4, 410.7, 0.34, 0.28


def n_opt(budget):
  return (CA * PA / (CB * PB)) ** (1 / (CA + CB)) * (budget / 6) ** (CB / (CA + CB))


def chinchilla_point(budget, n, noise=0.0):
  d = budget / (6 * n)
  return dict(flops=budget, budget=budget, params=n, tokens=d, loss=1.69 + PA / n ** CA + PB / d ** CB + noise)


def chinchilla_points(sizes_per_budget=41, noise=0.0, seed=0):
  rng = np.random.default_rng(seed)
  return [chinchilla_point(budget, n, noise * rng.standard_normal()) for budget in np.logspace(18, 22, 5)
          for n in n_opt(budget) * np.logspace(-1, 1, sizes_per_budget)]  # a decade either side of the optimum


def test_approach1_recovers_the_optimal_exponents():
  front, n_law, d_law = scaling.approach1(chinchilla_points())
  assert len(front) == 5
  a, b = CB / (CA + CB), CA / (CA + CB)  # 0.452, 0.548
  assert n_law.p == pytest.approx(a, abs=0.02) and d_law.p == pytest.approx(b, abs=0.02)
  assert n_law.p + d_law.p == pytest.approx(1.0, abs=1e-9)  # D = C / 6N on every point


def test_approach2_recovers_the_optimal_exponents_through_noise():
  profiles, n_law, d_law = scaling.approach2(chinchilla_points(sizes_per_budget=9, noise=0.002, seed=1))
  assert [p["inside"] for p in profiles] == [True] * 5
  a, b = CB / (CA + CB), CA / (CA + CB)
  assert n_law.p == pytest.approx(a, abs=0.03) and d_law.p == pytest.approx(b, abs=0.03)
  assert abs(n_law.p - a) < 4 * n_law.se_p + 0.01


def test_approach2_leaves_an_extrapolated_minimum_out_of_the_power_law():
  points = [p for p in chinchilla_points(sizes_per_budget=9) if p["budget"] != 1e18]
  points += [chinchilla_point(1e18, n_opt(1e18) * k) for k in (3, 5, 9)]  # every size above the optimum
  profiles, n_law, _ = scaling.approach2(points)
  assert [p["inside"] for p in profiles] == [False, True, True, True, True] and n_law.n == 4


def test_approach2_says_why_a_budget_has_no_minimum():
  points = [p for p in chinchilla_points(sizes_per_budget=2)]
  profiles, n_law, _ = scaling.approach2(points)
  assert all("2 model sizes: a parabola needs >= 3" in p["why"] for p in profiles)
  assert isinstance(n_law, scaling.TooFew) and "0 FLOPs budgets" in str(n_law)
  _, none, _ = scaling.approach2([dict(p, budget=0.0) for p in points])
  assert "no run has a FLOPs budget" in str(none)
