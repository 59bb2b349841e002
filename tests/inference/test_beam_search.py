"""inference/beam_search.py: width 1 is greedy; beams are distinct and sorted by the penalised
score, each score recomputed with a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.inference import beam_search as B
from geex_jax.model import codegeex as M
from decode_fixtures import NEW


def test_beam_width_1_equals_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  got = B.beam_search_ids(
    cfg, params, prompts, width=1, max_new_tokens=NEW, eos_id=-1, length_penalty=0.0
  )
  assert [b[0] for b in got.tokens] == greedy.tokens
  eos = greedy.tokens[0][5]
  k = greedy.tokens[0].index(eos)
  got = B.beam_search_ids(
    cfg, params, prompts[:1], width=1, max_new_tokens=NEW, eos_id=eos, length_penalty=0.0
  )
  assert got.tokens[0][0] == greedy.tokens[0][:k] and got.ended[0][0]


def test_beam_search_sorted_by_penalised_score(reference, prompts, greedy):
  cfg, _, params = reference
  alpha, width = 1.0, 4
  eos = greedy.tokens[0][3]  # some beams end early, so lengths differ
  got = B.beam_search_ids(
    cfg, params, prompts, width=width, max_new_tokens=8, eos_id=eos, length_penalty=alpha
  )
  apply = jax.jit(M.CodeGeeX(cfg).apply)
  for p, seqs, scores, ended in zip(prompts, got.tokens, got.scores, got.ended):
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(s) for s in seqs}) == width  # distinct beams
    # Recompute each beam's log-prob with one full forward (right padding does not affect the
    # earlier positions of a causal model).
    fulls = [seq + ([eos] if end else []) for seq, end in zip(seqs, ended)]
    batch = np.zeros((width, len(p) + 9), np.int32)
    for j, full in enumerate(fulls):
      batch[j, : len(p) + len(full)] = p + full
    logp = jax.nn.log_softmax(apply({"params": params}, jnp.asarray(batch)), axis=-1)
    for j, (full, score) in enumerate(zip(fulls, scores)):
      pos = np.arange(len(p) - 1, len(p) - 1 + len(full))
      total = float(logp[j, pos, np.asarray(full)].sum())
      assert score == pytest.approx(total / len(full) ** alpha, abs=1e-3)
  # Greedy's sequence is a candidate, so the best beam is at least as good.
  assert got.scores[1][0] >= got.scores[1][-1]
