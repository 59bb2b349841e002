"""INT8 weight-only quantization of the 40 blocks' linears, dequantized inside the matmul.

As the release does (codegeex-facts.md §3): symmetric, per OUTPUT channel absmax,
`scale = max|W[:, out]| / 127`, `Wq = round(W / scale)` in int8, for the query, key, value,
attention dense, dense_h_to_4h and dense_4h_to_h kernels of every ordinary layer and of the top
query layer. Embeddings, LayerNorms and biases keep their dtype (W8A16 compute).

A quantized linear stores `kernel_q` (int8, the kernel's shape) and `scale` (fp32, the kernel's
output axes) in place of `kernel`. The model code is unchanged: `decode_matmul.apply` runs
`CodeGeeX.apply` under decode_matmul's interceptor, which computes such a Dense / DenseGeneral as
`(x @ Wq) * scale + bias` (exact: the scale is constant along the contracted axes): XLA's dot on
a widened Wq, or on a GPU at decode shapes a Pallas kernel that streams the int8 bytes once.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from geex_jax.model import codegeex as M

# Linear modules that get quantized (paths inside one block) and how many leading kernel axes
# each contracts: q/k/v [d, n, h] and the MLP kernels [in, out] contract 1, dense [n, h, d] 2.
QUANTIZED_LINEARS: dict[tuple[str, ...], int] = {
  ("attention", "query"): 1,
  ("attention", "key"): 1,
  ("attention", "value"): 1,
  ("attention", "dense"): 2,
  ("mlp", "dense_h_to_4h"): 1,
  ("mlp", "dense_4h_to_h"): 1,
}


def _block_names(params: Any) -> list[str]:
  """Top-level keys of the params tree that are transformer blocks (scanned or not)."""
  return [k for k in params if k == "layers" or k.startswith("layers_") or k == "top_query_layer"]


def quantize_kernel(
  kernel: jax.Array, num_contract: int, stacked: bool = False
) -> tuple[jax.Array, jax.Array]:
  """Per-output-channel absmax int8 of one kernel.

  kernel: [(L,) *in_axes, *out_axes] with `num_contract` input axes (after the optional stacked
  layer axis). Returns (kernel_q int8 of the same shape, scale fp32 [(L,) *out_axes]).
  """
  lead = 1 if stacked else 0
  reduce_axes = tuple(range(lead, lead + num_contract))
  w = kernel.astype(jnp.float32)
  scale = jnp.max(jnp.abs(w), axis=reduce_axes) / 127.0
  # An all-zero channel would divide by zero; any scale reproduces its zeros.
  scale = jnp.where(scale == 0, 1.0, scale)
  q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, reduce_axes)), -127, 127).astype(jnp.int8)
  return q, scale


def dequantize_kernel(
  kernel_q: jax.Array, scale: jax.Array, num_contract: int, stacked: bool = False
) -> jax.Array:
  """The fp32 kernel that (kernel_q, scale) stands for (tests, error reports)."""
  lead = 1 if stacked else 0
  return kernel_q.astype(jnp.float32) * jnp.expand_dims(
    scale, tuple(range(lead, lead + num_contract))
  )


def quantize_params(params: Any) -> Any:
  """A params tree with the blocks' linears replaced by {kernel_q, scale, bias}. Jittable.

  Works on the scanned (`layers` stacked on axis 0) and the unscanned (`layers_i`) layouts.
  """
  out = dict(params)
  for name in _block_names(params):
    stacked = name == "layers"
    block = {k: dict(v) if isinstance(v, dict) else v for k, v in params[name].items()}  # copies
    for (group, linear), nc in QUANTIZED_LINEARS.items():
      layer = dict(block[group][linear])
      q, scale = quantize_kernel(layer.pop("kernel"), nc, stacked)
      layer["kernel_q"], layer["scale"] = q, scale
      block[group] = {**block[group], linear: layer}
    out[name] = block
  return out


def is_quantized(params: Any) -> bool:
  for name in _block_names(params):
    return "kernel_q" in params[name]["attention"]["query"]
  return False


def quantized_logical_specs(config: M.CodeGeeXConfig) -> Any:
  """Logical PartitionSpecs of the quantized tree: kernel_q as the kernel, scale as its output
  axes (so a tensor-parallel mesh splits scales with their channels)."""
  specs = M.param_logical_specs(config)
  out = dict(specs)
  for name in _block_names(specs):
    lead = 1 if name == "layers" else 0
    block = {k: dict(v) if isinstance(v, dict) else v for k, v in specs[name].items()}
    for (group, linear), nc in QUANTIZED_LINEARS.items():
      layer = dict(block[group][linear])
      spec = tuple(layer.pop("kernel"))
      layer["kernel_q"] = PartitionSpec(*spec)
      layer["scale"] = PartitionSpec(*spec[:lead], *spec[lead + nc :])
      block[group] = {**block[group], linear: layer}
    out[name] = block
  return out


def params_bytes(params: Any) -> int:
  """Bytes of a params tree (arrays or ShapeDtypeStructs)."""
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def linear_bytes(params: Any, quantized: Optional[bool] = None) -> int:
  """Bytes of just the blocks' quantizable linears (kernel, or kernel_q + scale)."""
  total = 0
  for name in _block_names(params):
    for group, linear in QUANTIZED_LINEARS:
      layer = params[name][group][linear]
      for key in ("kernel", "kernel_q", "scale"):
        if key in layer:
          x = layer[key]
          total += x.size * jnp.dtype(x.dtype).itemsize
  return int(total)
