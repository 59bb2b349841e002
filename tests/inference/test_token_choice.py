"""inference/token_choice.py: top-p keeps exactly the nucleus (alone and after top-k), draws
come only from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.inference import token_choice as T


@pytest.mark.parametrize("vocab", [64, 1024])  # 1024 > TOP_P_FAST_K: fast path and full sort
def test_top_p_keeps_exactly_the_nucleus(vocab):
  probs = np.full(vocab, 0.0625 / (vocab - 4))  # the last 1/16 spread over the other tokens
  probs[[7, 3, 11, 5]] = [0.5, 0.25, 0.125, 0.0625]  # permuted so order comes from the values
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  for top_p, nucleus in [
    (0.4, {7}),
    (0.7, {7, 3}),
    (0.76, {7, 3, 11}),
    (0.9, {7, 3, 11, 5}),
    (1e-6, {7}),
  ]:
    kept = set(np.flatnonzero(np.isfinite(np.asarray(T.filter_logits(logits, 0, top_p))[0])))
    assert kept == nucleus, top_p
  # Combined with top-k, the mass is measured on the renormalised top-k distribution:
  # top-2 -> (2/3, 1/3); top_p 0.6 keeps only the first.
  kept = np.isfinite(np.asarray(T.filter_logits(logits, 2, 0.6))[0])
  assert set(np.flatnonzero(kept)) == {7}
  # A flat distribution whose nucleus is wider than the fast path's partial sort.
  flat = jnp.zeros((1, vocab), jnp.float32).at[0, :3].set(-1.0)
  kept = np.isfinite(np.asarray(T.filter_logits(flat, 0, 0.999))[0]).sum()
  assert kept >= vocab - 3
  # Sampling only ever draws nucleus tokens.
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = T.sample_tokens(
    jnp.repeat(logits, 2000, 0),
    keys,
    greedy=False,
    top_k=0,
    use_top_p=True,
    temperature=1.0,
    top_p=0.7,
  )
  counts = np.bincount(np.asarray(draws), minlength=vocab)
  assert set(np.flatnonzero(counts)) == {7, 3}
  assert 0.6 < counts[7] / 2000 < 0.73  # renormalised: 2/3
