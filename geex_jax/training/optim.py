"""The optimizer of the paper (codegeex-facts.md §4) as one optax chain, configurable from gin.

AdamW (b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1) with the decay masked off LayerNorm params and
biases, global-norm clipping at 1.0, and a linear warmup + cosine schedule that is flat after its
end. Moments are kept in the parameters' dtype, which the trainer keeps fp32 (master weights).
"""

from __future__ import annotations

from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax


@gin.configurable
def learning_rate_schedule(
  step: Any = None,
  *,
  peak: float = 1e-4,
  warmup_steps: int = 2000,
  decay_steps: int = 200_000,
  end: float = 1e-6,
) -> Any:
  """lr(step): 0 -> `peak` linearly over `warmup_steps`, cosine to `end` at `decay_steps`
  (counted from step 0, warmup included), `end` afterwards.

  Called with step=None it returns the schedule function itself (what optax wants).
  """
  if warmup_steps < 0 or decay_steps < 1:
    raise ValueError(f"bad schedule: warmup_steps={warmup_steps}, decay_steps={decay_steps}")
  if decay_steps <= warmup_steps:
    # A short run (demo, tests) may set decay below warmup: then it is warmup then flat at peak.
    schedule = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  else:
    schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=peak,
      warmup_steps=warmup_steps,
      decay_steps=decay_steps,
      end_value=end,
    )
  return schedule if step is None else schedule(step)


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: every kernel and embedding, not biases or LayerNorm params.

  By name, not by rank: under scan_layers a bias or LayerNorm scale is stacked to rank 2.
  """

  def decays(path, _):
    names = _path_names(path)
    return not (names[-1] == "bias" or any("layernorm" in n for n in names))

  return jax.tree_util.tree_map_with_path(decays, params)


@gin.configurable
def make_optimizer(
  *,
  learning_rate: Callable[[Any], Any] | float | None = None,
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  weight_decay: float = 0.1,
  clip_norm: float = 1.0,
) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) -> AdamW with the decay mask. learning_rate: a schedule or a
  constant; None = `learning_rate_schedule()` as bound in gin."""
  lr = learning_rate_schedule() if learning_rate is None else learning_rate
  parts = []
  if clip_norm is not None and clip_norm > 0:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def global_norm(tree: Any) -> jax.Array:
  """fp32 L2 norm over every leaf (the quantity clip_by_global_norm clips)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
