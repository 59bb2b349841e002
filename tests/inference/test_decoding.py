"""inference/decoding.py: greedy parity with the PyTorch reference, the decode loop (chunks,
num_samples, EOS, early exit, steps per loop), seeded sampling, tensor-parallel decoding."""

import jax
import pytest
import torch

from geex_jax.conversion.torch_reference import greedy_generate
from geex_jax.inference import decoding as D
from geex_jax.model import codegeex as M
from geex_jax.model import partitioning
from geex_jax.errors import InputError
from geex_jax.inference.token_choice import SamplingParams
from decode_fixtures import NEW


def test_greedy_matches_torch_reference_40_tokens(reference, prompts, greedy):
  _, ref, _ = reference
  assert all(len(set(t)) > 10 for t in greedy.tokens)  # a non-degenerate continuation
  for p, got in zip(prompts, greedy.tokens):
    expected = greedy_generate(ref, torch.tensor([p]), NEW)[0].tolist()
    assert got == expected
  assert greedy.reasons == ["length", "length"] and greedy.steps == NEW


def test_chunks_and_num_samples_do_not_change_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  chunked = D.generate_ids(
    cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, chunk_size=7, host_check=lambda r, t: False
  )
  assert chunked.tokens == greedy.tokens
  # num_samples repeats the prefilled cache: every copy continues identically.
  rep = D.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, num_samples=3)
  assert rep.tokens == [greedy.tokens[r // 3] for r in range(6)]


def test_eos_ends_rows_and_the_loop_exits_early(reference, prompts, greedy):
  cfg, ref, params = reference
  eos = greedy.tokens[0][5]  # make a greedy token of row 0 the EOS
  k = greedy.tokens[0].index(eos)
  got = D.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos)
  assert got.tokens[0] == greedy.tokens[0][:k] and got.reasons[0] == "eos"
  expected = greedy_generate(ref, torch.tensor([prompts[1]]), NEW, eos_id=eos)[0].tolist()
  assert got.tokens[1] == [t for t in expected if t != eos]
  # Both rows ended -> the while loop stopped before max_new_tokens.
  if eos in greedy.tokens[1]:
    assert got.steps < NEW


def test_seeded_sampling_is_reproducible(reference, prompts):
  cfg, _, params = reference
  sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=100)
  run = lambda seed, **kw: (
    D.generate_ids(
      cfg,
      params,
      prompts,
      sampling=sp,
      max_new_tokens=12,
      eos_id=-1,
      num_samples=2,
      seed=seed,
      **kw,
    ).tokens
  )
  a = run(1)
  assert a == run(1)
  assert a != run(2)
  assert a[0] != a[1]  # samples of one prompt differ
  # A row's randomness depends on its row id only, not on the batch it is in.
  alone = D.generate_ids(
    cfg,
    params,
    [prompts[1]],
    sampling=sp,
    max_new_tokens=12,
    eos_id=-1,
    num_samples=2,
    seed=1,
    row_ids=[2, 3],
  ).tokens
  assert alone == a[2:]


def test_top_k_1_equals_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  got = D.generate_ids(
    cfg,
    params,
    prompts,
    max_new_tokens=NEW,
    eos_id=-1,
    seed=5,
    sampling=SamplingParams(temperature=1.3, top_k=1),
  )
  assert got.tokens == greedy.tokens


def test_sharded_greedy_matches_unsharded(reference, prompts, greedy):
  cfg, _, params = reference
  mesh = partitioning.make_mesh(data=1, fsdp=1, model=4, devices=jax.devices()[:4])
  sharded = partitioning.shard_params(params, M.param_logical_specs(cfg), mesh)
  kernel = sharded["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
  assert kernel.sharding.spec[-1] == "model"
  got = D.generate_ids(cfg, sharded, prompts, max_new_tokens=NEW, eos_id=-1, mesh=mesh)
  assert got.tokens == greedy.tokens


# --- several decode steps per while-loop iteration ---------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 8])
def test_steps_per_loop_changes_nothing_but_the_loop(reference, prompts, greedy, k):
  """An inner loop of k steps (overrunning max_new_tokens = 40 by up to k - 1 pad steps) gives
  the same tokens, reasons and step count as one step per iteration, with chunks, EOS and
  seeded sampling."""
  cfg, _, params = reference
  got = D.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, steps_per_loop=k)
  assert got.tokens == greedy.tokens and got.reasons == greedy.reasons and got.steps == NEW
  chunked = D.generate_ids(
    cfg,
    params,
    prompts,
    max_new_tokens=NEW,
    eos_id=-1,
    chunk_size=7,
    host_check=lambda r, t: False,
    steps_per_loop=k,
  )
  assert chunked.tokens == greedy.tokens
  eos = greedy.tokens[0][5]
  one = D.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos)
  many = D.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos, steps_per_loop=k)
  assert (many.tokens, many.reasons) == (one.tokens, one.reasons)
  sp = SamplingParams(temperature=0.9, top_p=0.95, top_k=100)
  a, b = (
    D.generate_ids(
      cfg,
      params,
      prompts,
      sampling=sp,
      max_new_tokens=13,
      eos_id=-1,
      num_samples=2,
      seed=4,
      steps_per_loop=j,
    ).tokens
    for j in (1, k)
  )
  assert a == b


def test_steps_per_loop_falls_back_when_the_prompt_leaves_no_room(reference):
  cfg, _, params = reference
  prompt = [list(range(1, cfg.max_position - 10 + 1))]  # 10 positions left
  one = D.generate_ids(cfg, params, prompt, max_new_tokens=10, eos_id=-1)
  many = D.generate_ids(cfg, params, prompt, max_new_tokens=10, eos_id=-1, steps_per_loop=4)
  assert many.tokens == one.tokens and len(one.tokens[0]) == 10
  with pytest.raises(InputError, match="steps_per_loop"):
    D.generate_ids(cfg, params, prompt, max_new_tokens=10, steps_per_loop=0)


def test_any_uint32_seed_samples_and_others_are_refused(reference, prompts):
  """Seeds >= 2^31 used to overflow the jitted int32 seed (geex-eval's hashed batch seeds)."""
  cfg, _, params = reference
  kw = dict(sampling=SamplingParams(temperature=1.0), max_new_tokens=8, eos_id=-1)
  high = D.generate_ids(cfg, params, prompts, seed=2**32 - 1, **kw)
  again = D.generate_ids(cfg, params, prompts, seed=2**32 - 1, **kw)
  low = D.generate_ids(cfg, params, prompts, seed=7, **kw)
  assert high.tokens == again.tokens and high.tokens != low.tokens
  for bad in (-1, 2**32):
    with pytest.raises(InputError, match="seed must be an integer in 0..4294967295"):
      D.generate_ids(cfg, params, prompts, seed=bad, **kw)
