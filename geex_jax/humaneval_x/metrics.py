"""pass@k (unbiased estimator) and the budget-allocation estimate (paper RQ3).

pass@k of one problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as
1 - prod_{i=n-c+1..n} (1 - k / i) (no huge binomials), and 1.0 when n - c < k. A language's
pass@k is the mean over its problems; it is defined only when every problem has n >= k.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from geex_jax import languages

KS = (1, 10, 100)


def fail_all_probability(n: int, c: int, k: int) -> float:
  """P(k samples drawn without replacement from n, c of them correct, are all wrong)."""
  if k < 0 or n < k or c < 0 or c > n:
    raise ValueError(f"need 0 <= k <= n and 0 <= c <= n, got n={n} c={c} k={k}")
  if k == 0:
    return 1.0
  if n - c < k:
    return 0.0
  return float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k of one problem (n samples, c correct)."""
  return 1.0 - fail_all_probability(n, c, k)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> Optional[float]:
  """Mean pass@k over problems given [(n, c), ...]; None when some problem has n < k."""
  if not counts or any(n < k for n, _ in counts):
    return None
  return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))


def pass_at_ks(
  counts: Sequence[tuple[int, int]], ks: Sequence[int] = KS
) -> dict[str, Optional[float]]:
  """{"pass@1": ..., "pass@10": ..., "pass@100": ...} (None where n < k)."""
  return {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}


def default_weights(langs: Sequence[str]) -> dict[str, float]:
  """Training-corpus shares from the language registry (paper: cpp 33, python 32, java 20, js 9,
  go 6 after normalising over these five)."""
  return {k: languages.get(k).corpus_share for k in langs}


def allocate_budget(budget: int, weights: Mapping[str, float]) -> dict[str, int]:
  """Splits `budget` samples in proportion to `weights` (largest remainder; sums to budget)."""
  if budget < 0:
    raise ValueError("budget must be >= 0")
  total = sum(w for w in weights.values() if w > 0)
  if total <= 0:
    raise ValueError("weights must have a positive sum")
  exact = {k: budget * max(w, 0.0) / total for k, w in weights.items()}
  alloc = {k: int(np.floor(v)) for k, v in exact.items()}
  left = budget - sum(alloc.values())
  # Ties broken by weight then name, so the split is deterministic.
  for k in sorted(exact, key=lambda k: (alloc[k] - exact[k], -weights[k], k))[:left]:
    alloc[k] += 1
  return alloc


def budget_pass_rate(
  counts: Mapping[str, Mapping[int, tuple[int, int]]],
  budget: int,
  weights: Optional[Mapping[str, float]] = None,
) -> float:
  """Expected share of problems solved in ANY language when `budget` samples per problem are
  split across languages in proportion to `weights` (paper RQ3).

  Args:
    counts: {language: {problem number: (n, c)}}; problems are matched by number across languages
      and only those present in every language with a positive allocation are scored.
    budget: samples per problem, in total over the languages.
    weights: {language: weight}; default: the registry's training-corpus shares.
  Returns:
    mean over problems of 1 - prod_l P(all k_l samples of language l fail).
  """
  weights = dict(weights or default_weights(list(counts)))
  alloc = allocate_budget(budget, {k: weights.get(k, 0.0) for k in counts})
  used = [k for k, a in alloc.items() if a > 0]
  if not used:
    raise ValueError("the budget allocates no samples")
  numbers = set.intersection(*(set(counts[k]) for k in used))
  if not numbers:
    raise ValueError("no problem is present in every language of the allocation")
  rates = []
  for num in sorted(numbers):
    fail = 1.0
    for k in used:
      n, c = counts[k][num]
      if n < alloc[k]:
        raise ValueError(f"{k}: {n} samples for problem {num}, but the budget allocates {alloc[k]}")
      fail *= fail_all_probability(n, c, alloc[k])
    rates.append(1.0 - fail)
  return float(np.mean(rates))
