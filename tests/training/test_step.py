"""geex_jax/training/step.py numerics: no fp32 matmul in a bf16 step, the chunked loss, remat."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geex_jax.errors import ConfigError
from geex_jax.model import remat
from geex_jax.model.codegeex import CodeGeeXConfig, init_params
from geex_jax.training import step as step_lib

TINY = CodeGeeXConfig.preset("tiny", vocab_size=256, max_position=32)
_DOT = re.compile(r"stablehlo\.dot_general.*:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)")


def _batch(b=2, t=16, seed=0):
  rng = np.random.RandomState(seed)
  segs = np.ones((b, t), np.int32)
  segs[0, t // 2 :] = 2  # two packed documents in row 0
  return {
    "decoder_input_tokens": jnp.asarray(rng.randint(0, 256, (b, t)), jnp.int32),
    "decoder_target_tokens": jnp.asarray(rng.randint(0, 256, (b, t)), jnp.int32),
    "decoder_segment_ids": jnp.asarray(segs),
    "decoder_positions": jnp.asarray(np.tile(np.arange(t), (b, 1)) % (t // 2), jnp.int32),
    "decoder_loss_weights": jnp.asarray(rng.rand(b, t) > 0.2, jnp.float32),
  }


def dot_operand_dtypes(text: str) -> collections.Counter:
  """(lhs dtype, rhs dtype) -> number of dot_general ops in StableHLO text."""
  return collections.Counter((a.split("x")[-1], b.split("x")[-1]) for a, b in _DOT.findall(text))


@pytest.mark.parametrize(
  "overrides",
  [
    dict(scan_layers=True, remat_policy="none"),
    dict(scan_layers=False, remat_policy="minimal", loss_chunk_size=4),
  ],
  ids=["scan", "unrolled-minimal-chunked"],
)
def test_bf16_train_step_runs_no_fp32_matmul(overrides):
  """Forward and backward of the whole step: every product takes bf16 operands (the fp32
  cotangents of the logits and attention scores are cast before their products). Before
  precision.einsum_f32 this step had 6 dot_generals with fp32 operands."""
  cfg = TINY.replace(dtype="bfloat16", **overrides)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  optimizer = optax.adamw(1e-3)
  state = step_lib.TrainState(
    jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(optimizer.init, params)
  )
  step = step_lib.make_train_step(cfg, optimizer, lambda s: 1e-3)
  text = jax.jit(step).lower(state, _batch(), jax.random.key(0)).as_text()
  dots = dot_operand_dtypes(text)
  assert sum(dots.values()) >= 20, dots  # it did find the products
  assert set(dots) == {("bf16", "bf16")}, dots


def _loss_and_grads(cfg, params, batch):
  fn = jax.jit(
    jax.value_and_grad(
      lambda p: step_lib.loss_fn(p, batch, cfg, jax.random.key(0), jnp.float32(20.0))[0]
    )
  )
  return fn(params)


@pytest.fixture(scope="module")
def reference():
  """(params, batch, (loss, grads) without remat or chunking), fp32."""
  params = init_params(TINY, jax.random.key(1))
  batch = _batch()
  return params, batch, _loss_and_grads(TINY, params, batch)


def _assert_same(reference, overrides):
  """loss to 1e-6 relative, every gradient to 1e-5 of its largest entry (fp32)."""
  params, batch, (loss, grads) = reference
  loss_v, grads_v = _loss_and_grads(TINY.replace(**overrides), params, batch)
  np.testing.assert_allclose(loss_v, loss, rtol=1e-6)
  for g, gv in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_v)):
    np.testing.assert_allclose(gv, g, atol=1e-5 * float(jnp.abs(g).max()) + 1e-9)


def test_chunked_loss_equals_the_whole_sequence_loss(reference):
  """loss_chunk_size 4 (of 16 positions) vs 0."""
  _assert_same(reference, dict(loss_chunk_size=4))
  params, batch, _ = reference
  with pytest.raises(ConfigError, match="does not divide"):
    jax.eval_shape(
      lambda p: step_lib.loss_fn(
        p, batch, TINY.replace(loss_chunk_size=5), jax.random.key(0), jnp.float32(1.0)
      ),
      params,
    )


@pytest.mark.parametrize(
  "overrides",
  [dict(remat_policy=name) for name in remat.REMAT_POLICIES if name != "none"]
  + [dict(remat_policy="minimal", scan_unroll=2)],
  ids=lambda o: "-".join(str(v) for v in o.values()),
)
def test_remat_policies_and_scan_unroll_give_the_same_loss_and_gradients(reference, overrides):
  """Each remat policy (layers scanned; one with unroll 2) against no remat."""
  _assert_same(reference, overrides)


def test_remat_policy_table_has_the_maxtext_names():
  assert {"none", "minimal", "save_dot_except_mlp", "full"} <= set(remat.REMAT_POLICIES)
  with pytest.raises(ValueError, match="remat_policy"):
    TINY.replace(remat_policy="sometimes")
