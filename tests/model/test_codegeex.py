"""geex_jax/model/codegeex.py: parameter count, PyTorch parity, decode, packing, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from geex_jax.conversion import table
from geex_jax.conversion.torch_reference import CodeGeeXTorch
from geex_jax.model import codegeex as M
from geex_jax.model import partitioning


def tiny(**kw):
  return M.CodeGeeXConfig.preset("tiny", **kw)


@pytest.fixture(scope="module")
def reference():
  """A PyTorch reference with random weights (biases and LayerNorms randomised too) and the
  same weights as geex-jax params, via the conversion table."""
  torch.manual_seed(0)
  cfg = tiny(scan_layers=False)
  ref = CodeGeeXTorch(cfg).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.dim() == 1:  # non-trivial biases and LayerNorm affine params
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
  flat = {k: v.numpy() for k, v in ref.released_state_dict().items()}
  params = jax.tree.map(jnp.asarray, table.released_to_params(flat, cfg))
  return cfg, ref, params


def test_13b_parameter_count_is_exact():
  cfg = M.CodeGeeXConfig.preset("13b")
  assert M.count_params(M.abstract_params(cfg)) == 12_873_943_040
  assert cfg.num_params() == 12_873_943_040
  assert cfg.num_layers + 1 == 40 and cfg.head_dim == 128 and cfg.vocab_size == 52224


@pytest.mark.parametrize("name", ["tiny", "350m", "1.3b", "2.7b"])
def test_presets_formula_matches_tree(name):
  cfg = M.CodeGeeXConfig.preset(name)
  assert M.count_params(M.abstract_params(cfg)) == cfg.num_params()


def test_fast_gelu_matches_released_formula():
  x = jnp.linspace(-8, 8, 1001)
  released = x / (1 + jnp.exp(-1.702 * jnp.abs(x))) * jnp.exp(0.851 * (x - jnp.abs(x)))
  np.testing.assert_allclose(M.fast_gelu(x), released, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_parity_with_torch_reference(reference, scan):
  cfg, ref, params = reference
  tokens = np.random.RandomState(0).randint(0, 50400, size=(2, 48))
  with torch.no_grad():
    expected, _ = ref(torch.from_numpy(tokens))
  cfg = cfg.replace(scan_layers=scan)
  params = M.convert_layout(params, cfg, scan)
  got = M.CodeGeeX(cfg).apply({"params": params}, jnp.asarray(tokens))
  assert got.dtype == jnp.float32 and got.shape == (2, 48, cfg.vocab_size)
  assert np.abs(np.asarray(got) - expected.numpy()).max() <= 1e-4


def test_dot_product_attention_matches_xla(reference):
  cfg, _, params = reference
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50400, size=(2, 20)))
  a = M.CodeGeeX(cfg).apply({"params": params}, tokens)
  b = M.CodeGeeX(cfg.replace(attention="dot_product")).apply({"params": params}, tokens)
  assert np.abs(np.asarray(a - b)).max() <= 1e-4


def test_remat_does_not_change_logits(reference):
  cfg, _, params = reference
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, 50400, size=(1, 12)))
  a = M.CodeGeeX(cfg).apply({"params": params}, tokens)
  b = M.CodeGeeX(cfg.replace(remat_policy="full")).apply({"params": params}, tokens)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_matches_full_forward_ragged_batch(reference, scan):
  """Left-padded prompts of lengths 5, 9 and 12, prefill then 8 single-token steps."""
  cfg, _, params = reference
  cfg = cfg.replace(scan_layers=scan)
  params = M.convert_layout(params, cfg, scan)
  model = M.CodeGeeX(cfg)
  rng = np.random.RandomState(3)
  lengths, steps, prompt_len = [5, 9, 12], 8, 12
  seqs = [rng.randint(0, 50400, size=n + steps) for n in lengths]
  tokens = np.zeros((3, prompt_len), np.int32)
  valid = np.zeros((3, prompt_len), np.int32)
  for r, n in enumerate(lengths):
    tokens[r, prompt_len - n :] = seqs[r][:n]
    valid[r, prompt_len - n :] = 1
  cache = M.init_cache(cfg, 3, prompt_len + steps)
  logits, state = model.apply(
    {"params": params, "cache": cache},
    jnp.asarray(tokens),
    segment_ids=jnp.asarray(valid),
    decode=True,
    mutable=["cache"],
  )
  step_logits = [logits[:, -1]]
  for i in range(steps - 1):
    nxt = np.array([seqs[r][n + i] for r, n in enumerate(lengths)])[:, None]
    logits, state = model.apply(
      {"params": params, "cache": state["cache"]}, jnp.asarray(nxt), decode=True, mutable=["cache"]
    )
    step_logits.append(logits[:, -1])
  for r, n in enumerate(lengths):
    full = model.apply({"params": params}, jnp.asarray(seqs[r][None, : n + steps - 1]))
    for i in range(steps):
      diff = np.abs(np.asarray(step_logits[i][r] - full[0, n - 1 + i])).max()
      assert diff <= 1e-4, (r, i, diff)


def test_only_last_returns_last_position(reference):
  cfg, _, params = reference
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 50400, size=(2, 10)))
  full = M.CodeGeeX(cfg).apply({"params": params}, tokens)
  last = M.CodeGeeX(cfg).apply({"params": params}, tokens, only_last=True)
  np.testing.assert_allclose(last[:, 0], full[:, -1], atol=1e-6)


def test_packed_documents_do_not_see_each_other(reference):
  cfg, _, params = reference
  model = M.CodeGeeX(cfg)
  rng = np.random.RandomState(5)
  a, b = rng.randint(0, 50400, size=7), rng.randint(0, 50400, size=11)
  packed = np.concatenate([a, b, [0, 0]])[None]
  segments = np.array([[1] * 7 + [2] * 11 + [0, 0]])
  got = model.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(segments))
  alone_b = model.apply({"params": params}, jnp.asarray(b[None]))
  alone_a = model.apply({"params": params}, jnp.asarray(a[None]))
  assert np.abs(np.asarray(got[0, 7:18] - alone_b[0])).max() <= 1e-4
  assert np.abs(np.asarray(got[0, :7] - alone_a[0])).max() <= 1e-4
  # Explicit positions give the same as the ones derived from segment ids.
  pos = M.positions_from_segments(jnp.asarray(segments))
  np.testing.assert_array_equal(pos[0, :18], np.r_[np.arange(7), np.arange(11)])


def test_sharded_forward_matches_unsharded(reference):
  assert jax.device_count() >= 8, "conftest sets 8 simulated CPU devices"
  cfg, _, params = reference
  cfg = cfg.replace(scan_layers=True)
  params = M.convert_layout(params, cfg, True)
  tokens = jnp.asarray(np.random.RandomState(6).randint(0, 50400, size=(4, 16)))
  expected = M.CodeGeeX(cfg).apply({"params": params}, tokens)
  mesh = partitioning.make_mesh(data=1, fsdp=2, model=4)
  sharded = partitioning.shard_params(params, M.param_logical_specs(cfg), mesh)
  kernel = sharded["layers"]["attention"]["query"]["kernel"]  # [layers, embed, heads, kv]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model", None)
  with mesh, partitioning.axis_rules():
    got = jax.jit(M.CodeGeeX(cfg).apply)({"params": sharded}, tokens)
  assert np.abs(np.asarray(got - expected)).max() <= 1e-4


def test_bf16_compute_stays_close_to_fp32(reference):
  cfg, _, params = reference
  tokens = jnp.asarray(np.random.RandomState(7).randint(0, 50400, size=(1, 16)))
  a = M.CodeGeeX(cfg).apply({"params": params}, tokens)
  b = M.CodeGeeX(cfg.replace(dtype="bfloat16")).apply({"params": params}, tokens)
  assert b.dtype == jnp.float32
  assert np.abs(np.asarray(a - b)).max() < 0.05 * float(np.abs(np.asarray(a)).max()) + 0.05


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match="divisible"):
    M.CodeGeeXConfig(hidden_size=100, num_heads=3)
  with pytest.raises(ValueError, match="unknown preset"):
    M.CodeGeeXConfig.preset("7b")
  with pytest.raises(ValueError, match="remat_policy"):
    tiny(remat_policy="sometimes")
