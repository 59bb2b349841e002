"""geex_jax/inference/quantization.py: INT8 weight-only quantization (per-output-channel absmax)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.inference import decode_matmul
from geex_jax.model import codegeex as M
from geex_jax.model import partitioning
from geex_jax.inference import quantization as Q
from geex_jax.inference import decoding as D


@pytest.fixture(scope="module")
def tiny():
  cfg = M.CodeGeeXConfig.preset("tiny")
  params = M.init_params(cfg, jax.random.key(0))
  # Non-trivial biases so the int8 path's bias handling is exercised.
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: x + 0.05 if "bias" in str(p[-1]) else x, params
  )
  return cfg, params


def test_kernel_roundtrip_is_per_output_channel_absmax():
  w = jax.random.normal(jax.random.key(1), (3, 16, 4, 8)) * jnp.arange(1, 33).reshape(4, 8)
  q, scale = Q.quantize_kernel(w, 1, stacked=True)
  assert q.dtype == jnp.int8 and scale.shape == (3, 4, 8)
  np.testing.assert_allclose(scale, jnp.abs(w).max(axis=1) / 127, rtol=1e-6)
  assert int(jnp.abs(q.astype(jnp.int32)).max()) == 127
  back = Q.dequantize_kernel(q, scale, 1, stacked=True)
  assert float(jnp.max(jnp.abs(back - w) / scale[:, None])) <= 0.5 + 1e-5  # half a step


def test_only_block_linears_are_quantized(tiny):
  _, params = tiny
  q = Q.quantize_params(params)
  assert Q.is_quantized(q) and not Q.is_quantized(params)
  for block in ("layers", "top_query_layer"):
    for group, linear in Q.QUANTIZED_LINEARS:
      layer = q[block][group][linear]
      assert set(layer) == {"kernel_q", "scale", "bias"} and layer["kernel_q"].dtype == jnp.int8
  assert q["word_embeddings"]["embedding"].dtype == jnp.float32
  assert q["layers"]["input_layernorm"]["scale"].dtype == jnp.float32


@pytest.mark.parametrize("scan", [True, False])
def test_int8_logits_close_to_bf16(tiny, scan):
  cfg, params = tiny
  cfg = cfg.replace(scan_layers=scan, dtype="bfloat16", param_dtype="bfloat16")
  params = M.convert_layout(params, cfg, scan)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  q = Q.quantize_params(bf16)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50400, (2, 24)))
  model = M.CodeGeeX(cfg)
  ref = model.apply({"params": bf16}, tokens)
  got = decode_matmul.apply(model, {"params": q}, tokens)
  diff = np.abs(np.asarray(got - ref))
  scale = float(np.abs(np.asarray(ref)).max())
  print(
    f"int8 vs bf16 logits: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}, "
    f"max |logit| {scale:.3f}"
  )
  assert diff.max() < 0.05 * scale and diff.mean() < 0.01 * scale
  # The argmax (greedy next token) almost always agrees.
  assert np.mean(np.argmax(got, -1) == np.argmax(ref, -1)) > 0.9


def test_params_memory_about_half_of_bf16(tiny):
  _, params = tiny
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  q = Q.quantize_params(bf16)
  ratio = Q.linear_bytes(q) / Q.linear_bytes(bf16)
  assert 0.5 <= ratio < 0.55  # int8 kernels + fp32 per-channel scales
  # Whole model at 13B (shapes only): embeddings stay bf16, still ~half.
  cfg = M.CodeGeeXConfig.preset("13b", param_dtype="bfloat16")
  abstract = nn.unbox(M.abstract_params(cfg))
  qa = jax.eval_shape(Q.quantize_params, abstract)
  full, small = Q.params_bytes(abstract), Q.params_bytes(qa)
  assert full == 2 * 12_873_943_040
  assert 0.5 < small / full < 0.53, small / full


def test_quantized_params_shard_and_sample(tiny):
  cfg, params = tiny
  q = Q.quantize_params(params)
  mesh = partitioning.make_mesh(data=1, fsdp=1, model=4, devices=jax.devices()[:4])
  sharded = partitioning.shard_params(q, Q.quantized_logical_specs(cfg), mesh)
  assert sharded["layers"]["attention"]["query"][
    "scale"
  ].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  prompts = [[1, 2, 3, 4], [5, 6]]
  a = D.generate_ids(cfg, q, prompts, max_new_tokens=6, eos_id=-1)
  b = D.generate_ids(cfg, sharded, prompts, max_new_tokens=6, eos_id=-1, mesh=mesh)
  assert a.tokens == b.tokens
