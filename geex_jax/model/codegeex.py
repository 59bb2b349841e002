"""The CodeGeeX decoder in Flax (codegeex-facts.md §1).

A GPT-style pre-LayerNorm decoder: learned word + position embeddings, `num_layers` ordinary layers
(separate biased Q/K/V, FastGELU MLP), a final LayerNorm, then the "top query layer" whose queries
come from their own learned position table while its keys/values come from the LayerNormed hidden
state. Logits use the tied word embedding, with no LayerNorm after the top query layer.

Shapes: b = batch, t = query length, s = key length, n = heads, h = head dim, d = hidden, f = ffn.

Decode mode (`decode=True`) keeps a KV cache in the `cache` collection, preallocated to a max length
and written at a shared cache index, so one compiled step serves every row. Ragged prompts are
left-padded: a padding token has segment id 0, is written to the cache as an invalid key, and the
per-row position counter skips it, so every row's first real token gets position 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.model import attention as attention_lib
from geex_jax.model import remat
from geex_jax.model.precision import einsum_f32

Array = jax.Array

# Logical axis names used by this module. geex_jax/partitioning.py maps them to mesh axes.
# Parameters: vocab, embed, heads, kv (head dim), mlp, layers. Activations: batch, length,
# act_embed, act_heads, act_mlp, act_vocab, cache_length.

_DTYPES = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "fp16": jnp.float16,
}

REMAT_POLICIES = remat.REMAT_POLICIES  # none, dots, dots_no_batch, minimal, ..., full
ATTENTION_IMPLEMENTATIONS = tuple(attention_lib.ATTENTION_IMPLEMENTATIONS)


def as_dtype(name: Any) -> jnp.dtype:
  if not isinstance(name, str):
    return jnp.dtype(name)
  try:
    return jnp.dtype(_DTYPES[name])
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class CodeGeeXConfig:
  """Model hyper-parameters. `num_layers` counts the ordinary layers; the top query layer is extra.

  The defaults are the released CodeGeeX-13B shape (39 + 1 blocks, 12,873,943,040 parameters).
  """

  vocab_size: int = 52224
  hidden_size: int = 5120
  num_layers: int = 39
  num_heads: int = 40
  ffn_size: int = 20480
  max_position: int = 2048
  layernorm_eps: float = 1e-5
  init_std: float = 0.02
  dropout_rate: float = 0.0
  dtype: str = "float32"  # compute dtype of matmuls and the residual stream
  param_dtype: str = "float32"  # storage dtype of the parameters
  scan_layers: bool = True  # nn.scan over the ordinary layers (fast compiles at depth)
  remat_policy: str = "none"  # one of REMAT_POLICIES (geex_jax/model/remat.py)
  scan_unroll: int = 1  # layers per scan iteration (nn.scan unroll)
  # Full-sequence attention, one of ATTENTION_IMPLEMENTATIONS (geex_jax/model/attention.py):
  # xla, dot_product, cudnn (GPU), splash (TPU). Decoding attends over the KV cache with xla.
  attention: str = "xla"
  # Training loss: 0 = logits of the whole sequence at once; c > 0 = the cross-entropy of c
  # positions at a time, recomputed in the backward (never [b, t, vocab] fp32 logits live).
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(
        f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"unknown remat_policy {self.remat_policy!r}; use one of {sorted(REMAT_POLICIES)}"
      )
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
        f"unknown attention {self.attention!r}; use one of {ATTENTION_IMPLEMENTATIONS}"
      )
    if self.scan_unroll < 1 or self.loss_chunk_size < 0:
      raise ValueError(
        f"scan_unroll must be >= 1 (got {self.scan_unroll}) and loss_chunk_size >= 0 (got "
        f"{self.loss_chunk_size})"
      )
    as_dtype(self.dtype), as_dtype(self.param_dtype)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return as_dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return as_dtype(self.param_dtype)

  def replace(self, **changes) -> "CodeGeeXConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def preset(cls, name: str, **overrides) -> "CodeGeeXConfig":
    """A named size: tiny (tests), 350m, 1.3b, 2.7b, 13b (the released shape)."""
    try:
      shape = PRESETS[name.lower()]
    except KeyError:
      raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    return cls(**{**shape, **overrides})

  def num_params(self) -> int:
    """Exact parameter count, by formula (tests check it against the real tree)."""
    d, f, v, p = self.hidden_size, self.ffn_size, self.vocab_size, self.max_position
    per_layer = 4 * d + 4 * (d * d + d) + (d * f + f) + (f * d + d)
    return v * d + 2 * p * d + (self.num_layers + 1) * per_layer + 2 * d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), attention included."""
    d, f = self.hidden_size, self.ffn_size
    blocks = self.num_layers + 1
    matmul = blocks * (4 * d * d + 2 * d * f) + d * self.vocab_size
    attention = blocks * seq_len * d  # QK^T and PV, causal-halved: 2 * (t * d) / 2 * 2
    return 6.0 * matmul + 6.0 * attention


