"""Beam search over the KV-cache decoder, in one jitted `lax.while_loop`.

Shapes: P = prompts, W = beam width, T = max new tokens, V = vocabulary. Each prompt is prefilled
once and its cache repeated W times; every step expands the W live beams into the 2W best
candidates, moves those that end (EOS or the language stop rule) into a kept set of W finished
sequences, and gathers the cache rows of the W best that go on. The loop stops early once no live
beam can beat the worst kept finished one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.model import partitioning
from geex_jax.inference import quantization
from geex_jax.model import codegeex as M
from geex_jax.inference.decoding import DECODE_COMPILER_OPTIONS, DecodeSpec, forward, pad_prompts
from geex_jax.errors import InputError
from geex_jax.inference.stop_automata import NO_RULE, RuleTables, rule_initial_state, rule_step
from geex_jax.inference.token_choice import validate_sampling

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BeamSpec:
  config: M.CodeGeeXConfig
  width: int
  max_new_tokens: int
  eos_id: int
  vocab_limit: int
  rule: str
  quantized: bool

  @property
  def decode_spec(self) -> DecodeSpec:  # what `forward` needs
    return DecodeSpec(
      config=self.config,
      num_samples=1,
      max_new_tokens=self.max_new_tokens,
      greedy=True,
      top_k=0,
      use_top_p=False,
      eos_id=self.eos_id,
      vocab_limit=self.vocab_limit,
      rule=self.rule,
      quantized=self.quantized,
    )


def _length_norm(length: Array, alpha) -> Array:
  return jnp.power(jnp.maximum(length, 1).astype(jnp.float32), alpha)


@functools.partial(jax.jit, static_argnames=("spec",), compiler_options=DECODE_COMPILER_OPTIONS)
def _beam_search(spec: BeamSpec, params, prompt, segment_ids, rule_init, alpha, rule_table):
  """Beam search over [P, L] prompts. Returns (tokens [P, W, T], lengths [P, W] tokens of the
  completion (EOS excluded), scores [P, W] penalised, sorted descending, ends [P, W] bool).

  Score of a finished sequence: sum of its token log-probs (EOS included) / length ** alpha,
  length = generated tokens including EOS. A candidate ends on EOS or when the language rule
  fires (that token is kept). Unfinished beams are ranked the same way at max_new_tokens.
  """
  p, l = prompt.shape
  w, t = spec.width, spec.max_new_tokens
  dspec = spec.decode_spec
  cache = M.init_cache(spec.config, p, l + t, spec.config.compute_dtype)
  logits, cache = forward(dspec, params, cache, prompt, segment_ids)
  cache = M.map_cache_batch(spec.config, cache, lambda x, ax: jnp.repeat(x, w, axis=ax))
  logits = jnp.repeat(logits, w, axis=0)
  neg = jnp.float32(-jnp.inf)
  # Only beam 0 is live at first, so the first expansion does not produce W copies.
  alive_score = jnp.where(jnp.arange(w) == 0, 0.0, neg)[None].repeat(p, 0)
  init = dict(
    cache=cache,
    logits=logits,
    step=jnp.zeros((), jnp.int32),
    alive_seq=jnp.zeros((p, w, t), jnp.int32),
    alive_score=alive_score,
    alive_rule=jnp.repeat(rule_init[:, None], w, axis=1),
    fin_seq=jnp.zeros((p, w, t), jnp.int32),
    fin_score=jnp.full((p, w), neg),
    fin_len=jnp.zeros((p, w), jnp.int32),
    fin_end=jnp.zeros((p, w), bool),
  )

  def finished_for_sure(s):
    # No live beam can beat the worst kept finished one: scores only drop as tokens are added,
    # and a future length lies in [step + 1, T].
    lo = _length_norm(s["step"] + 1, alpha)
    hi = _length_norm(jnp.int32(t), alpha)
    best_alive = jnp.max(jnp.maximum(s["alive_score"] / lo, s["alive_score"] / hi), axis=1)
    worst_fin = jnp.min(s["fin_score"], axis=1)
    return jnp.all((worst_fin >= best_alive) | jnp.all(s["alive_score"] == neg, axis=1))

  def cond(s):
    return (s["step"] < t) & ~finished_for_sure(s)

  def body(s):
    i = s["step"]
    v = s["logits"].shape[-1]
    logp = jax.nn.log_softmax(s["logits"], axis=-1).reshape(p, w, v)
    cand = (s["alive_score"][:, :, None] + logp).reshape(p, w * v)
    score2, idx2 = jax.lax.top_k(cand, 2 * w)  # [P, 2W]
    beam2, tok2 = idx2 // v, (idx2 % v).astype(jnp.int32)
    seq2 = jnp.take_along_axis(s["alive_seq"], beam2[:, :, None], axis=1)
    seq2 = seq2.at[:, :, i].set(tok2)
    rule2 = jnp.take_along_axis(s["alive_rule"], beam2, axis=1)
    rule2, fired2 = rule_step(spec.rule, rule_table, rule2.reshape(-1), tok2.reshape(-1))
    rule2, fired2 = rule2.reshape(p, 2 * w), fired2.reshape(p, 2 * w)
    eos2 = tok2 == spec.eos_id
    end2 = (eos2 | fired2) & (score2 > neg)
    # Finished: merge the ending candidates into the kept finished set.
    pen2 = jnp.where(end2, score2 / _length_norm(i + 1, alpha), neg)
    all_score = jnp.concatenate([s["fin_score"], pen2], axis=1)
    all_seq = jnp.concatenate([s["fin_seq"], seq2], axis=1)
    all_len = jnp.concatenate([s["fin_len"], jnp.where(eos2, i, i + 1)], axis=1)
    all_end = jnp.concatenate([s["fin_end"], end2], axis=1)
    fin_score, keep = jax.lax.top_k(all_score, w)
    take = lambda x: jnp.take_along_axis(x, keep if x.ndim == 2 else keep[:, :, None], axis=1)
    # Alive: the best W candidates that did not end.
    live2 = jnp.where(end2, neg, score2)
    alive_score, pick = jax.lax.top_k(live2, w)
    alive_beam = jnp.take_along_axis(beam2, pick, axis=1)
    alive_tok = jnp.take_along_axis(tok2, pick, axis=1)
    rows = (jnp.arange(p)[:, None] * w + alive_beam).reshape(-1)
    new_cache = M.map_cache_batch(spec.config, s["cache"], lambda x, ax: jnp.take(x, rows, ax))
    logits, new_cache = forward(dspec, params, new_cache, alive_tok.reshape(-1, 1))
    return dict(
      cache=new_cache,
      logits=logits,
      step=i + 1,
      alive_seq=jnp.take_along_axis(seq2, pick[:, :, None], axis=1),
      alive_score=alive_score,
      alive_rule=jnp.take_along_axis(rule2, pick, axis=1),
      fin_seq=take(all_seq),
      fin_score=fin_score,
      fin_len=take(all_len),
      fin_end=take(all_end),
    )

  s = jax.lax.while_loop(cond, body, init)
  # Beams still alive at the end compete with the finished ones, at their full length.
  # (When the loop stopped early no live beam can beat the finished ones: leave them out.)
  alive_pen = jnp.where(s["step"] < t, neg, s["alive_score"] / _length_norm(s["step"], alpha))
  all_score = jnp.concatenate([s["fin_score"], alive_pen], axis=1)
  all_seq = jnp.concatenate([s["fin_seq"], s["alive_seq"]], axis=1)
  all_len = jnp.concatenate([s["fin_len"], jnp.broadcast_to(s["step"], (p, w))], axis=1)
  all_end = jnp.concatenate([s["fin_end"], jnp.zeros((p, w), bool)], axis=1)
  scores, keep = jax.lax.top_k(all_score, w)
  return (
    jnp.take_along_axis(all_seq, keep[:, :, None], axis=1),
    jnp.take_along_axis(all_len, keep, axis=1),
    scores,
    jnp.take_along_axis(all_end, keep, axis=1),
  )


@dataclasses.dataclass
class BeamResult:
  tokens: list[list[list[int]]]  # [P][W] completion tokens (EOS excluded), best first
  scores: list[list[float]]  # [P][W] penalised scores, descending
  ended: list[list[bool]]  # [P][W] ended by EOS / stop rule (False: hit max_new_tokens)


def beam_search_ids(
  config: M.CodeGeeXConfig,
  params: Any,
  prompts: Sequence[Sequence[int]],
  *,
  width: int,
  max_new_tokens: int = 64,
  length_penalty: float = 1.0,
  eos_id: int = 50256,
  vocab_limit: Optional[int] = None,
  rule: Optional[RuleTables] = None,
  at_line_start: Optional[Sequence[bool]] = None,
  mesh=None,
) -> BeamResult:
  """Beam search of `width` beams per prompt; token ids in, the W best completions out.

  length_penalty alpha: score = sum log p / (generated tokens incl. EOS) ** alpha (0: raw sum).
  """
  validate_sampling(beam=width, max_new_tokens=max_new_tokens)
  rule = rule or NO_RULE
  prompt, segments = pad_prompts(prompts, max_new_tokens, config.max_position, max(eos_id, 0))
  vocab_limit = config.vocab_size if vocab_limit is None else min(vocab_limit, config.vocab_size)
  if width > vocab_limit:
    raise InputError(f"beam width {width} exceeds the vocabulary ({vocab_limit})")
  spec = BeamSpec(
    config,
    int(width),
    max_new_tokens,
    eos_id,
    vocab_limit,
    rule.kind,
    quantization.is_quantized(params),
  )
  at_line_start = [True] * len(prompts) if at_line_start is None else list(at_line_start)
  rule_init = np.array([rule_initial_state(rule.kind, a) for a in at_line_start], np.int32)
  with partitioning.mesh_context(mesh):
    out = _beam_search(
      spec,
      params,
      jnp.asarray(prompt),
      jnp.asarray(segments),
      jnp.asarray(rule_init),
      jnp.float32(length_penalty),
      jnp.asarray(rule.table),
    )
    seqs, lengths, scores, ends = jax.device_get(out)
  return BeamResult(
    tokens=[
      [seqs[i, j, : lengths[i, j]].tolist() for j in range(width)] for i in range(len(prompts))
    ],
    scores=scores.tolist(),
    ended=ends.tolist(),
  )
