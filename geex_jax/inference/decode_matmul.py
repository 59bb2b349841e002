"""The blocks' linears at decode: `x @ W` for a few rows of activations against a large weight.

Two implementations of one product (fp32 result; the caller applies scale and bias):

  xla     widens W to the compute dtype right before a `dot_general`. Runs on every backend;
          whether an int8 W's convert is fused into the matmul is up to XLA (on an H200 at
          decode shapes it was not: int8 decoding was slower than bf16, BENCHMARKS.md).
  pallas  a split-K weight-streaming kernel (Pallas, Triton backend) for NVIDIA GPUs. A grid of
          (N / block_n) x k_splits programs each reads one [K / k_splits, block_n] tile of W
          exactly once, in block_k-row steps, widens it in registers, accumulates in fp32 and
          writes its partial [rows, block_n] sum; XLA adds the k_splits partials (a small fused
          reduction, together with the scale and bias). Splitting K keeps every multiprocessor
          streaming when N / block_n alone gives too few programs.

`linear_interceptor(impl)` routes Flax Dense/DenseGeneral calls through `matmul`: always for
quantized linears (params `kernel_q` int8 + `scale`, see quantization.py), and for ordinary
float kernels only where the kernel was measured faster (TILINGS) or `impl="pallas"` asks.
"auto" takes the kernel on a GPU for int8 weights and one row of activations (batch-1 decoding),
XLA otherwise (CPU, TPU, prefill, batches), unless TILINGS records a measurement for the shape.
Off a GPU the kernel runs in Pallas' interpret
mode, which is how the CPU tests check it against the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "pallas")
MAX_KERNEL_ROWS = 64


@dataclasses.dataclass(frozen=True)
class Tiling:
  """How the kernel tiles one [M, K] @ [K, N] product."""

  block_n: int = 128  # output columns per program (int8: one 128-byte line per weight row)
  k_splits: int = 8  # programs along K; K / k_splits must be a power of two
  block_k: int = 128  # weight rows per loop step
  num_warps: int = 4
  num_stages: int = 3
  # One row of activations: keep a [block_k, block_n] fp32 accumulator and reduce it across rows
  # once at the end, instead of a cross-thread reduction every step (not yet measured on a GPU).
  deferred_reduce: bool = False


# Measured choices per (rows bucket, K, N, weight bytes per element), from bench/decode_matmul.py;
# None: XLA measured faster. Int8 shapes not listed use `default_tiling`; float weights use the
# kernel only where listed.
TILINGS: dict[tuple[int, int, int, int], Optional[Tiling]] = {}

_TARGET_PROGRAMS = 512  # ~4 per multiprocessor on an H100/H200 (132 SMs)


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def row_bucket(m: int) -> int:
  """Rows the kernel computes for m activation rows: 1, or a power of two >= 16 (Triton dots)."""
  if m == 1:
    return 1
  return max(16, 1 << (m - 1).bit_length())


def k_splits_for(k: int) -> list[int]:
  """The k_splits that cut K into equal power-of-two chunks (the kernel's requirement), fewest
  first. Both default_tiling and the tiling sweep (bench/decode_matmul.py) choose from these."""
  return [s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 40, 64) if k % s == 0 and is_pow2(k // s)]


def default_tiling(m: int, k: int, n: int) -> Optional[Tiling]:
  """A tiling that divides the shape exactly with enough programs, or None (use XLA)."""
  block_n = 128
  if n % block_n:
    return None
  columns = n // block_n
  for splits in k_splits_for(k):
    chunk = k // splits
    if chunk >= 64 and (columns * splits >= _TARGET_PROGRAMS or chunk == 64):
      return Tiling(block_n=block_n, k_splits=splits, block_k=min(128, chunk))
  return None


def tiling_key(m: int, k: int, n: int, dtype) -> tuple[int, int, int, int]:
  return (row_bucket(m), k, n, jnp.dtype(dtype).itemsize)


def fits(tiling: Tiling, m: int, k: int, n: int) -> bool:
  chunk, rem = divmod(k, tiling.k_splits)
  return (
    m <= MAX_KERNEL_ROWS
    and n % tiling.block_n == 0
    and rem == 0
    and is_pow2(chunk)
    and is_pow2(tiling.block_n)
    and is_pow2(tiling.block_k)
    and chunk % tiling.block_k == 0
  )


def xla_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [M, K] @ w [K, N] -> fp32 [M, N], w cast to x's dtype right before the dot."""
  return jax.lax.dot_general(
    x, w.astype(x.dtype), (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )


def _kernel(x_ref, w_ref, out_ref, *, block_k: int, deferred_reduce: bool):
  """One program: x_ref [rows, chunk], w_ref [chunk, block_n] -> out_ref [rows, block_n] fp32."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  rows, chunk = x_ref.shape
  block_n = w_ref.shape[1]
  steps = chunk // block_k

  def load(i):
    ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
    return ks, w_ref[ks, :]

  if rows == 1 and deferred_reduce:

    def step(i, acc):
      ks, w = load(i)
      return acc + x_ref[0, ks].astype(jnp.float32)[:, None] * w.astype(jnp.float32)

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_k, block_n), jnp.float32))
    out_ref[...] = jnp.sum(acc, axis=0)[None, :]
    return

  def step(i, acc):
    ks, w = load(i)
    if rows == 1:
      # A vector: broadcast-multiply and reduce (a Triton dot needs >= 16 rows).
      x = x_ref[0, ks].astype(jnp.float32)
      return acc + jnp.sum(x[:, None] * w.astype(jnp.float32), axis=0)[None, :]
    x = x_ref[:, ks]
    return acc + plgpu.dot(x, w.astype(x.dtype))

  out_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((rows, block_n), jnp.float32))


def pallas_matmul(
  x: jax.Array, w: jax.Array, tiling: Tiling, *, interpret: Optional[bool] = None
) -> jax.Array:
  """x [M, K] @ w [K, N] -> fp32 [M, N] with the split-K kernel (see the module docstring).

  interpret: run in Pallas' interpreter; default: when not on a GPU.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  m, k = x.shape
  n = w.shape[1]
  if not fits(tiling, m, k, n):
    raise ValueError(f"tiling {tiling} does not fit [{m}, {k}] @ [{k}, {n}]")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  rows = row_bucket(m)
  if rows != m:
    x = jnp.pad(x, ((0, rows - m), (0, 0)))
  chunk = k // tiling.k_splits
  bn = tiling.block_n
  partial = pl.pallas_call(
    functools.partial(_kernel, block_k=tiling.block_k, deferred_reduce=tiling.deferred_reduce),
    out_shape=jax.ShapeDtypeStruct((tiling.k_splits, rows, n), jnp.float32),
    grid=(n // bn, tiling.k_splits),
    in_specs=[
      pl.BlockSpec((rows, chunk), lambda j, s: (0, s)),
      pl.BlockSpec((chunk, bn), lambda j, s: (s, j)),
    ],
    out_specs=pl.BlockSpec((pl.squeezed, rows, bn), lambda j, s: (s, 0, j)),
    compiler_params=plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages),
    interpret=interpret,
    name="decode_matmul_splitk",
  )(x, w)
  return partial.sum(axis=0)[:m]


def use_kernel(impl: str, m: int, k: int, n: int, weight_dtype=jnp.int8) -> Optional[Tiling]:
  """The tiling to run the kernel with, or None for the XLA path.

  "pallas": the kernel wherever a tiling fits (a measured one, else the default), on any
  backend. "auto": only on a GPU; where TILINGS has the shape, as it says; otherwise the kernel
  for int8 weights and a single row of activations (batch-1 decoding), XLA for everything else.
  On an H200 the kernel made 13B int8 batch-1 decoding 1.34x faster than XLA's product, while
  at 64 rows XLA's product was the faster one (BENCHMARKS.md, Sampling).
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown decode matmul {impl!r}; use one of {IMPLEMENTATIONS}")
  if impl == "xla" or (impl == "auto" and jax.default_backend() != "gpu"):
    return None
  key = tiling_key(m, k, n, weight_dtype)
  if impl == "pallas":
    tiling = TILINGS.get(key) or default_tiling(m, k, n)
  elif key in TILINGS:
    tiling = TILINGS[key]
  elif jnp.dtype(weight_dtype) == jnp.int8 and row_bucket(m) == 1:
    tiling = default_tiling(m, k, n)
  else:
    tiling = None
  return tiling if tiling is not None and fits(tiling, m, k, n) else None


def matmul(x: jax.Array, w: jax.Array, impl: str = "auto") -> jax.Array:
  """x [M, K] (compute dtype) @ w [K, N] (int8 or float) -> fp32 [M, N], by `impl`."""
  return _product(x, w, use_kernel(impl, x.shape[0], x.shape[1], w.shape[1], w.dtype))


def _product(x: jax.Array, w: jax.Array, tiling: Optional[Tiling]) -> jax.Array:
  return xla_matmul(x, w) if tiling is None else pallas_matmul(x, w, tiling)


def linear_interceptor(impl: str = "auto"):
  """An `nn.intercept_methods` interceptor computing Dense/DenseGeneral through `matmul`.

  A quantized linear (params kernel_q int8 [*in, *out], scale fp32 [*out]) always goes through
  it: (x @ Wq) * scale + bias, exact since the scale is constant along the contracted axes. A
  float linear goes through it only when `use_kernel` picks the kernel for its shape; otherwise
  Flax's own code runs.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"unknown decode matmul {impl!r}; use one of {IMPLEMENTATIONS}")

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral)):
      return next_fun(*args, **kwargs)
    (x,) = args
    features = module.features if isinstance(module.features, tuple) else (module.features,)
    quantized = module.has_variable("params", "kernel_q")
    if quantized:
      w = module.get_variable("params", "kernel_q")
      scale = module.get_variable("params", "scale")
    elif module.has_variable("params", "kernel"):
      w, scale = module.get_variable("params", "kernel"), None
    else:
      return next_fun(*args, **kwargs)  # being initialised
    nc = w.ndim - len(features)
    batch_shape = x.shape[: x.ndim - nc]
    k, n = math.prod(w.shape[:nc]), math.prod(features)
    rows = math.prod(batch_shape)
    tiling = use_kernel(impl, rows, k, n, w.dtype)
    if tiling is None and not quantized:
      return next_fun(*args, **kwargs)
    dtype = module.dtype or x.dtype
    # One [M, K] @ [K, N] product (free reshapes of contiguous arrays), accumulated in fp32.
    y = _product(x.astype(dtype).reshape(rows, k), w.reshape(k, n), tiling)
    if scale is not None:
      y = y * scale.reshape(n).astype(jnp.float32)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if bias is not None:
      y = y + bias.reshape(n).astype(jnp.float32)
    return y.astype(dtype).reshape(*batch_shape, *features)

  return intercept


def apply(model: nn.Module, variables: Any, *args, matmul_impl: str = "auto", **kwargs):
  """`model.apply(variables, ...)` with the blocks' linears computed here: quantized ones (int8
  `kernel_q` + `scale`) always, float ones where `matmul_impl` picks the kernel for their shape.
  Without either it is plain `model.apply`.

  matmul_impl: one of IMPLEMENTATIONS ("auto", "pallas", "xla").
  """
  with nn.intercept_methods(linear_interceptor(matmul_impl)):
    return model.apply(variables, *args, **kwargs)