# Shapes of the presets. Only 13b was released; the smaller ones follow GPT-3's table with
# CodeGeeX's vocabulary and 4x FFN.
PRESETS: dict[str, dict[str, Any]] = {
  "tiny": dict(
    vocab_size=52224, hidden_size=64, num_layers=2, num_heads=4, ffn_size=256, max_position=128
  ),
  "350m": dict(hidden_size=1024, num_layers=23, num_heads=16, ffn_size=4096),
  "1.3b": dict(hidden_size=2048, num_layers=23, num_heads=16, ffn_size=8192),
  "2.7b": dict(hidden_size=2560, num_layers=31, num_heads=32, ffn_size=10240),
  "13b": dict(),
}


def fast_gelu(x: Array) -> Array:
  """CodeGeeX's FastGELU: x / (1 + exp(-1.702|x|)) * exp(0.851 (x - |x|)) == x sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _init(config: CodeGeeXConfig, axes: tuple[Optional[str], ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def layer_norm(config: CodeGeeXConfig, name: str, x: Array) -> Array:
  """LayerNorm computed in fp32 whatever the compute dtype; returns the compute dtype.

  Call inside a compact method: the nn.LayerNorm becomes a submodule called `name`.
  """
  norm = nn.LayerNorm(
    epsilon=config.layernorm_eps,
    dtype=jnp.float32,
    param_dtype=config.weight_dtype,
    scale_init=_ones(("embed",)),
    bias_init=_zeros(("embed",)),
    name=name,
  )
  return norm(x.astype(jnp.float32)).astype(config.compute_dtype)


_causal_segment_mask = attention_lib.causal_segment_mask
_xla_attention = attention_lib.xla_attention


def positions_from_segments(segment_ids: Array) -> Array:
  """Positions restarting at 0 at each new document of a packed row: [b, t] -> [b, t]."""
  t = segment_ids.shape[1]
  idx = jnp.arange(t, dtype=jnp.int32)[None]
  new_doc = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
    axis=1,
  )
  start = jax.lax.cummax(jnp.where(new_doc, idx, 0), axis=1)
  return idx - start


class Attention(nn.Module):
  """Multi-head attention with separate biased Q/K/V and an optional decode-time KV cache."""

  config: CodeGeeXConfig
  decode: bool = False

  @nn.compact
  def __call__(
    self,
    query_input: Array,
    kv_input: Array,
    mask: Optional[Array],
    cache_index: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
  ) -> Array:
    """query_input, kv_input: [b, t, d]. mask: [b|1, 1, t, t] or None (causal; None too for
    kernels that read segment_ids [b, t] instead); when decoding, [b, 1, t, cache length] over
    the cache. cache_index: the cache slot of this call's first token (decoding; None while the
    cache is being created).

    Returns [b, t, d].
    """
    cfg = self.config
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
    dense = functools.partial(
      nn.DenseGeneral,
      features=(n, h),
      axis=-1,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      kernel_init=_init(cfg, ("embed", "heads", "kv")),
      bias_init=_zeros(("heads", "kv")),
    )
    q = dense(name="query")(query_input)
    k = dense(name="key")(kv_input)
    v = dense(name="value")(kv_input)
    axes = ("batch", "length", "act_heads", "kv")
    q = remat.checkpoint_name(nn.with_logical_constraint(q, axes), remat.QUERY)
    k = remat.checkpoint_name(nn.with_logical_constraint(k, axes), remat.KEY)
    v = remat.checkpoint_name(nn.with_logical_constraint(v, axes), remat.VALUE)

    if self.decode:
      k, v = self._update_cache(k, v, cache_index)
      out = _xla_attention(q, k, v, mask, kv_heads_first=True)
    else:
      # Init only needs shapes: the plain path, whatever the platform (cudnn needs a GPU, splash
      # 128-multiple lengths) and whether a mask was made.
      impl = "xla" if self.is_initializing() else cfg.attention
      if impl == "xla" and mask is None and segment_ids is not None:
        mask = _causal_segment_mask(segment_ids, q.shape[1])
      out = attention_lib.attend(impl, q, k, v, mask, segment_ids)
    out = remat.checkpoint_name(nn.with_logical_constraint(out, axes), remat.CONTEXT)
    out = nn.DenseGeneral(
      features=d,
      axis=(-2, -1),
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      kernel_init=_init(cfg, ("heads", "kv", "embed")),
      bias_init=_zeros(("embed",)),
      name="dense",
    )(out)
    return remat.checkpoint_name(out, remat.OUT_PROJ)

  def _update_cache(self, k: Array, v: Array, index: Optional[Array]):
    """Writes this call's keys/values [b, t, n, h] at slot `index`; returns the whole cache.

    Cache layout [b, n, max_len, h], heads before length: both attention products read the
    cache as it lies (batch dims b, n leading). With [b, max_len, n, h], XLA copied every
    layer's whole cache into that order at every step (on the CPU, a quarter of a 350m
    batch-32 decode step). Which slots hold real tokens, the write index and the mask are kept
    once for all layers (`CodeGeeX._decode_mask`).
    """
    b, t, n, h = k.shape
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, n, t, h]: t is 1 per step
    # On init the call's length is the cache length (see init_cache).
    cached_k = self.variable("cache", "cached_key", jnp.zeros, (b, n, t, h), k.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, (b, n, t, h), v.dtype)
    if index is None:
      return k, v
    zero = jnp.zeros((), jnp.int32)
    cache_axes = ("batch", "act_heads", "cache_length", "kv")
    cached_k.value = nn.with_logical_constraint(
      jax.lax.dynamic_update_slice(
        cached_k.value, k.astype(cached_k.value.dtype), (zero, zero, index, zero)
      ),
      cache_axes,
    )
    cached_v.value = nn.with_logical_constraint(
      jax.lax.dynamic_update_slice(
        cached_v.value, v.astype(cached_v.value.dtype), (zero, zero, index, zero)
      ),
      cache_axes,
    )
    return cached_k.value, cached_v.value


class MLP(nn.Module):
  config: CodeGeeXConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    y = nn.Dense(
      cfg.ffn_size,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      kernel_init=_init(cfg, ("embed", "mlp")),
      bias_init=_zeros(("mlp",)),
      name="dense_h_to_4h",
    )(x)
    y = remat.checkpoint_name(y, remat.MLP_IN)
    y = nn.with_logical_constraint(fast_gelu(y), ("batch", "length", "act_mlp"))
    y = nn.Dense(
      cfg.hidden_size,
      dtype=cfg.compute_dtype,
      param_dtype=cfg.weight_dtype,
      kernel_init=_init(cfg, ("mlp", "embed")),
      bias_init=_zeros(("embed",)),
      name="dense_4h_to_h",
    )(y)
    return remat.checkpoint_name(y, remat.MLP_OUT)


class Block(nn.Module):
  """One pre-LN layer. The top query layer is the same block fed a separate query input."""

  config: CodeGeeXConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(
    self,
    h: Array,
    mask: Optional[Array],
    cache_index: Optional[Array],
    segment_ids: Optional[Array] = None,
    query_input: Optional[Array] = None,
  ):
    cfg = self.config
    x = layer_norm(cfg, "input_layernorm", h)
    q_in = x if query_input is None else query_input
    a = Attention(cfg, decode=self.decode, name="attention")(
      q_in, x, mask, cache_index, segment_ids
    )
    h = h + nn.Dropout(cfg.dropout_rate)(a, deterministic=self.deterministic)
    m = MLP(cfg, name="mlp")(layer_norm(cfg, "post_attention_layernorm", h))
    h = h + nn.Dropout(cfg.dropout_rate)(m, deterministic=self.deterministic)
    h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))
    return h, None


class CodeGeeX(nn.Module):
  """The CodeGeeX decoder. `apply({'params': p}, tokens)` -> fp32 logits [b, t, vocab]."""

  config: CodeGeeXConfig

  @nn.compact
  def __call__(
    self,
    tokens: Array,
    positions: Optional[Array] = None,
    segment_ids: Optional[Array] = None,
    *,
    decode: bool = False,
    deterministic: bool = True,
    only_last: bool = False,
    return_hidden: bool = False,
  ) -> Array:
    """tokens, positions, segment_ids: int [b, t].

    segment_ids: packed documents (never attend across; 0 = padding). In decode mode they mark
      real (1) vs left-padding (0) tokens, and positions default to a per-row running count.
    only_last: return logits of the last position only, [b, 1, vocab] (saves the [b, t, vocab]
      prefill logits when sampling).
    return_hidden: return the top layer's output [b, t, d] (compute dtype) instead of logits;
      `output_logits` turns it into them (the chunked training loss does, a chunk at a time).
    """
    cfg = self.config
    dtype = cfg.compute_dtype
    b, t = tokens.shape
    if decode:
      kv_valid = (
        jnp.ones((b, t), jnp.int32) if segment_ids is None else (segment_ids != 0).astype(jnp.int32)
      )
      if positions is None:
        positions = self._decode_positions(kv_valid)
      mask, cache_index = self._decode_mask(kv_valid)
    else:
      cache_index = None
      if positions is None:
        positions = (
          jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
          if segment_ids is None
          else positions_from_segments(segment_ids)
        )
      dense = attention_lib.ATTENTION_IMPLEMENTATIONS[cfg.attention].dense_mask
      mask = _causal_segment_mask(segment_ids, t) if dense else None

    embed = functools.partial(
      nn.Embed, features=cfg.hidden_size, dtype=dtype, param_dtype=cfg.weight_dtype
    )
    word = embed(
      cfg.vocab_size, embedding_init=_init(cfg, ("vocab", "embed")), name="word_embeddings"
    )
    h = word(tokens) + embed(
      cfg.max_position, embedding_init=_init(cfg, (None, "embed")), name="position_embeddings"
    )(positions)
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    h = nn.with_logical_constraint(h, ("batch", "length", "act_embed"))

    block = Block
    if cfg.remat_policy != "none":
      block = nn.remat(
        Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
      )
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        unroll=cfg.scan_unroll,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      h, _ = stack(cfg, decode=decode, deterministic=deterministic, name="layers")(
        h, mask, cache_index, segment_ids
      )
    else:
      for i in range(cfg.num_layers):
        h, _ = block(cfg, decode=decode, deterministic=deterministic, name=f"layers_{i}")(
          h, mask, cache_index, segment_ids
        )

    h = layer_norm(cfg, "final_layernorm", h)
    top_query = embed(
      cfg.max_position, embedding_init=_init(cfg, (None, "embed")), name="top_query_embeddings"
    )(positions)
    h, _ = Block(cfg, decode=decode, deterministic=deterministic, name="top_query_layer")(
      h, mask, cache_index, segment_ids, query_input=top_query
    )

    if only_last:
      h = h[:, -1:]
    if return_hidden:
      return h
    return output_logits(cfg, h, word.embedding)

  def _decode_mask(self, kv_valid: Array) -> tuple[Array, Optional[Array]]:
    """(attention mask [b, 1, t, cache length], cache slot of this call's first token) for a
    decode call; records which slots hold real tokens (`kv_valid` [b, t]: 0 = left padding).

    Kept here once rather than in every layer's cache: per decode step it is one small update
    and one mask for all layers. While the cache is created (init) the slot is None.
    """
    b, t = kv_valid.shape
    is_init = not self.has_variable("cache", "key_valid")
    # On init the call's length is the cache length (see init_cache).
    valid = self.variable("cache", "key_valid", jnp.zeros, (b, t), jnp.bool_)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if is_init:
      return _causal_segment_mask(kv_valid, t), None
    i = index.value
    valid.value = jax.lax.dynamic_update_slice(
      valid.value, kv_valid.astype(jnp.bool_), (jnp.zeros((), jnp.int32), i)
    )
    index.value = i + t
    # Query j of this call sits at slot i + j and sees the valid slots <= i + j.
    slots = jnp.arange(valid.value.shape[1], dtype=jnp.int32)
    causal = slots[None, :] <= (i + jnp.arange(t, dtype=jnp.int32))[:, None]  # [t, s]
    return causal[None, None] & valid.value[:, None, None, :], i  # [b, 1, t, s]

  def _decode_positions(self, kv_valid: Array) -> Array:
    """Per-row positions in decode mode: a running count of real tokens, skipping padding."""
    b = kv_valid.shape[0]
    seen = self.variable("cache", "tokens_seen", jnp.zeros, (b,), jnp.int32)
    positions = seen.value[:, None] + jnp.cumsum(kv_valid, axis=1) - 1
    if not self.is_initializing():
      seen.value = seen.value + kv_valid.sum(axis=1)
    return jnp.maximum(positions, 0).astype(jnp.int32)


def output_logits(config: CodeGeeXConfig, h: Array, embedding: Array) -> Array:
  """fp32 logits [b, t, vocab] of the top layer's output h [b, t, d] with the tied embedding
  [vocab, d]: accumulated and returned in fp32, the backward in the compute dtype."""
  dtype = config.compute_dtype
  logits = einsum_f32("btd,vd->btv", h.astype(dtype), embedding.astype(dtype))
  return nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))


# ---------------------------------------------------------------------------------------------
# Helpers around the module: parameters, cache, layouts.


def init_params(config: CodeGeeXConfig, rng: Array) -> Any:
  """Random parameters (normal(0, init_std) weights, zero biases, unit LayerNorm scales)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return nn.unbox(CodeGeeX(config).init(rng, tokens)["params"])


def abstract_params(config: CodeGeeXConfig) -> Any:
  """Parameter shapes/dtypes (boxed with their logical axis names) without allocating them."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(lambda t: CodeGeeX(config).init(jax.random.key(0), t), tokens)["params"]


def param_logical_specs(config: CodeGeeXConfig) -> Any:
  """A tree of PartitionSpecs of logical axis names, matching the params tree."""
  return nn.get_partition_spec(abstract_params(config))


def count_params(params: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_cache(
  config: CodeGeeXConfig, batch: int, max_length: int, dtype: Optional[Any] = None
) -> Any:
  """An empty KV cache for `batch` rows and `max_length` slots (zeros, cache index 0).

  Cache leaves with a batch axis have it first, or second (after `layers`) under scan_layers.
  """
  if max_length > config.max_position:
    raise ValueError(f"max_length {max_length} exceeds the model's {config.max_position} positions")
  cfg = config if dtype is None else config.replace(dtype=jnp.dtype(dtype).name)
  tokens = jax.ShapeDtypeStruct((batch, max_length), jnp.int32)
  shapes = jax.eval_shape(lambda t: CodeGeeX(cfg).init(jax.random.key(0), t, decode=True), tokens)[
    "cache"
  ]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes))


def cache_batch_axis(config: CodeGeeXConfig, path: tuple) -> Optional[int]:
  """The batch axis of a cache leaf at `path` (tuple of keys), or None for the cache index."""
  name = str(path[-1])
  if "cache_index" in name:
    return None
  in_scan = config.scan_layers and any("layers" == str(getattr(p, "key", p)) for p in path)
  return 1 if in_scan else 0


def map_cache_batch(config: CodeGeeXConfig, cache: Any, fn) -> Any:
  """Applies fn(leaf, batch_axis) to every cache leaf that has a batch axis (beam reorders,
  repeating a prefilled cache for several samples)."""

  def visit(path, x):
    keys = tuple(getattr(p, "key", p) for p in path)
    axis = cache_batch_axis(config, keys)
    return x if axis is None else fn(x, axis)

  return jax.tree_util.tree_map_with_path(visit, cache)


def stack_layers(params: Any, num_layers: int) -> Any:
  """Unscanned layout (layers_0..layers_{L-1}) -> scanned layout (one `layers` subtree)."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def unstack_layers(params: Any, num_layers: int) -> Any:
  """Scanned layout -> unscanned layout (layers_0..layers_{L-1})."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


def convert_layout(params: Any, config: CodeGeeXConfig, scan_layers: bool) -> Any:
  """Returns params in the scanned or unscanned layout, whichever `scan_layers` asks for."""
  is_scanned = "layers" in params
  if is_scanned == scan_layers:
    return params
  return (
    stack_layers(params, config.num_layers)
    if scan_layers
    else unstack_layers(params, config.num_layers)
  )
