"""geex_jax/model/{attention,precision}.py: the attention kernels agree, fp32-out products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.model import attention as A
from geex_jax.model import codegeex as M
from geex_jax.model.precision import einsum_f32


def _qkv(b=1, t=128, n=2, h=16, seed=0):
  r = np.random.RandomState(seed)
  return tuple(jnp.asarray(r.randn(b, t, n, h), jnp.float32) for _ in range(3))


def _segments(b, t, seed=0):
  """Rows of packed documents 1, 2, 3, ... then padding (0), as the packer makes them."""
  r = np.random.RandomState(seed)
  rows = []
  for _ in range(b):
    cuts = np.sort(r.choice(np.arange(1, t), size=r.randint(1, 5), replace=False))
    row = np.zeros(t, np.int32)
    start = 0
    for i, cut in enumerate([*cuts, t - r.randint(0, t // 4)]):
      row[start:cut] = i + 1
      start = cut
    rows.append(row)
  return jnp.asarray(np.stack(rows))


def test_splash_attention_in_interpret_mode_matches_xla():
  """Pallas splash attention (interpret mode off TPU) vs the XLA path with packed documents:
  outputs and q/k/v gradients to 1e-5."""
  q, k, v = _qkv()
  segs = _segments(1, 128)

  def run(impl):
    def loss(q, k, v):
      mask = A.causal_segment_mask(segs, q.shape[1])
      return jnp.sum(jnp.sin(A.attend(impl, q, k, v, mask, segs)))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

  (want, want_g), (got, got_g) = run("xla"), run("splash")
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_splash_in_the_model_gives_the_xla_logits():
  cfg = M.CodeGeeXConfig.preset("tiny", vocab_size=256, max_position=128)
  params = M.init_params(cfg, jax.random.key(0))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 128)))
  segs = _segments(2, 128, seed=1)
  want = M.CodeGeeX(cfg).apply({"params": params}, tokens, segment_ids=segs)
  got = M.CodeGeeX(cfg.replace(attention="splash")).apply(
    {"params": params}, tokens, segment_ids=segs
  )
  np.testing.assert_allclose(got, want, atol=1e-4)


def _mask_from_lengths(lengths, offsets, t):
  """[b, t, t] bool: causal within each (offset, length) segment."""
  idx = np.arange(t)
  masks = []
  for lens, offs in zip(np.asarray(lengths), np.asarray(offsets)):
    seg = np.full(t, -1)
    for j, (n, o) in enumerate(zip(lens, offs)):
      if n >= 0:
        seg[o : o + n] = j
    masks.append((seg[:, None] == seg[None, :]) & (idx[:, None] >= idx[None, :]))
  return np.stack(masks)


def test_cudnn_segment_lengths_and_offsets_describe_the_document_mask():
  """The (lengths, offsets) given to cuDNN mark exactly the causal same-document pairs; a row
  with more documents than max_segments merges its last ones."""
  t = 64
  segs = _segments(4, t, seed=2)
  lengths, offsets = A.segment_lengths_and_offsets(segs, max_segments=8)
  assert lengths.shape == (4, 8) and offsets.shape == (4, 9)
  want = np.asarray(A.causal_segment_mask(segs, t))[:, 0]
  np.testing.assert_array_equal(_mask_from_lengths(lengths, offsets, t), want)
  row = jnp.asarray([[1, 1, 2, 3, 3, 4, 0, 0]])
  lengths, offsets = A.segment_lengths_and_offsets(row, max_segments=3)
  np.testing.assert_array_equal(lengths, [[2, 1, 5]])
  np.testing.assert_array_equal(offsets, [[0, 2, 3, -1]])
  lengths, offsets = A.segment_lengths_and_offsets(row, max_segments=8)
  np.testing.assert_array_equal(lengths, [[2, 1, 2, 1, 2, -1, -1, -1]])
  np.testing.assert_array_equal(offsets, [[0, 2, 3, 5, 6, -1, -1, -1, -1]])


def test_unknown_attention_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown attention 'flash'.*cudnn.*splash"):
    M.CodeGeeXConfig.preset("tiny", attention="flash")


def test_einsum_f32_is_fp32_out_with_bf16_backward_products():
  """bf16 operands: fp32 result equal to the fp32 product of the bf16 values; gradients in
  bf16 within bf16 rounding of the fp32 ones; the gradient's StableHLO has no fp32 product."""
  r = np.random.RandomState(3)
  x = jnp.asarray(r.randn(4, 8, 32), jnp.bfloat16)
  y = jnp.asarray(r.randn(64, 32), jnp.bfloat16)
  out = einsum_f32("btd,vd->btv", x, y)
  assert out.dtype == jnp.float32
  ref = jnp.einsum("btd,vd->btv", x.astype(jnp.float32), y.astype(jnp.float32))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

  def loss(fn):
    return lambda x, y: jnp.sum(jnp.tanh(fn(x, y)))

  gx, gy = jax.grad(loss(lambda a, b: einsum_f32("btd,vd->btv", a, b)), argnums=(0, 1))(x, y)
  assert gx.dtype == gy.dtype == jnp.bfloat16
  f32 = lambda a: a.astype(jnp.float32)
  rx, ry = jax.grad(loss(lambda a, b: jnp.einsum("btd,vd->btv", a, b)), argnums=(0, 1))(
    f32(x), f32(y)
  )
  for g, w in ((gx, rx), (gy, ry)):
    np.testing.assert_allclose(f32(g), w, atol=0.02 * float(jnp.abs(w).max()))
  text = jax.jit(jax.grad(loss(lambda a, b: einsum_f32("btd,vd->btv", a, b)))).lower(x, y).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 2 and all("xf32>, tensor" not in line for line in dots), dots
