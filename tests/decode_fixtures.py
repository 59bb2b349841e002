"""Shared by the decoding, beam-search, sampling and CLI tests: a tiny PyTorch reference model,
the same weights as geex-jax params, two ragged prompts, their greedy continuation, a checkpoint.

Loaded as a plugin by conftest.py, so every test module can use these fixtures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from geex_jax.conversion import table
from geex_jax.conversion.torch_reference import CodeGeeXTorch
from geex_jax.model import checkpoints
from geex_jax.inference import decoding
from geex_jax.model import codegeex as M

NEW = 40  # greedy tokens compared with the reference


@pytest.fixture(scope="session")
def reference():
  """Tiny PyTorch reference with randomised biases/LayerNorms and the same geex-jax params.

  Weights are normal(0, 0.2) rather than 0.02: at 0.02 the tiny model's greedy output is one
  token repeated, which would make the parity test vacuous.
  """
  torch.manual_seed(0)
  cfg = M.CodeGeeXConfig.preset("tiny", scan_layers=False)
  ref = CodeGeeXTorch(cfg).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
      else:
        p.normal_(0.0, 0.2)
  flat = {k: v.numpy() for k, v in ref.released_state_dict().items()}
  params = jax.tree.map(jnp.asarray, table.released_to_params(flat, cfg))
  cfg = cfg.replace(scan_layers=True)
  return cfg, ref, M.convert_layout(params, cfg, True)


@pytest.fixture(scope="session")
def prompts():
  rng = np.random.RandomState(0)
  return [rng.randint(0, 50400, size=n).tolist() for n in (7, 13)]


@pytest.fixture(scope="session")
def greedy(reference, prompts):
  cfg, _, params = reference
  return decoding.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, reference):
  cfg, _, params = reference
  path = tmp_path_factory.mktemp("ckpt")
  checkpoints.save_params(path, cfg, params)
  return path
