"""Full-sequence attention kernels, chosen by `CodeGeeXConfig.attention` (one table).

Each takes q, k, v [b, t, n, h], the dense mask `causal_segment_mask` (built once per step by
the model for the kernels that want one, else None) and the packed-document segment ids [b, t]
(0 = padding; None = one document per row); all are causal and return [b, t, n, h].
Decoding attends over the KV cache with `xla_attention` whatever the choice.

Only `xla` and `dot_product` run everywhere. `cudnn` needs an NVIDIA GPU and `splash` a TPU (on
other platforms it runs in Pallas interpret mode: slow, for tests only).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.errors import ConfigError
from geex_jax.model.precision import einsum_f32

Array = jax.Array

# Documents per row the cuDNN kernel separates (its segment arrays are [b, M]); a row with more
# merges its last ones (segment_lengths_and_offsets). 2048-token rows of source files rarely
# hold more than a few dozen.
CUDNN_MAX_SEGMENTS = 64


def causal_segment_mask(segment_ids: Optional[Array], length: int) -> Optional[Array]:
  """[b, 1, t, t] bool: causal, and within one packed document. None: plain causal."""
  if segment_ids is None:
    return None
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None]


def xla_attention(
  q: Array, k: Array, v: Array, mask: Optional[Array], kv_heads_first: bool = False
) -> Array:
  """Softmax attention with fp32 scores. q: [b, t, n, h]; k, v: [b, s, n, h], or [b, n, s, h]
  with kv_heads_first (the decode cache) -> [b, t, n, h]. mask: [b|1, 1, t, s] bool, or None
  (causal, the queries being the last t of the s keys)."""
  kv = "bnsh" if kv_heads_first else "bsnh"
  scale = 1.0 / np.sqrt(q.shape[-1])
  # fp32 scores whose backward products stay in the compute dtype (precision.einsum_f32).
  dtype = jnp.result_type(q.dtype, k.dtype)  # a cache may be stored in another dtype
  scores = einsum_f32(f"btnh,{kv}->bnts", q.astype(dtype), k.astype(dtype)) * scale
  if mask is None:
    t, s = q.shape[1], k.shape[2 if kv_heads_first else 1]
    mask = jnp.tril(jnp.ones((t, s), dtype=bool), k=s - t)[None, None]
  # A large finite negative, not -inf: a fully masked row (left padding) stays finite.
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum(f"bnts,{kv}->btnh", probs, v)


def _xla(q, k, v, mask, segment_ids):
  return xla_attention(q, k, v, mask)


def _dot_product(q, k, v, mask, segment_ids):
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)


def segment_lengths_and_offsets(segment_ids: Array, max_segments: int) -> tuple[Array, Array]:
  """cuDNN's packed layout of a row: (lengths [b, M], start offsets [b, M + 1]), -1 past the
  row's last segment (the layout of jax's cuDNN `dot_product_attention`: its example of three
  1-token segments has offsets [0, 1, 2, -1]).

  Segments are the runs of equal ids along a row (the packer's 1, 1, 2, 2, 2, 0, 0: padding is
  a run of its own). A row with more than M runs keeps its first M - 1 and merges the rest
  into the last one (those documents then see each other: raise M).
  """
  b, t = segment_ids.shape
  start = jnp.concatenate(
    [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  run = jnp.minimum(jnp.cumsum(start, axis=1) - 1, max_segments - 1)  # [b, t] run index
  lengths = jax.vmap(lambda r: jnp.bincount(r, length=max_segments))(run)  # [b, M]
  starts = jnp.cumsum(lengths, axis=1) - lengths
  used = jnp.arange(max_segments)[None] <= jnp.max(run, axis=1, keepdims=True)
  lengths = jnp.where(used, lengths, -1)
  offsets = jnp.concatenate([jnp.where(used, starts, -1), jnp.full((b, 1), -1)], axis=1)
  return lengths.astype(jnp.int32), offsets.astype(jnp.int32)


def _cudnn(q, k, v, mask, segment_ids):
  if segment_ids is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  # Packed documents as cuDNN segment lengths/offsets (its ragged layout), not a dense mask.
  # jax.nn.dot_product_attention (jax 0.10) takes per-row lengths only, so this calls the
  # function behind it.
  from jax._src.cudnn import fused_attention_stablehlo as cudnn

  lengths, offsets = segment_lengths_and_offsets(segment_ids, CUDNN_MAX_SEGMENTS)
  return cudnn.dot_product_attention(
    q,
    k,
    v,
    q_seqlen=lengths,
    kv_seqlen=lengths,
    q_offsets=offsets,
    kv_offsets=offsets,
    scale=1.0 / float(np.sqrt(q.shape[-1])),
    mask_type=cudnn.MaskType.CAUSAL,
    qkv_layout="BTNH",
  )


def _splash_kernel(num_heads: int, length: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(num_heads)])
  block = min(512, length)
  sizes = sk.BlockSizes(
    block_q=block,
    block_kv=block,
    block_kv_compute=block,
    block_q_dkv=block,
    block_kv_dkv=block,
    block_kv_dkv_compute=block,
    block_q_dq=block,
    block_kv_dq=block,
  )
  return sk, sk.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )


def _splash(q, k, v, mask, segment_ids):
  b, t, n, h = q.shape
  if t % 128:
    raise ConfigError(f"attention 'splash' needs a length divisible by 128, not {t}")
  sk, kernel = _splash_kernel(n, t, jax.default_backend() != "tpu")
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  to_heads = lambda x: x.transpose(0, 2, 1, 3)  # [b, n, t, h]
  q = to_heads(q * jnp.asarray(1.0 / np.sqrt(h), q.dtype))
  segments = sk.SegmentIds(q=segment_ids, kv=segment_ids)
  out = jax.vmap(kernel)(q, to_heads(k), to_heads(v), segment_ids=segments)
  return to_heads(out)


class Kernel(NamedTuple):
  fn: Callable  # fn(q, k, v, mask, segment_ids) -> [b, t, n, h]
  dense_mask: bool  # reads the [b, 1, t, t] mask (else the segment ids)


# name -> kernel. What each does on which platform: the module docstring.
ATTENTION_IMPLEMENTATIONS: dict[str, Kernel] = {
  "xla": Kernel(_xla, True),  # einsum + fp32 softmax
  "dot_product": Kernel(_dot_product, True),  # jax.nn.dot_product_attention, JAX's choice
  "cudnn": Kernel(_cudnn, False),  # cuDNN flash attention, documents as segment lengths
  "splash": Kernel(_splash, False),  # Pallas splash attention (TPU) with segment ids
}


def attend(
  name: str, q: Array, k: Array, v: Array, mask: Optional[Array], segment_ids: Optional[Array]
) -> Array:
  return ATTENTION_IMPLEMENTATIONS[name].fn(q, k, v, mask, segment_ids)
