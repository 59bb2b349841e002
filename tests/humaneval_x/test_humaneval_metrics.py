"""geex_jax/humaneval_x/metrics.py: unbiased pass@k and the budget allocation (RQ3)."""

import math

import pytest

from geex_jax.humaneval_x import metrics


def _closed_form(n, c, k):
  return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize(
  "n, c, k, expected",
  [
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (10, 3, 1, 0.3),  # pass@1 = c / n
    (5, 2, 2, 1 - 3 / 10),  # C(3,2)/C(5,2) = 3/10
    (4, 1, 2, 0.5),  # C(3,2)/C(4,2) = 3/6
    (10, 8, 3, 1.0),  # n - c < k
    (200, 0, 100, 0.0),
  ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
  assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n, c, k", [(200, 7, 10), (200, 37, 100), (50, 1, 10), (100, 99, 1)])
def test_pass_at_k_matches_closed_form(n, c, k):
  assert metrics.pass_at_k(n, c, k) == pytest.approx(_closed_form(n, c, k), rel=1e-10)


def test_mean_and_undefined_k():
  counts = [(10, 0), (10, 5), (10, 10)]
  assert metrics.mean_pass_at_k(counts, 1) == pytest.approx(0.5)
  out = metrics.pass_at_ks(counts)
  assert out["pass@1"] == pytest.approx(0.5)
  assert out["pass@10"] == pytest.approx(2 / 3)  # 0, 1, 1
  assert out["pass@100"] is None  # n < k: not defined
  with pytest.raises(ValueError):
    metrics.pass_at_k(3, 4, 1)


def test_allocate_budget_sums_and_follows_weights():
  w = {"cpp": 33, "python": 32, "java": 20, "js": 9, "go": 6}
  assert metrics.allocate_budget(100, w) == w
  a10 = metrics.allocate_budget(10, w)
  assert sum(a10.values()) == 10 and a10 == {"cpp": 3, "python": 3, "java": 2, "js": 1, "go": 1}
  assert metrics.default_weights(["python"])["python"] > 0  # from the language registry


def test_budget_pass_rate_any_language_counts():
  # Two problems; python solves problem 0 half the time, cpp solves problem 1 always.
  counts = {"python": {0: (2, 1), 1: (2, 0)}, "cpp": {0: (2, 0), 1: (2, 2)}}
  # budget 2, equal weights -> one sample each: p0 = 0.5, p1 = 1.0.
  assert metrics.budget_pass_rate(counts, 2, {"python": 1, "cpp": 1}) == pytest.approx(0.75)
  # All budget on python: p0 = pass@2 of (2, 1) = 1, p1 = 0.
  assert metrics.budget_pass_rate(counts, 2, {"python": 1, "cpp": 0}) == pytest.approx(0.5)
  with pytest.raises(ValueError, match="allocates"):
    metrics.budget_pass_rate(counts, 3, {"python": 1, "cpp": 0})  # n = 2 < 3
