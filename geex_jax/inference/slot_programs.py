"""The continuous-batching engine's device programs: prefill one prompt, insert it into a slot,
decode a chunk of steps over every slot. See `inference.engine` for how they are driven.

Shapes: S = slots, M = max_length (cache positions per slot), Lb = a prompt's bucketed length,
k = decode steps per chunk, V = vocabulary. Nothing here depends on a request's parameters: they
are arrays [S] (`Rows`), so new requests never recompile.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geex_jax.inference import stop_automata as SA
from geex_jax.inference.decoding import DecodeSpec, forward
from geex_jax.inference.token_choice import NEG_INF, TOP_P_FAST_K
from geex_jax.model import codegeex as M

Array = jax.Array

_LENGTH, _EOS, _RULE = 0, 1, 2  # decoding.FINISH_REASONS indices
KIND_NONE, KIND_TOP, KIND_BRACE = 0, 1, 2
KINDS = {SA.RULE_NONE: KIND_NONE, SA.RULE_TOP_LEVEL: KIND_TOP, SA.RULE_BRACE: KIND_BRACE}


@dataclasses.dataclass(frozen=True)
class EngineSpec:
  """Everything static about the engine's programs (their jit cache key)."""

  decode: DecodeSpec  # what `decoding.forward` reads: config, vocab_limit, matmul
  slots: int
  max_length: int
  chunk: int
  eos_id: int
  # Weights sharded over this mesh's `model` axis (Sampler.load(mesh=...)): the pool's keys and
  # values are split by heads the same way, everything else is replicated (`pool_sharding`).
  mesh: Optional[Mesh] = None


def pool_sharding(mesh: Mesh, path, x) -> NamedSharding:
  """Where a pool leaf lives on `mesh`: K/V ([S, ..., heads, M, head_dim]) split by heads over
  `model` when they divide, the rest (masks, indices, per-slot rows) replicated."""
  model = mesh.shape.get("model", 1)
  if _leaf_name(path) in ("cached_key", "cached_value") and x.shape[-3] % model == 0:
    return NamedSharding(mesh, PartitionSpec(*([None] * (x.ndim - 3)), "model", None, None))
  return NamedSharding(mesh, PartitionSpec())


def _pin(spec: EngineSpec, tree):
  """The pool (or rows) constrained to `pool_sharding`, so every program returns them where it
  found them: the next call sees the same input shardings and compiles nothing new."""
  if spec.mesh is None:
    return tree
  return jax.tree_util.tree_map_with_path(
    lambda p, x: jax.lax.with_sharding_constraint(x, pool_sharding(spec.mesh, p, x)), tree
  )


class Rows(NamedTuple):
  """Per-slot decode state and sampling parameters, each [S]."""

  last: Array  # int32 the slot's latest token (next step's input)
  step: Array  # int32 tokens chosen so far
  done: Array  # bool the slot is idle (finished, freed or never used)
  reason: Array  # int32 index into FINISH_REASONS (length, eos, stop_rule)
  rule_state: Array  # int32
  rule_kind: Array  # int32 KIND_*
  keys: Array  # uint32 [S, key words] raw key data
  temperature: Array  # float32 (1.0 for greedy rows)
  top_p: Array  # float32 (1.0: off)
  top_k: Array  # int32 (0: off)
  greedy: Array  # bool
  max_tokens: Array  # int32
  logprobs: Array  # bool: report each token's log-probability and the top LOGPROBS ones


class SlotParams(NamedTuple):
  """One sample's parameters, as the scalars `_insert` writes into a slot."""

  key: Array
  temperature: Array
  top_p: Array
  top_k: Array
  greedy: Array
  max_tokens: Array
  rule_kind: Array
  rule_init: Array
  logprobs: Array


# Log-probabilities reported per token: the chosen one's and the LOGPROBS most likely (the
# OpenAI API's maximum), under the model's own distribution (temperature 1, no top-k/top-p), as
# vLLM reports them by default.
LOGPROBS = 5


class Emitted(NamedTuple):
  """What a program hands the host per slot and step ([S, k] or [S, k, LOGPROBS])."""

  tokens: Array  # int32
  emitted: Array  # bool: the token belongs to a live row's completion
  logprob: Array  # float32 the token's log-probability (0 where no row asked)
  top_ids: Array  # int32 [..., LOGPROBS]
  top_logprobs: Array  # float32 [..., LOGPROBS]


