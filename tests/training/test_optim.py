"""geex_jax/training/optim.py: the paper's schedule, weight-decay mask, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geex_jax.model import codegeex as M
from geex_jax.training import optim


def test_schedule_has_the_papers_shape():
  lr = optim.learning_rate_schedule()  # defaults: 1e-4, 2000 warmup, cosine to 1e-6 at 200k
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(1000), 5e-5, rtol=1e-6)
  np.testing.assert_allclose(lr(2000), 1e-4, rtol=1e-6)
  mid = 2000 + (200_000 - 2000) // 2
  np.testing.assert_allclose(lr(mid), 1e-6 + (1e-4 - 1e-6) / 2, rtol=1e-4)
  np.testing.assert_allclose(lr(200_000), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(lr(213_000), 1e-6, rtol=1e-5)  # flat afterwards
  values = [float(lr(s)) for s in range(2000, 200_001, 7000)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_short_schedule_without_decay_is_warmup_then_flat():
  lr = optim.learning_rate_schedule(peak=1e-3, warmup_steps=10, decay_steps=5)
  np.testing.assert_allclose([lr(5), lr(10), lr(500)], [5e-4, 1e-3, 1e-3], rtol=1e-6)


@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_skips_layernorm_and_biases(scan):
  """With zero gradients AdamW's update is exactly -lr * wd * param where decay applies."""
  cfg = M.CodeGeeXConfig.preset("tiny", vocab_size=64, scan_layers=scan)
  params = M.init_params(cfg, jax.random.key(0))
  # Non-trivial biases/LayerNorm params, so "not decayed" is visible.
  params = jax.tree.map(lambda p: p + 0.5, params)
  opt = optim.make_optimizer(learning_rate=0.1, weight_decay=0.1)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(grads, opt.init(params), params)

  def check(path, update, param):
    names = [str(getattr(k, "key", k)) for k in path]
    decayed = not (names[-1] == "bias" or any("layernorm" in n for n in names))
    expected = -0.1 * 0.1 * param if decayed else jnp.zeros_like(param)
    np.testing.assert_allclose(update, expected, rtol=1e-6, atol=1e-9, err_msg="/".join(names))
    return decayed

  flags = jax.tree_util.tree_map_with_path(check, updates, params)
  names = {
    "/".join(str(getattr(k, "key", k)) for k in path): v
    for path, v in jax.tree_util.tree_flatten_with_path(flags)[0]
  }
  assert names["word_embeddings/embedding"] and names["top_query_layer/mlp/dense_h_to_4h/kernel"]
  assert not names["final_layernorm/scale"] and not names["top_query_layer/attention/query/bias"]
  assert sum(names.values()) and not all(names.values())


def test_global_norm_clipping_and_fp32_moments():
  params = {"w": jnp.ones((4, 4), jnp.float32)}
  opt = optim.make_optimizer(learning_rate=1.0, weight_decay=0.0, clip_norm=1.0)
  state = opt.init(params)
  leaves = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 2]
  assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  # Clipping scales a norm-40 gradient to norm 1: Adam's first moment sees grad / 40.
  grads = {"w": jnp.full((4, 4), 10.0)}
  _, state = opt.update(grads, state, params)
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(mu["w"], 0.1 * 10.0 / 40.0, rtol=1e-6)
  np.testing.assert_allclose(optim.global_norm(grads), 40.0, rtol=1e-6)
