"""The ONE mapping between the released PyTorch state dict and the geex-jax parameter tree.

Every row is (torch name, flax path, transform). Both conversion directions read this table; the
layer rows are written once and expanded for layers 0..L-1 and for the top query layer.

Torch names are the "released names": keys of the released checkpoint below
`module.language_model`, with the transformer's flat dotted keys prefixed by `transformer.`
(e.g. `transformer.layers.3.attention.query.weight`). Flax paths are "/"-joined keys of the
unscanned params tree (`layers_3/attention/query/kernel`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Optional

import numpy as np

from geex_jax.model.codegeex import CodeGeeXConfig


@dataclasses.dataclass(frozen=True)
class Transform:
  """A shape transform between a torch tensor and a flax array (both numpy here)."""

  name: str
  to_flax: Callable[[np.ndarray, CodeGeeXConfig], np.ndarray]
  to_torch: Callable[[np.ndarray, CodeGeeXConfig], np.ndarray]


def _heads(c: CodeGeeXConfig) -> tuple[int, int]:
  return c.num_heads, c.head_dim


IDENTITY = Transform("identity", lambda x, c: x, lambda x, c: x)
# nn.Linear [out, in] -> Dense kernel [in, out].
LINEAR = Transform("linear", lambda x, c: x.T, lambda x, c: x.T)
# Q/K/V Linear [n*h, d] -> DenseGeneral kernel [d, n, h].
LINEAR_TO_HEADS = Transform(
  "linear_to_heads",
  lambda x, c: x.T.reshape(x.shape[1], *_heads(c)),
  lambda x, c: x.reshape(x.shape[0], -1).T,
)
# Q/K/V bias [n*h] -> [n, h].
BIAS_TO_HEADS = Transform(
  "bias_to_heads", lambda x, c: x.reshape(*_heads(c)), lambda x, c: x.reshape(-1)
)
# attention.dense Linear [d, n*h] -> DenseGeneral kernel [n, h, d].
LINEAR_FROM_HEADS = Transform(
  "linear_from_heads",
  lambda x, c: x.T.reshape(*_heads(c), x.shape[0]),
  lambda x, c: x.reshape(-1, x.shape[-1]).T,
)

# (torch suffix within a layer, flax subpath within a layer, transform)
LAYER_ROWS: tuple[tuple[str, str, Transform], ...] = (
  ("input_layernorm.weight", "input_layernorm/scale", IDENTITY),
  ("input_layernorm.bias", "input_layernorm/bias", IDENTITY),
  ("attention.query.weight", "attention/query/kernel", LINEAR_TO_HEADS),
  ("attention.query.bias", "attention/query/bias", BIAS_TO_HEADS),
  ("attention.key.weight", "attention/key/kernel", LINEAR_TO_HEADS),
  ("attention.key.bias", "attention/key/bias", BIAS_TO_HEADS),
  ("attention.value.weight", "attention/value/kernel", LINEAR_TO_HEADS),
  ("attention.value.bias", "attention/value/bias", BIAS_TO_HEADS),
  ("attention.dense.weight", "attention/dense/kernel", LINEAR_FROM_HEADS),
  ("attention.dense.bias", "attention/dense/bias", IDENTITY),
  ("post_attention_layernorm.weight", "post_attention_layernorm/scale", IDENTITY),
  ("post_attention_layernorm.bias", "post_attention_layernorm/bias", IDENTITY),
  ("mlp.dense_h_to_4h.weight", "mlp/dense_h_to_4h/kernel", LINEAR),
  ("mlp.dense_h_to_4h.bias", "mlp/dense_h_to_4h/bias", IDENTITY),
  ("mlp.dense_4h_to_h.weight", "mlp/dense_4h_to_h/kernel", LINEAR),
  ("mlp.dense_4h_to_h.bias", "mlp/dense_4h_to_h/bias", IDENTITY),
)

GLOBAL_ROWS: tuple[tuple[str, str, Transform], ...] = (
  ("embedding.word_embeddings.weight", "word_embeddings/embedding", IDENTITY),
  ("embedding.position_embeddings.weight", "position_embeddings/embedding", IDENTITY),
  ("topQueryEmbedding.top_query_embeddings.weight", "top_query_embeddings/embedding", IDENTITY),
  ("transformer.final_layernorm.weight", "final_layernorm/scale", IDENTITY),
  ("transformer.final_layernorm.bias", "final_layernorm/bias", IDENTITY),
)

TOP_LAYER_TORCH = "transformer.topQueryLayer"
TOP_LAYER_FLAX = "top_query_layer"


def rows(config: CodeGeeXConfig) -> Iterator[tuple[str, str, Transform]]:
  """Every (torch name, flax path, transform) of a model with `config`, in checkpoint order."""
  yield from GLOBAL_ROWS[:3]
  for i in range(config.num_layers):
    for t_suffix, f_sub, transform in LAYER_ROWS:
      yield f"transformer.layers.{i}.{t_suffix}", f"layers_{i}/{f_sub}", transform
  for t_suffix, f_sub, transform in LAYER_ROWS:
    yield f"{TOP_LAYER_TORCH}.{t_suffix}", f"{TOP_LAYER_FLAX}/{f_sub}", transform
  yield from GLOBAL_ROWS[3:]


# --- The released nesting: {'module': {'language_model': {embedding, topQueryEmbedding,
# transformer}}}, where `transformer` is a flat dict of dotted names. -----------------------------

_NESTED_GROUPS = ("embedding", "topQueryEmbedding")


def nest_released(flat: dict) -> dict:
  """Released names -> the released nested checkpoint dict."""
  lm: dict = {"embedding": {}, "topQueryEmbedding": {}, "transformer": {}}
  for name, value in flat.items():
    group, rest = name.split(".", 1)
    if group == "transformer":
      lm["transformer"][rest] = value
    elif group in _NESTED_GROUPS:
      module, param = rest.rsplit(".", 1)
      lm[group].setdefault(module, {})[param] = value
    else:
      raise KeyError(f"not a released parameter name: {name}")
  return {"module": {"language_model": lm}}


def flatten_released(checkpoint: dict) -> dict:
  """The released nested checkpoint dict -> {released name: tensor}. Raises KeyError on bad
  nesting."""
  try:
    lm = checkpoint["module"]["language_model"]
  except (KeyError, TypeError):
    raise KeyError("expected the released nesting checkpoint['module']['language_model']") from None
  flat = {}
  for group in _NESTED_GROUPS:
    for module, params in lm.get(group, {}).items():
      for param, value in params.items():
        flat[f"{group}.{module}.{param}"] = value
  for name, value in lm.get("transformer", {}).items():
    flat[f"transformer.{name}"] = value
  return flat


def get_path(tree: dict, path: str):
  node = tree
  for key in path.split("/"):
    node = node[key]
  return node


def set_path(tree: dict, path: str, value) -> None:
  keys = path.split("/")
  node = tree
  for key in keys[:-1]:
    node = node.setdefault(key, {})
  node[keys[-1]] = value


def released_to_params(flat: dict, config: CodeGeeXConfig) -> dict:
  """{released name: numpy array} -> unscanned geex-jax params (numpy). Strict on keys."""
  expected = {t for t, _, _ in rows(config)}
  missing, extra = expected - flat.keys(), flat.keys() - expected
  if missing or extra:
    raise KeyError(
      f"state dict does not match the model: missing {sorted(missing)[:5]}, "
      f"unexpected {sorted(extra)[:5]}"
    )
  params: dict = {}
  for torch_name, flax_path, transform in rows(config):
    set_path(params, flax_path, transform.to_flax(np.asarray(flat[torch_name]), config))
  return params


def params_to_released(params: dict, config: CodeGeeXConfig) -> dict:
  """Unscanned geex-jax params -> {released name: numpy array}."""
  return {
    torch_name: transform.to_torch(np.asarray(get_path(params, flax_path)), config)
    for torch_name, flax_path, transform in rows(config)
  }


# --- Layout variants around the table: fused Q/K/V and model-parallel shards (facts §3). -------

# A fused tensor is the concatenation of its parts on dim 0 (weight and bias alike):
# (fused suffix within a layer, part suffixes in concat order, layers it occurs in).
# The top query layer keeps its query separate (its queries come from the top query table).
FUSED_ROWS: tuple[tuple[str, tuple[str, ...], str], ...] = (
  ("attention.query_key_value", ("attention.query", "attention.key", "attention.value"), "layers"),
  ("attention.key_value", ("attention.key", "attention.value"), "topQueryLayer"),
)

# How model-parallel shards split each tensor: (released-name suffix, torch dim), None meaning
# replicated. Matched by suffix, first match wins; every released name matches one rule.
# Column-parallel linears split their output rows (dim 0, bias too); row-parallel linears split
# their input columns (dim 1) and replicate the bias.
SPLIT_RULES: tuple[tuple[str, Optional[int]], ...] = (
  ("word_embeddings.weight", 0),
  ("top_query_embeddings.weight", 0),
  ("position_embeddings.weight", None),
  ("attention.query.weight", 0),
  ("attention.query.bias", 0),
  ("attention.key.weight", 0),
  ("attention.key.bias", 0),
  ("attention.value.weight", 0),
  ("attention.value.bias", 0),
  ("mlp.dense_h_to_4h.weight", 0),
  ("mlp.dense_h_to_4h.bias", 0),
  ("attention.dense.weight", 1),
  ("attention.dense.bias", None),
  ("mlp.dense_4h_to_h.weight", 1),
  ("mlp.dense_4h_to_h.bias", None),
  ("layernorm.weight", None),
  ("layernorm.bias", None),
)


def split_axis(name: str) -> Optional[int]:
  """The torch dim along which model-parallel shards split released tensor `name` (None:
  replicated)."""
  for suffix, axis in SPLIT_RULES:
    if name.endswith(suffix):
      return axis
  raise KeyError(f"no split rule for {name}")


def fused_parts(name: str) -> Optional[tuple[str, ...]]:
  """The released names a fused tensor `name` concatenates (on dim 0), or None if not fused.

  `transformer.layers.3.attention.query_key_value.weight` -> (`...layers.3.attention.query.weight`,
  `...key.weight`, `...value.weight`).
  """
  for fused, parts, where in FUSED_ROWS:
    for kind in ("weight", "bias"):
      tail = f"{fused}.{kind}"
      if name.endswith("." + tail):
        prefix = name[: -len(tail)]
        scope = prefix.split(".")[1] if prefix.startswith("transformer.") else None
        if scope == where:
          return tuple(f"{prefix}{p}.{kind}" for p in parts)
  return None


def fuse_released(flat: dict, concat: Callable) -> dict:
  """{released name: tensor} -> the fused-QKV variant (for tests and tools that want it).
  concat(list, axis) joins tensors (np.concatenate or torch.cat)."""
  out = dict(flat)
  for name in list(flat):
    for fused, parts, where in FUSED_ROWS:
      for kind in ("weight", "bias"):
        first = f"{parts[0]}.{kind}"
        if name.endswith("." + first) and name.split(".")[1] == where:
          prefix = name[: -len(first)]
          names = [f"{prefix}{p}.{kind}" for p in parts]
          out[f"{prefix}{fused}.{kind}"] = concat([out.pop(n) for n in names], 0)
  return out


def split_released(flat: dict, num_shards: int) -> list[dict]:
  """{released name: array} -> one dict per model-parallel rank, per SPLIT_RULES (in memory;
  the converter streams the same rule tensor by tensor)."""
  shards: list[dict] = [{} for _ in range(num_shards)]
  for name, value in flat.items():
    axis = split_axis(name)
    for rank in range(num_shards):
      if axis is None:
        shards[rank][name] = value
      else:
        size = value.shape[axis] // num_shards
        index = [slice(None)] * value.ndim
        index[axis] = slice(rank * size, (rank + 1) * size)
        shards[rank][name] = value[tuple(index)]
  return shards


def scanned_path(flax_path: str) -> tuple[str, Optional[int]]:
  """An unscanned flax path -> (its path in the scanned layout, layer index or None).
  `layers_3/mlp/dense_h_to_4h/kernel` -> (`layers/mlp/dense_h_to_4h/kernel`, 3)."""
  head, _, rest = flax_path.partition("/")
  if head.startswith("layers_") and head[len("layers_") :].isdigit():
    return f"layers/{rest}", int(head[len("layers_") :])
  return flax_path, None
