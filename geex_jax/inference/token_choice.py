"""How the next token is chosen from logits: sampling parameters, top-k / top-p filters, draws.

Shapes: B = rows, V = vocabulary. Used by the decode loop (`inference.decoding`) inside jit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.errors import InputError

Array = jax.Array

NEG_INF = -jnp.inf
# top-p first looks for the nucleus inside the top TOP_P_FAST_K tokens (a cheap partial sort) and
# falls back to a full sort only when those do not cover top_p; both give the exact nucleus.
TOP_P_FAST_K = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen. temperature 0 or greedy=True: argmax.

  top_k 0 disables top-k; top_p 1.0 disables nucleus filtering. Applied in the order
  temperature -> top-k -> top-p (the top-p mass is computed on the top-k-renormalised
  distribution).
  """

  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    validate_sampling(self.temperature, self.top_k, self.top_p)

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


def validate_sampling(
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  beam: Optional[int] = None,
  max_new_tokens: int = 1,
  num_samples: int = 1,
) -> None:
  """InputError on a parameter out of range (the CLI turns it into one line, exit 2)."""
  if not (
    isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0
  ):
    raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise InputError(f"top_p must be in (0, 1], got {top_p}")
  if beam is not None and not (isinstance(beam, (int, np.integer)) and beam >= 1):
    raise InputError(f"beam width must be an integer >= 1, got {beam}")
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
  if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
    raise InputError(f"num_samples must be an integer >= 1, got {num_samples}")


MAX_SEED = 2**32 - 1


def seed_value(seed: int) -> np.uint32:
  """A user's seed as the uint32 the jitted decode loop takes (a Python int >= 2^31 would
  overflow the int32 it becomes by default). Seeds below 2^31 give the same keys either way."""
  if not (isinstance(seed, (int, np.integer)) and 0 <= seed <= MAX_SEED):
    raise InputError(f"seed must be an integer in 0..{MAX_SEED}, got {seed}")
  return np.uint32(seed)


def _nucleus_cutoff(sorted_logits: Array, top_p: Array) -> tuple[Array, Array]:
  """sorted_logits: [B, k] descending. Returns (the smallest kept logit [B, 1], covered [B]).

  The nucleus is the shortest prefix whose probability mass reaches top_p: token j is kept when
  the mass strictly before it is < top_p (so the most likely token is always kept). `covered`
  says whether these k tokens hold mass >= top_p, i.e. whether the nucleus lies within them.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = before < top_p
  count = jnp.maximum(keep.sum(axis=-1), 1)
  cutoff = jnp.take_along_axis(sorted_logits, (count - 1)[:, None], axis=-1)
  return cutoff, count


def filter_logits(logits: Array, top_k: int = 0, top_p: Any = 1.0, use_top_p: bool = True) -> Array:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf.

  logits: [B, V] fp32 (already divided by the temperature). top_k: static int (0 = off).
  top_p: scalar (may be traced). Returns [B, V]. Ties at a cut-off value are all kept.
  """
  v = logits.shape[-1]
  if top_k and top_k < v:
    top = jax.lax.top_k(logits, top_k)[0]  # [B, k] descending
    logits = jnp.where(logits < top[:, -1:], NEG_INF, logits)
    if use_top_p:
      cutoff, _ = _nucleus_cutoff(top, top_p)
      logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits
  if not use_top_p:
    return logits
  # Probabilities of the full distribution are needed for the mass, so normalise first.
  logp = jax.nn.log_softmax(logits, axis=-1)
  k = min(TOP_P_FAST_K, v)

  def fast(lp):
    top = jax.lax.top_k(lp, k)[0]
    probs = jnp.exp(top)
    before = jnp.cumsum(probs, axis=-1) - probs
    count = jnp.maximum((before < top_p).sum(-1), 1)
    return jnp.take_along_axis(top, (count - 1)[:, None], axis=-1)

  def full(lp):
    return _nucleus_cutoff(-jnp.sort(-lp, axis=-1), top_p)[0]

  covered = jnp.all(jnp.exp(jax.lax.top_k(logp, k)[0]).sum(-1) >= top_p)
  cutoff = jax.lax.cond(covered, fast, full, logp) if k < v else full(logp)
  return jnp.where(logp < cutoff, NEG_INF, logits)


def sample_tokens(
  logits: Array,
  keys: Array,
  *,
  greedy: bool,
  top_k: int,
  use_top_p: bool,
  temperature: Any,
  top_p: Any,
) -> Array:
  """logits: [B, V] fp32; keys: [B] typed keys -> tokens [B] int32."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p, use_top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