TRACES: collections.Counter = collections.Counter()  # program name -> times traced (tests)


def _cutoffs(top: Array, lse: Array, top_k: Array, top_p: Array) -> tuple[Array, Array]:
  """(top-k threshold [S, 1], top-p cutoff [S, 1]) from top [S, w]: each row's w largest logits,
  descending (w = V, or fewer when every filtering row's answer lies within them). lse [S]: the
  rows' logsumexp. top-p acts on the top-k-renormalised distribution (token_choice's order)."""
  w = top.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, w), w)
  kth = jnp.take_along_axis(top, (k - 1)[:, None], axis=-1)
  masked = jnp.where(jnp.arange(w)[None] < k[:, None], top, NEG_INF)
  probs = jnp.where(
    (top_k > 0)[:, None], jax.nn.softmax(masked, axis=-1), jnp.exp(masked - lse[:, None])
  )
  before = jnp.cumsum(probs, axis=-1) - probs
  count = jnp.maximum((before < top_p[:, None]).sum(-1), 1)
  return kth, jnp.take_along_axis(masked, (count - 1)[:, None], axis=-1)


def _filter_rows(logits: Array, top_k: Array, top_p: Array, active: Array) -> Array:
  """Per-row top-k then top-p. logits [S, V]; top_k, top_p [S] (0 / 1.0: off, the row is
  returned unchanged); active [S]: rows that sample. Like `token_choice.filter_logits`, the
  thresholds come from the top TOP_P_FAST_K logits when they hold every active row's answer, from
  a full sort otherwise."""
  v = logits.shape[-1]
  fast_k = min(TOP_P_FAST_K, v)
  lse = jax.nn.logsumexp(logits, axis=-1)
  full = lambda: _cutoffs(-jnp.sort(-logits, axis=-1), lse, top_k, top_p)
  if fast_k < v:
    top = jax.lax.top_k(logits, fast_k)[0]
    covered = jnp.exp(top - lse[:, None]).sum(-1) >= top_p
    ok = jnp.where(top_k > 0, top_k <= fast_k, (top_p >= 1.0) | covered) | ~active
    kth, cutoff = jax.lax.cond(jnp.all(ok), lambda: _cutoffs(top, lse, top_k, top_p), full)
  else:
    kth, cutoff = full()
  logits = jnp.where((top_k > 0)[:, None] & (logits < kth), NEG_INF, logits)
  return jnp.where((top_p < 1.0)[:, None] & (logits < cutoff), NEG_INF, logits)


def _rule_step(tables, kind: Array, state: Array, tok: Array) -> tuple[Array, Array]:
  """Both language automata for every row; each row keeps the one its kind names."""
  top, brace = tables
  s_top, f_top = SA.rule_step(SA.RULE_TOP_LEVEL, top, jnp.where(kind == KIND_TOP, state, 0), tok)
  s_br, f_br = SA.rule_step(
    SA.RULE_BRACE, brace, jnp.where(kind == KIND_BRACE, state, SA.stop_rules.BRACE_INITIAL), tok
  )
  new = jnp.where(kind == KIND_TOP, s_top, jnp.where(kind == KIND_BRACE, s_br, state))
  fired = jnp.where(kind == KIND_TOP, f_top, (kind == KIND_BRACE) & f_br)
  return new, fired


def _log_probs(logits: Array, tok: Array, want: Array) -> tuple[Array, Array, Array]:
  """(log p(tok) [S], top ids [S, LOGPROBS], their log p [S, LOGPROBS]); computed only when a
  row asks (`want` [S]), zeros otherwise."""
  s = logits.shape[0]
  k = min(LOGPROBS, logits.shape[-1])

  def compute(x):
    lp = jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

  def skip(x):
    return jnp.zeros((s,), jnp.float32), jnp.zeros((s, k), jnp.int32), jnp.zeros((s, k))

  return jax.lax.cond(jnp.any(want), compute, skip, logits)


