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


class CharTokenizer:
  """A tokenizer over a few characters, so random tiny models emit newlines and braces all the
  time (the stop rules fire); EOS is the id after the characters."""

  def __init__(self, chars: str = "ab \t\n{}()"):
    self.chars = chars
    self.eos_id = len(chars)
    self.vocab_size = len(chars) + 1

  def encode(self, text):
    return [self.chars.index(c) for c in text]

  def decode(self, ids):
    return "".join(self.chars[i] if i < len(self.chars) else "<|endoftext|>" for i in ids)


def char_sampler(chars: str = "ab \t\n{}()", *, seed: int = 1, **sampler_kw):
  """A Sampler of a random tiny model over CharTokenizer(chars). init_std 0.2: at 0.02 a tiny
  random model's output is close to uniform noise or one token."""
  from geex_jax.inference.sampler import Sampler

  tok = CharTokenizer(chars)
  cfg = M.CodeGeeXConfig.preset("tiny", vocab_size=tok.vocab_size, max_position=64, init_std=0.2)
  return Sampler(cfg, M.init_params(cfg, jax.random.key(seed)), tok, **sampler_kw)
