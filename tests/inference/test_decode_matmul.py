"""inference/decode_matmul.py: the split-K kernel (interpret mode here) against XLA's product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.inference import decode_matmul as I
from geex_jax.model import codegeex as M
from geex_jax.inference import quantization as Q
from geex_jax.inference import decoding as D
from geex_jax.inference.token_choice import SamplingParams


def _operands(m, k, n, dtype=jnp.bfloat16, seed=0):
  rng = np.random.RandomState(seed)
  x = jnp.asarray(rng.randn(m, k), dtype)
  w = jnp.asarray(rng.randint(-127, 128, (k, n)), jnp.int8)
  return x, w


@pytest.mark.parametrize(
  "m, k, n, tiling",
  [
    (1, 512, 256, I.Tiling(block_n=128, k_splits=4, block_k=64)),  # vector path, split K
    (1, 256, 128, I.Tiling(block_n=64, k_splits=1, block_k=128)),  # no split
    (1, 512, 256, I.Tiling(block_n=128, k_splits=4, block_k=32, deferred_reduce=True)),
    (5, 512, 256, I.Tiling(block_n=128, k_splits=2, block_k=128)),  # rows padded to 16
    (32, 1024, 384, I.Tiling(block_n=128, k_splits=8, block_k=64)),  # Triton dot path
  ],
)
def test_kernel_equals_xla(m, k, n, tiling):
  x, w = _operands(m, k, n)
  got = I.pallas_matmul(x, w, tiling, interpret=True)
  ref = I.xla_matmul(x, w)
  assert got.shape == (m, n) and got.dtype == jnp.float32
  # Same products, summed in another order: fp32 rounding only.
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max())
  )


def test_default_tiling_covers_the_13b_linears():
  # q/k/v/dense [5120 -> 5120], dense_h_to_4h [5120 -> 20480], dense_4h_to_h [20480 -> 5120].
  for k, n in ((5120, 5120), (5120, 20480), (20480, 5120)):
    for m in (1, 8, 64):
      t = I.default_tiling(m, k, n)
      assert t is not None and I.fits(t, m, k, n), (m, k, n, t)
      assert (n // t.block_n) * t.k_splits >= 256, t  # enough programs to fill 132 SMs
  assert I.default_tiling(1, 5120, 5000) is None  # N not a multiple of 128
  assert I.default_tiling(1, 96, 128) is None  # no power-of-two K chunk >= 64


def test_auto_uses_xla_off_gpu_and_bad_choices_are_refused():
  assert I.use_kernel("auto", 1, 5120, 5120) is None or jax.default_backend() == "gpu"
  assert I.use_kernel("xla", 1, 5120, 5120) is None
  assert I.use_kernel("auto", 1000, 5120, 5120) is None  # prefill rows: XLA
  assert I.use_kernel("pallas", 1, 96, 128) is None  # nothing tiles it: XLA
  assert I.use_kernel("pallas", 1000, 5120, 5120) is None  # prefill rows: XLA
  assert I.use_kernel("pallas", 1, 5120, 5120) == I.default_tiling(1, 5120, 5120)
  with pytest.raises(ValueError, match="unknown decode matmul"):
    I.use_kernel("triton", 1, 5120, 5120)


def test_quantized_decode_with_the_kernel_matches_xla():
  """Greedy decoding of a quantized model: the kernel (interpreted) and XLA give the same tokens
  and near-identical logits. The shape is tiny's with 128-wide linears so the kernel tiles them."""
  cfg = M.CodeGeeXConfig.preset(
    "tiny",
    hidden_size=128,
    ffn_size=512,
    num_heads=4,
    scan_layers=False,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )
  params = Q.quantize_params(M.init_params(cfg, jax.random.key(3)))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50000, (1, 1)))
  model = M.CodeGeeX(cfg)
  cache = M.init_cache(cfg, 1, 8, jnp.bfloat16)
  outs = {}
  for impl in ("xla", "pallas"):
    logits, _ = I.apply(
      model,
      {"params": params, "cache": cache},
      tokens,
      decode=True,
      mutable=["cache"],
      matmul_impl=impl,
    )
    outs[impl] = np.asarray(logits, np.float32)
  np.testing.assert_allclose(outs["pallas"], outs["xla"], atol=2e-2)
  seqs = {}
  for impl in ("xla", "pallas"):
    gen = D.generate_ids(
      cfg, params, [[5, 6, 7]], sampling=SamplingParams(greedy=True), max_new_tokens=4, matmul=impl
    )
    seqs[impl] = gen.tokens
  assert seqs["pallas"] == seqs["xla"]


def test_kernel_on_float_weights_equals_xla():
  x, _ = _operands(1, 512, 256)
  w = jnp.asarray(np.random.RandomState(2).randn(512, 256), jnp.bfloat16)
  got = I.pallas_matmul(x, w, I.Tiling(block_n=64, k_splits=4, block_k=64), interpret=True)
  ref = I.xla_matmul(x, w)
  np.testing.assert_allclose(
    np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max())
  )


def test_float_linears_use_the_kernel_only_when_asked_or_measured(monkeypatch):
  cfg = M.CodeGeeXConfig.preset(
    "tiny",
    hidden_size=128,
    ffn_size=512,
    num_heads=4,
    scan_layers=False,
    dtype="bfloat16",
    param_dtype="bfloat16",
  )
  params = M.init_params(cfg, jax.random.key(4))
  tokens = jnp.asarray(np.random.RandomState(5).randint(0, 50000, (1, 1)))
  model = M.CodeGeeX(cfg)
  cache = M.init_cache(cfg, 1, 8, jnp.bfloat16)
  calls = []
  real = I.pallas_matmul
  monkeypatch.setattr(I, "pallas_matmul", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))

  def logits(impl):
    out, _ = I.apply(
      model,
      {"params": params, "cache": cache},
      tokens,
      decode=True,
      mutable=["cache"],
      matmul_impl=impl,
    )
    return np.asarray(out, np.float32)

  ref = logits("auto")  # CPU: XLA, Flax's own Dense
  assert calls == []
  got = logits("pallas")  # every block linear through the kernel
  assert len(calls) == 6 * (cfg.num_layers + 1)
  np.testing.assert_allclose(got, ref, atol=2e-2)
  # On a GPU "auto" sends a float linear to the kernel only where TILINGS says it won.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert I.use_kernel("auto", 1, 128, 512, jnp.bfloat16) is None
  monkeypatch.setitem(I.TILINGS, (1, 128, 512, 2), I.Tiling(block_n=128, k_splits=2, block_k=64))
  assert I.use_kernel("auto", 1, 128, 512, jnp.bfloat16) == I.Tiling(128, 2, 64)
  assert I.use_kernel("auto", 1, 5120, 5120, jnp.int8) == I.default_tiling(1, 5120, 5120)
  assert I.use_kernel("auto", 64, 5120, 5120, jnp.int8) is None  # batches: XLA (measured)
  monkeypatch.setitem(I.TILINGS, (1, 5120, 5120, 1), None)  # a measured XLA win
  assert I.use_kernel("auto", 1, 5120, 5120, jnp.int8) is None