def _choose(spec: EngineSpec, rows: Rows, logits: Array, tables) -> tuple[Rows, Emitted]:
  """Chooses token `rows.step` of every row from logits [S, V], as `decoding._choose` does.

  Returns (rows, what the host reads of this step, each [S] / [S, LOGPROBS])."""
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(rows.keys), rows.step)
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / rows.temperature[:, None]
  sampling = ~rows.greedy & ~rows.done
  filtering = jnp.any(sampling & ((rows.top_k > 0) | (rows.top_p < 1.0)))
  scaled = jax.lax.cond(
    filtering, lambda x: _filter_rows(x, rows.top_k, rows.top_p, sampling), lambda x: x, scaled
  )
  drawn = jax.lax.cond(  # all-greedy steps skip the draws ([S, V] Gumbel noise)
    jnp.any(sampling),
    lambda x: jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32),
    lambda x: jnp.zeros(x.shape[:1], jnp.int32),
    scaled,
  )
  tok = jnp.where(rows.greedy, best, drawn)
  live = ~rows.done
  tok = jnp.where(live, tok, max(spec.eos_id, 0))
  logprob, top_ids, top_lp = _log_probs(logits, tok, rows.logprobs & live)
  rule_state, fired = _rule_step(tables, rows.rule_kind, rows.rule_state, tok)
  is_eos = tok == spec.eos_id
  reason = jnp.where(live & is_eos, _EOS, jnp.where(live & fired, _RULE, rows.reason))
  done = rows.done | is_eos | fired | (rows.step + 1 >= rows.max_tokens)
  rows = rows._replace(
    last=jnp.where(live, tok, rows.last),
    step=rows.step + live.astype(jnp.int32),
    done=done,
    reason=reason,
    rule_state=jnp.where(live, rule_state, rows.rule_state),
  )
  return rows, Emitted(tok, live & ~is_eos, logprob, top_ids, top_lp)


def _finish_code(rows: Rows) -> Array:
  """[S] int32: -1 while a row runs, else its reason (a fresh array: safe to read while the
  state is donated to the next chunk)."""
  return jnp.where(rows.done, rows.reason, -1)


@functools.partial(jax.jit, static_argnames=("spec",))
def prefill(spec: EngineSpec, params, prompt: Array, segments: Array):
  """prompt, segments [1, Lb] (left-padded) -> (last logits [1, V], the prompt's cache). Keys and
  values come back padded to max_length positions (the prompt at 0..Lb-1)."""
  TRACES["prefill"] += 1
  cfg = spec.decode.config
  cache = M.init_cache(cfg, 1, prompt.shape[1], cfg.compute_dtype)
  logits, cache = forward(spec.decode, params, cache, prompt, segments)
  grow = spec.max_length - prompt.shape[1]  # to the slots' length: one `_insert` for all buckets

  def widen(path, x):
    if _leaf_name(path) in ("cached_key", "cached_value"):
      return jnp.pad(x, ((0, 0), (0, 0), (0, grow), (0, 0)))
    if _leaf_name(path) == "key_valid":
      return jnp.pad(x, ((0, 0), (0, grow)))
    return x

  return logits, jax.tree_util.tree_map_with_path(widen, cache)


def _leaf_name(path) -> str:
  return str(getattr(path[-1], "key", path[-1]))


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache", "rows"))
def insert(
  spec: EngineSpec, cache, rows: Rows, small, logits, slot, lb, length, p: SlotParams, tables
):
  """Puts a prefilled prompt (`_prefill`'s cache: `length` real tokens ending at position lb)
  into slot `slot` and chooses the slot's first token. Returns (cache, rows, Emitted [1, 1, ...],
  finish code [1])."""
  TRACES["insert"] += 1
  pad = lb - length
  positions = jnp.arange(spec.max_length)

  def put(path, big, new):
    name = _leaf_name(path)
    if name in ("cached_key", "cached_value"):  # [1, n, M, h]: the prompt to positions 0..len-1
      new = jnp.roll(new, -pad, axis=2).astype(big.dtype)
      return jax.lax.dynamic_update_slice(big, new[None], (slot, 0, 0, 0, 0))
    if name == "key_valid":
      return big.at[slot].set((positions < length)[None])
    if name == "cache_index":
      return big.at[slot].set(length)
    if name == "tokens_seen":
      return big.at[slot].set(jnp.full((1,), length, big.dtype))
    raise ValueError(f"unexpected cache leaf {name}")

  cache = jax.tree_util.tree_map_with_path(put, cache, small)
  one = Rows(
    last=jnp.zeros((1,), jnp.int32),
    step=jnp.zeros((1,), jnp.int32),
    done=jnp.zeros((1,), bool),
    reason=jnp.full((1,), _LENGTH, jnp.int32),
    rule_state=p.rule_init[None],
    rule_kind=p.rule_kind[None],
    keys=p.key[None],
    temperature=p.temperature[None],
    top_p=p.top_p[None],
    top_k=p.top_k[None],
    greedy=p.greedy[None],
    max_tokens=p.max_tokens[None],
    logprobs=p.logprobs[None],
  )
  one, out = _choose(spec, one, logits, tables)
  rows = Rows(*(r.at[slot].set(o[0]) for r, o in zip(rows, one)))
  cache, rows = _pin(spec, (cache, rows))
  return cache, rows, jax.tree.map(lambda x: x[:, None], out), _finish_code(one)


def _narrow(path, x, window: int):
  """A pool leaf's first `window` cache positions (K/V [S, 1, n, M, h], key_valid [S, 1, M])."""
  name = _leaf_name(path)
  if name in ("cached_key", "cached_value"):
    return x[:, :, :, :window]
  if name == "key_valid":
    return x[:, :, :window]
  return x


def _widen_back(path, big, small):
  """`_narrow`'s inverse: the window's positions written back into the pool leaf."""
  if _leaf_name(path) in ("cached_key", "cached_value", "key_valid"):
    return jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim)
  return small


@functools.partial(jax.jit, static_argnames=("spec", "window"), donate_argnames=("cache", "rows"))
def chunk(spec: EngineSpec, params, cache, rows: Rows, host_done: Array, tables, window: int):
  """Up to spec.chunk decode steps of every slot. host_done [S]: slots the host freed.

  window: the steps attend to (and write) only cache positions < window, which the caller
  guarantees hold every live slot's positions for this chunk; per-step attention then costs
  window, not max_length (a static argument: the engine uses a few sizes, compiled at warmup).
  An idle slot's frozen index may lie past the window: its write lands at position window - 1,
  which nothing reads (a slot's cache is rewritten whole when a prompt is inserted).

  Returns (cache, rows, Emitted [S, k, ...], finish code [S])."""
  TRACES["chunk"] += 1
  full = None
  if window < spec.max_length:
    full = cache
    cache = jax.tree_util.tree_map_with_path(lambda p, x: _narrow(p, x, window), cache)
  rows = rows._replace(done=rows.done | host_done)
  s, k = spec.slots, spec.chunk

  def one_slot(c, tok):
    logits, c = forward(spec.decode, params, c, tok[None, None])
    return logits[0], c

  def body(carry):
    i, cache, rows, outs = carry
    logits, new = jax.vmap(one_slot)(cache, rows.last)

    def keep_idle(path, old, upd):  # idle slots do not advance (their index stays < M)
      if _leaf_name(path) in ("cache_index", "tokens_seen"):
        idle = rows.done.reshape((s,) + (1,) * (old.ndim - 1))
        return jnp.where(idle, old, upd)
      return upd

    cache = jax.tree_util.tree_map_with_path(keep_idle, cache, new)
    rows, out = _choose(spec, rows, logits, tables)
    return i + 1, cache, rows, jax.tree.map(lambda a, x: a.at[:, i].set(x), outs, out)

  def cond(carry):
    return (carry[0] < k) & ~jnp.all(carry[2].done)

  n = min(LOGPROBS, spec.decode.config.vocab_size)
  outs = Emitted(
    jnp.zeros((s, k), jnp.int32),
    jnp.zeros((s, k), bool),
    jnp.zeros((s, k), jnp.float32),
    jnp.zeros((s, k, n), jnp.int32),
    jnp.zeros((s, k, n), jnp.float32),
  )
  _, cache, rows, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, rows, outs))
  if full is not None:
    cache = jax.tree_util.tree_map_with_path(_widen_back, full, cache)
  cache, rows = _pin(spec, (cache, rows))
  return cache, rows, outs, _finish_code(rows)


def empty_rows(slots: int, key_words: int) -> Rows:
  z = lambda dt: jnp.zeros((slots,), dt)
  return Rows(
    last=z(jnp.int32),
    step=z(jnp.int32),
    done=jnp.ones((slots,), bool),
    reason=z(jnp.int32),
    rule_state=z(jnp.int32),
    rule_kind=z(jnp.int32),
    keys=jnp.zeros((slots, key_words), jnp.uint32),
    temperature=jnp.ones((slots,), jnp.float32),
    top_p=jnp.ones((slots,), jnp.float32),
    top_k=z(jnp.int32),
    greedy=jnp.ones((slots,), bool),
    max_tokens=jnp.ones((slots,), jnp.int32),
    logprobs=jnp.zeros((slots,), bool),
  )
