"""Sampling from CodeGeeX: KV-cache decoding in one jitted `lax.while_loop`, stop rules, beam search.

Shapes: P = prompts in a batch, n = samples per prompt, B = P * n decode rows, L = padded prompt
length, T = max new tokens, V = vocabulary, W = beam width.

How a batch is generated (`generate_ids`):
  1. Prompts are left-padded to a bucketed length (segment id 0 = padding, see model.py) and
     prefilled ONCE; the prefilled cache is repeated n times along the batch axis (`num_samples`
     costs no extra prefill).
  2. Decoding runs inside `lax.while_loop` in chunks of up to `chunk_size` tokens; the loop exits
     as soon as every row has ended. EOS, max_new_tokens and the language stop rule are checked ON
     THE DEVICE: the Python "new top-level line" rule and the brace rule are tiny automata over the
     bytes of each token, precomputed as per-token tables (`geex_jax.stop_automata`), so they
     cost a gather per step and no host round trip.
  3. User stop strings (and, as a safety net, the exact text rule of `geex_jax.stop_rules`) are
     checked on the host between chunks. The host check of chunk k runs while chunk k + 1 is
     already queued on the device, so the device never waits for Python; a row stopped by the
     host is masked at the start of the chunk after that (its extra tokens are cut off anyway).
  4. The final text of a row is the decoded tokens cut by `stop_rules.truncate` (the evaluator's
     reference rule) and by the first stop string.

Randomness: every row has its own key, `fold_in(key(seed), row_id)` with row_id = prompt index *
n + sample index, folded again with the step. A row's sample therefore does not depend on how rows
are batched, and the same seed reproduces the same output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax import decode_matmul, languages, stop_rules
from geex_jax.stop_automata import (NO_RULE, RULE_TOP_LEVEL, RuleTables, rule_initial_state,
                                    rule_step, rule_tables)
from geex_jax import model as M
from geex_jax import quantization
from geex_jax.errors import InputError

Array = jax.Array
log = logging.getLogger(__name__)

NEG_INF = -jnp.inf
# Prompt lengths are padded up to a multiple of this, so a run over many prompts compiles a
# handful of shapes rather than one per prompt length.
PROMPT_BUCKET = 64
# top-p first looks for the nucleus inside the top TOP_P_FAST_K tokens (a cheap partial sort) and
# falls back to a full sort only when those do not cover top_p; both give the exact nucleus.
TOP_P_FAST_K = 256


# ---------------------------------------------------------------------------------------------
# Sampling parameters and logit filters.


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is chosen. temperature 0 or greedy=True: argmax.

  top_k 0 disables top-k; top_p 1.0 disables nucleus filtering. Applied in the order
  temperature -> top-k -> top-p (the top-p mass is computed on the top-k-renormalised
  distribution).
  """
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    validate_sampling(self.temperature, self.top_k, self.top_p)

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0


def validate_sampling(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      beam: Optional[int] = None, max_new_tokens: int = 1,
                      num_samples: int = 1) -> None:
  """InputError on a parameter out of range (the CLI turns it into one line, exit 2)."""
  if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
          and temperature >= 0):
    raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
  if not (isinstance(top_k, (int, np.integer)) and top_k >= 0):
    raise InputError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
  if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise InputError(f"top_p must be in (0, 1], got {top_p}")
  if beam is not None and not (isinstance(beam, (int, np.integer)) and beam >= 1):
    raise InputError(f"beam width must be an integer >= 1, got {beam}")
  if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 1):
    raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
  if not (isinstance(num_samples, (int, np.integer)) and num_samples >= 1):
    raise InputError(f"num_samples must be an integer >= 1, got {num_samples}")


def _nucleus_cutoff(sorted_logits: Array, top_p: Array) -> tuple[Array, Array]:
  """sorted_logits: [B, k] descending. Returns (the smallest kept logit [B, 1], covered [B]).

  The nucleus is the shortest prefix whose probability mass reaches top_p: token j is kept when
  the mass strictly before it is < top_p (so the most likely token is always kept). `covered`
  says whether these k tokens hold mass >= top_p, i.e. whether the nucleus lies within them.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = before < top_p
  count = jnp.maximum(keep.sum(axis=-1), 1)
  cutoff = jnp.take_along_axis(sorted_logits, (count - 1)[:, None], axis=-1)
  return cutoff, count


def filter_logits(logits: Array, top_k: int = 0, top_p: Any = 1.0, use_top_p: bool = True
                  ) -> Array:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf.

  logits: [B, V] fp32 (already divided by the temperature). top_k: static int (0 = off).
  top_p: scalar (may be traced). Returns [B, V]. Ties at a cut-off value are all kept.
  """
  v = logits.shape[-1]
  if top_k and top_k < v:
    top = jax.lax.top_k(logits, top_k)[0]                       # [B, k] descending
    logits = jnp.where(logits < top[:, -1:], NEG_INF, logits)
    if use_top_p:
      cutoff, _ = _nucleus_cutoff(top, top_p)
      logits = jnp.where(logits < cutoff, NEG_INF, logits)
    return logits
  if not use_top_p:
    return logits
  # Probabilities of the full distribution are needed for the mass, so normalise first.
  logp = jax.nn.log_softmax(logits, axis=-1)
  k = min(TOP_P_FAST_K, v)

  def fast(lp):
    top = jax.lax.top_k(lp, k)[0]
    probs = jnp.exp(top)
    before = jnp.cumsum(probs, axis=-1) - probs
    count = jnp.maximum((before < top_p).sum(-1), 1)
    return jnp.take_along_axis(top, (count - 1)[:, None], axis=-1)

  def full(lp):
    return _nucleus_cutoff(-jnp.sort(-lp, axis=-1), top_p)[0]

  covered = jnp.all(jnp.exp(jax.lax.top_k(logp, k)[0]).sum(-1) >= top_p)
  cutoff = jax.lax.cond(covered, fast, full, logp) if k < v else full(logp)
  return jnp.where(logp < cutoff, NEG_INF, logits)


def sample_tokens(logits: Array, keys: Array, *, greedy: bool, top_k: int, use_top_p: bool,
                  temperature: Any, top_p: Any) -> Array:
  """logits: [B, V] fp32; keys: [B] typed keys -> tokens [B] int32."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p, use_top_p)
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# The jitted programs: prefill + first token, and a chunk of decode steps.


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Everything static about a compiled decode (a jit cache key)."""
  config: M.CodeGeeXConfig
  num_samples: int
  max_new_tokens: int
  greedy: bool
  top_k: int
  use_top_p: bool
  eos_id: int             # -1: no EOS (benchmarks)
  vocab_limit: int        # ids >= this are never produced (the tokenizer cannot decode them)
  rule: str
  quantized: bool
  matmul: str = "auto"        # decode_matmul.IMPLEMENTATIONS: how the blocks' linears multiply
  # Decode steps per while-loop iteration, run as an inner loop of fixed trip count. The loop
  # predicate goes to the host once per iteration (XLA:GPU) and the host then launches the next
  # iteration's CUDA graph while the GPU waits; an inner loop of known length lets the host queue
  # its iterations ahead. A row may then run up to steps_per_loop - 1 steps past max_new_tokens
  # (it is done by then: pad tokens, never counted): the buffers get that much room.
  steps_per_loop: int = 1

  @property
  def room(self) -> int:
    """Token slots / cache slots after the prompt: max_new_tokens plus the overrun."""
    return self.max_new_tokens + self.steps_per_loop - 1


class DecodeState(NamedTuple):
  """The loop carry. B rows; T = spec.room (max_new_tokens + the inner loop's overrun)."""
  cache: Any
  tokens: Array       # [B, T] int32 new tokens (EOS after a row ended)
  lengths: Array      # [B] int32 tokens that belong to the completion (EOS excluded)
  step: Array         # [] int32 tokens generated so far (all rows)
  done: Array         # [B] bool
  reason: Array       # [B] int32, see FINISH_REASONS
  rule_state: Array   # [B] int32
  keys: Array         # [B] typed PRNG keys of the rows


FINISH_REASONS = ("length", "eos", "stop_rule", "stop_string")
_LENGTH, _EOS, _RULE, _STOP = range(4)


def _apply(spec: DecodeSpec, params, cache, tokens, segment_ids=None):
  """One decode-mode forward. tokens: [B, t] -> (logits [B, V] fp32 of the last position, cache)."""
  model = M.CodeGeeX(spec.config)
  logits, state = decode_matmul.apply(
      model, {"params": params, "cache": cache}, tokens, segment_ids=segment_ids, decode=True,
      only_last=True, mutable=["cache"], matmul_impl=spec.matmul)
  logits = logits[:, 0]
  if spec.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < spec.vocab_limit, logits, NEG_INF)
  return logits, state["cache"]


def _choose(spec: DecodeSpec, st: DecodeState, logits: Array, temperature, top_p, rule_table
            ) -> DecodeState:
  """Samples token `st.step` of every row from logits [B, V] and updates the stop state."""
  keys = jax.vmap(jax.random.fold_in, (0, None))(st.keys, st.step)
  tok = sample_tokens(logits, keys, greedy=spec.greedy, top_k=spec.top_k,
                      use_top_p=spec.use_top_p, temperature=temperature, top_p=top_p)
  pad = max(spec.eos_id, 0)
  tok = jnp.where(st.done, pad, tok)
  rule_state, fired = rule_step(spec.rule, rule_table, st.rule_state, tok)
  is_eos = tok == spec.eos_id
  live = ~st.done
  lengths = st.lengths + (live & ~is_eos).astype(jnp.int32)
  reason = jnp.where(live & is_eos, _EOS, jnp.where(live & fired, _RULE, st.reason))
  done = st.done | is_eos | fired | (st.step + 1 >= spec.max_new_tokens)
  return st._replace(tokens=st.tokens.at[:, st.step].set(tok), lengths=lengths,
                     step=st.step + 1, done=done, reason=reason, rule_state=rule_state)


# XLA options for the decode programs. Each layer's query, key and value products share their
# input; with the dot merger's default size limit XLA merged only two of them, and raising the
# limit took 13B bf16 batch-1 decoding from 7.28 to 7.12 ms/token on an H200 (BENCHMARKS.md).
# Only XLA:GPU reads it.
DECODE_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 1024}


@functools.partial(jax.jit, static_argnames=("spec",), compiler_options=DECODE_COMPILER_OPTIONS)
def _start(spec: DecodeSpec, params, prompt, segment_ids, row_ids, seed, rule_init,
           temperature, top_p, rule_table) -> tuple[Any, DecodeState]:
  """Prefill [P, L] prompts once, repeat for n samples, choose every row's first token.

  row_ids: [P * n] int32 global row numbers (seeding). rule_init: [P * n] int32.
  Returns (cache, carry); carry.cache is None (the cache travels separately so that it alone is
  donated to the next chunk while the host still reads the previous carry).
  """
  p, l = prompt.shape
  n = spec.num_samples
  cache = M.init_cache(spec.config, p, l + spec.room, spec.config.compute_dtype)
  logits, cache = _apply(spec, params, cache, prompt, segment_ids)
  if n > 1:
    cache = M.map_cache_batch(spec.config, cache, lambda x, ax: jnp.repeat(x, n, axis=ax))
    logits = jnp.repeat(logits, n, axis=0)
  b = p * n
  base = jax.random.key(seed)
  st = DecodeState(
      cache=None, tokens=jnp.full((b, spec.room), max(spec.eos_id, 0), jnp.int32),
      lengths=jnp.zeros((b,), jnp.int32), step=jnp.zeros((), jnp.int32),
      done=jnp.zeros((b,), bool), reason=jnp.full((b,), _LENGTH, jnp.int32),
      rule_state=rule_init, keys=jax.vmap(jax.random.fold_in, (None, 0))(base, row_ids))
  st = _choose(spec, st, logits, temperature, top_p, rule_table)
  st = st._replace(done=st.done | (st.step >= spec.max_new_tokens))
  return cache, st


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",),
                   compiler_options=DECODE_COMPILER_OPTIONS)
def _decode_chunk(spec: DecodeSpec, params, cache, st: DecodeState, stop_at, host_done,
                  temperature, top_p, rule_table) -> tuple[Any, DecodeState]:
  """Decodes until step == stop_at or every row has ended. host_done: [B] rows the host stopped.

  The cache is donated (updated in place); the carry `st` is not, so the host may still read it.
  """
  st = st._replace(cache=cache, done=st.done | host_done,
                   reason=jnp.where(host_done & ~st.done, _STOP, st.reason))

  def cond(s):
    return (s.step < stop_at) & ~jnp.all(s.done)

  def step(s):
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)   # [B, 1]
    logits, new_cache = _apply(spec, params, s.cache, last)
    return _choose(spec, s._replace(cache=new_cache), logits, temperature, top_p, rule_table)

  def body(s):
    if spec.steps_per_loop == 1:
      return step(s)
    return jax.lax.fori_loop(0, spec.steps_per_loop, lambda _, x: step(x), s)

  st = jax.lax.while_loop(cond, body, st)
  return st.cache, st._replace(cache=None)


# ---------------------------------------------------------------------------------------------
# Host-side driver.


@dataclasses.dataclass
class Generation:
  """Output of `generate_ids` for B = P * n rows (row r = prompt r // n, sample r % n)."""
  tokens: list[list[int]]     # the completion's tokens (EOS and tokens after a stop excluded)
  reasons: list[str]          # one of FINISH_REASONS
  steps: int                  # decode steps run (max over rows)


def pad_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, max_position: int,
                pad_id: int, bucket: int = PROMPT_BUCKET) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a bucketed length. Returns (tokens [P, L], segment_ids [P, L]).

  InputError when a prompt plus max_new_tokens does not fit the model's positions.
  """
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise InputError("empty prompt: give at least one token of text")
  if longest + max_new_tokens > max_position:
    raise InputError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                     f"model's maximum length of {max_position} tokens; shorten the prompt or "
                     "lower --max_new_tokens")
  length = min(-(-longest // bucket) * bucket, max_position - max_new_tokens)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, length - len(p):] = p
    segments[r, length - len(p):] = 1
  return tokens, segments


HostCheck = Callable[[int, list[int]], bool]


def generate_ids(config: M.CodeGeeXConfig, params: Any, prompts: Sequence[Sequence[int]], *,
                 sampling: SamplingParams = SamplingParams(greedy=True),
                 max_new_tokens: int = 64, num_samples: int = 1, seed: int = 0,
                 eos_id: int = 50256, vocab_limit: Optional[int] = None,
                 rule: Optional[RuleTables] = None,
                 at_line_start: Optional[Sequence[bool]] = None,
                 row_ids: Optional[Sequence[int]] = None,
                 host_check: Optional[HostCheck] = None,
                 on_chunk: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
                 chunk_size: Optional[int] = None, mesh=None,
                 matmul: str = "auto", steps_per_loop: int = 1) -> Generation:
  """Samples `num_samples` continuations of each prompt (token ids in, token ids out).

  prompts: P token lists (ragged). Rows are ordered prompt-major: row r = prompt r // n.
  rule: device stop rule tables (`rule_tables`), None for no language rule.
  at_line_start: per prompt, whether it ends with a newline (initial rule state).
  row_ids: [P * n] seeding ids (default 0..B-1); `complete` passes global ids so results do not
    depend on batching.
  host_check(row, tokens_so_far) -> True to stop the row (stop strings); checked between chunks.
  on_chunk(tokens [B, T], lengths [B]): called with the host copy after each chunk (streaming).
  chunk_size: decode steps per while_loop call; default: all at once unless a host check or
    streaming needs the tokens earlier (then 16).
  mesh: run under this mesh with the logical axis rules (params already sharded).
  matmul: how the blocks' linears multiply (`decode_matmul.IMPLEMENTATIONS`; "auto": int8
    weights through the Pallas kernel on a GPU at decode shapes, XLA otherwise).
  steps_per_loop: decode steps per while-loop iteration (see DecodeSpec); 1 where the prompt
    leaves no room for the overrun.
  """
  validate_sampling(sampling.temperature, sampling.top_k, sampling.top_p,
                    max_new_tokens=max_new_tokens, num_samples=num_samples)
  rule = rule or NO_RULE
  if not (isinstance(steps_per_loop, (int, np.integer)) and steps_per_loop >= 1):
    raise InputError(f"steps_per_loop must be an integer >= 1, got {steps_per_loop}")
  if max(len(q) for q in prompts) + max_new_tokens + steps_per_loop - 1 > config.max_position:
    steps_per_loop = 1  # no room for the inner loop's overrun (DecodeSpec.room)
  p, n = len(prompts), num_samples
  b = p * n
  vocab_limit = config.vocab_size if vocab_limit is None else min(vocab_limit, config.vocab_size)
  spec = DecodeSpec(config=config, num_samples=n, max_new_tokens=max_new_tokens,
                    greedy=sampling.is_greedy, top_k=int(sampling.top_k),
                    use_top_p=sampling.top_p < 1.0, eos_id=eos_id, vocab_limit=vocab_limit,
                    rule=rule.kind, quantized=quantization.is_quantized(params),
                    matmul=matmul, steps_per_loop=int(steps_per_loop))
  prompt, segments = pad_prompts(prompts, spec.room, config.max_position, max(eos_id, 0))
  at_line_start = [True] * p if at_line_start is None else list(at_line_start)
  rule_init = np.repeat([rule_initial_state(rule.kind, a) for a in at_line_start], n)
  row_ids = np.arange(b) if row_ids is None else np.asarray(row_ids)
  temperature = jnp.float32(sampling.temperature if sampling.temperature > 0 else 1.0)
  top_p = jnp.float32(sampling.top_p)
  table = jnp.asarray(rule.table)
  if chunk_size is None:
    chunk_size = 16 if (host_check or on_chunk) else max_new_tokens

  ctx = contextlib.ExitStack()
  if mesh is not None:
    from geex_jax import partitioning
    ctx.enter_context(mesh)
    ctx.enter_context(partitioning.axis_rules())
  with ctx:
    cache, carry = _start(spec, params, jnp.asarray(prompt), jnp.asarray(segments),
                          jnp.asarray(row_ids, jnp.int32), seed,
                          jnp.asarray(rule_init, jnp.int32), temperature, top_p, table)
    host_stopped = np.zeros(b, bool)
    no_stop = jnp.zeros((b,), bool)
    dispatched = 1        # steps covered by the chunks queued so far
    unread = carry        # the newest carry the host has not looked at
    while unread is not None:
      # Queue the next chunk BEFORE reading the previous carry: the device keeps decoding while
      # the host decodes text. Host stops found now take effect at the chunk after this one.
      queued = None
      if dispatched < max_new_tokens:
        dispatched = min(dispatched + chunk_size, max_new_tokens)
        mask = jnp.asarray(host_stopped) if host_stopped.any() else no_stop
        cache, carry = _decode_chunk(spec, params, cache, carry, jnp.int32(dispatched), mask,
                                     temperature, top_p, table)
        queued = carry
      if host_check or on_chunk or queued is not None:
        tokens, lengths, done = jax.device_get((unread.tokens, unread.lengths, unread.done))
        if host_check:
          for r in np.flatnonzero(~host_stopped & ~done):
            if host_check(int(r), tokens[r, :lengths[r]].tolist()):
              host_stopped[r] = True
        if on_chunk:
          on_chunk(tokens, lengths)
        if (done | host_stopped).all():
          break
      unread = queued
    tokens, lengths, reasons, steps = jax.device_get(
        (carry.tokens, carry.lengths, carry.reason, carry.step))
    del cache
  out_tokens, out_reasons = [], []
  for r in range(b):
    toks = tokens[r, :lengths[r]].tolist()
    # The host stops a row only while the device still runs it, so its reason wins.
    reason = "stop_string" if host_stopped[r] else FINISH_REASONS[int(reasons[r])]
    out_tokens.append(toks)
    out_reasons.append(reason)
  return Generation(out_tokens, out_reasons, min(int(steps), max_new_tokens))


# ---------------------------------------------------------------------------------------------
# Beam search.


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
  def decode_spec(self) -> DecodeSpec:  # what _apply needs
    return DecodeSpec(self.config, 1, self.max_new_tokens, True, 0, False, self.eos_id,
                      self.vocab_limit, self.rule, self.quantized)


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
  logits, cache = _apply(dspec, params, cache, prompt, segment_ids)
  cache = M.map_cache_batch(spec.config, cache, lambda x, ax: jnp.repeat(x, w, axis=ax))
  logits = jnp.repeat(logits, w, axis=0)
  neg = jnp.float32(-jnp.inf)
  # Only beam 0 is live at first, so the first expansion does not produce W copies.
  alive_score = jnp.where(jnp.arange(w) == 0, 0.0, neg)[None].repeat(p, 0)
  init = dict(
      cache=cache, logits=logits, step=jnp.zeros((), jnp.int32),
      alive_seq=jnp.zeros((p, w, t), jnp.int32), alive_score=alive_score,
      alive_rule=jnp.repeat(rule_init[:, None], w, axis=1),
      fin_seq=jnp.zeros((p, w, t), jnp.int32), fin_score=jnp.full((p, w), neg),
      fin_len=jnp.zeros((p, w), jnp.int32), fin_end=jnp.zeros((p, w), bool))

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
    score2, idx2 = jax.lax.top_k(cand, 2 * w)                       # [P, 2W]
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
    logits, new_cache = _apply(dspec, params, new_cache, alive_tok.reshape(-1, 1))
    return dict(
        cache=new_cache, logits=logits, step=i + 1,
        alive_seq=jnp.take_along_axis(seq2, pick[:, :, None], axis=1), alive_score=alive_score,
        alive_rule=jnp.take_along_axis(rule2, pick, axis=1),
        fin_seq=take(all_seq), fin_score=fin_score, fin_len=take(all_len), fin_end=take(all_end))

  s = jax.lax.while_loop(cond, body, init)
  # Beams still alive at the end compete with the finished ones, at their full length.
  # (When the loop stopped early no live beam can beat the finished ones: leave them out.)
  alive_pen = jnp.where(s["step"] < t, neg, s["alive_score"] / _length_norm(s["step"], alpha))
  all_score = jnp.concatenate([s["fin_score"], alive_pen], axis=1)
  all_seq = jnp.concatenate([s["fin_seq"], s["alive_seq"]], axis=1)
  all_len = jnp.concatenate([s["fin_len"], jnp.broadcast_to(s["step"], (p, w))], axis=1)
  all_end = jnp.concatenate([s["fin_end"], jnp.zeros((p, w), bool)], axis=1)
  scores, keep = jax.lax.top_k(all_score, w)
  return (jnp.take_along_axis(all_seq, keep[:, :, None], axis=1),
          jnp.take_along_axis(all_len, keep, axis=1), scores,
          jnp.take_along_axis(all_end, keep, axis=1))


@dataclasses.dataclass
class BeamResult:
  tokens: list[list[list[int]]]   # [P][W] completion tokens (EOS excluded), best first
  scores: list[list[float]]       # [P][W] penalised scores, descending
  ended: list[list[bool]]         # [P][W] ended by EOS / stop rule (False: hit max_new_tokens)


def beam_search_ids(config: M.CodeGeeXConfig, params: Any, prompts: Sequence[Sequence[int]], *,
                    width: int, max_new_tokens: int = 64, length_penalty: float = 1.0,
                    eos_id: int = 50256, vocab_limit: Optional[int] = None,
                    rule: Optional[RuleTables] = None,
                    at_line_start: Optional[Sequence[bool]] = None, mesh=None) -> BeamResult:
  """Beam search of `width` beams per prompt; token ids in, the W best completions out.

  length_penalty alpha: score = sum log p / (generated tokens incl. EOS) ** alpha (0: raw sum).
  """
  validate_sampling(beam=width, max_new_tokens=max_new_tokens)
  rule = rule or NO_RULE
  prompt, segments = pad_prompts(prompts, max_new_tokens, config.max_position, max(eos_id, 0))
  vocab_limit = config.vocab_size if vocab_limit is None else min(vocab_limit, config.vocab_size)
  if width > vocab_limit:
    raise InputError(f"beam width {width} exceeds the vocabulary ({vocab_limit})")
  spec = BeamSpec(config, int(width), max_new_tokens, eos_id, vocab_limit, rule.kind,
                  quantization.is_quantized(params))
  at_line_start = [True] * len(prompts) if at_line_start is None else list(at_line_start)
  rule_init = np.array([rule_initial_state(rule.kind, a) for a in at_line_start], np.int32)
  ctx = contextlib.ExitStack()
  if mesh is not None:
    from geex_jax import partitioning
    ctx.enter_context(mesh)
    ctx.enter_context(partitioning.axis_rules())
  with ctx:
    out = _beam_search(spec, params, jnp.asarray(prompt), jnp.asarray(segments),
                       jnp.asarray(rule_init), jnp.float32(length_penalty),
                       jnp.asarray(rule.table))
    seqs, lengths, scores, ends = jax.device_get(out)
  return BeamResult(
      tokens=[[seqs[i, j, :lengths[i, j]].tolist() for j in range(width)]
              for i in range(len(prompts))],
      scores=scores.tolist(), ended=ends.tolist())


# ---------------------------------------------------------------------------------------------
# Text in, text out.


@dataclasses.dataclass
class Completion:
  """One completion: its final text (cut by the stop rules), tokens, and why it ended."""
  text: str
  tokens: list[int]
  finish_reason: str              # "length", "eos", "stop_rule", "stop_string"
  score: Optional[float] = None   # beam search: the penalised score


def cut_text(text: str, language: Optional[str] = None, stop: Sequence[str] = (),
             at_line_start: bool = True) -> str:
  """The completion text as the reference rules end it: the language rule
  (`stop_rules.truncate`; a prompt ending mid-line keeps its first line), then the first stop
  string (excluded)."""
  if language is not None:
    lang = languages.get(language)
    if lang.stop_rule == RULE_TOP_LEVEL and not at_line_start:
      end = stop_rules.top_level_end(text, at_line_start=False)
      text = text if end is None else text[:end]
    else:
      text = stop_rules.truncate(lang, text)
  cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
  return text[:min(cuts)] if cuts else text


def _stable_length(text: str, rule: str, at_line_start: bool, stop: Sequence[str]) -> int:
  """How much of an unfinished completion's cut text can no longer change (streaming)."""
  n = len(text)
  while n and text[n - 1] == "\ufffd":  # maybe half of a multi-byte character
    n -= 1
  if stop:
    n = min(n, len(text) - max(len(s) for s in stop) + 1)
  if rule == RULE_TOP_LEVEL:
    nl = text.rfind("\n")
    line = text[nl + 1:]
    if not (nl < 0 and not at_line_start) and line[:1] not in (" ", "\t"):
      n = min(n, nl + 1)  # this line may still turn out to be a new top-level line
  return max(n, 0)


class Sampler:
  """A loaded model + tokenizer that turns prompts into completions.

  >>> s = Sampler.load("ckpt/", "codegeex_tokenizer/", dtype="bf16", int8=True)
  >>> s.complete(["def add(a, b):\\n"], n=2, temperature=0.8, top_p=0.95, language="python")
  [['    return a + b\\n', ...]]
  """

  def __init__(self, config: M.CodeGeeXConfig, params: Any, tokenizer, *, mesh=None,
               max_batch: int = 32, steps_per_loop: int = 1):
    if tokenizer.vocab_size > config.vocab_size:
      raise InputError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only "
                       f"{config.vocab_size}; wrong --tokenizer for this checkpoint?")
    if config.scan_layers:
      # Decode with the layers unrolled: with a scanned stack XLA slices every layer's weights
      # out of the stacked arrays each step; unrolled, 13B bf16 batch-1 decode on an H200 went
      # from 19.8 to 7.4 ms/token (BENCHMARKS.md, Sampling).
      params = M.convert_layout(params, config, False)
      config = config.replace(scan_layers=False)
    self.config = config
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.max_batch = max_batch
    self.steps_per_loop = steps_per_loop   # see DecodeSpec

  @classmethod
  def load(cls, checkpoint, tokenizer=None, *, dtype: str = "fp32", int8: bool = False,
           mesh=None, max_batch: int = 32) -> "Sampler":
    """Restores a geex-jax checkpoint (converted or trained).

    tokenizer: a directory of the released tokenizer files, a tokenizer object, or None for the
      byte-level fallback. dtype: "fp32" | "bf16" (params and compute). int8: quantize the
      blocks' linears (weight-only). mesh: shard weights over its `model` axis (tensor parallel).
    """
    from geex_jax import checkpoints, tokenizer as tok
    try:
      compute = M.as_dtype(dtype)
    except ValueError as e:
      raise InputError(str(e)) from None
    # Restored unrolled directly (see __init__): no stacking then unstacking.
    config, params = checkpoints.load_params(checkpoint, dtype=compute, scan_layers=False)
    config = config.replace(dtype=compute.name, param_dtype=compute.name, dropout_rate=0.0,
                            remat_policy="none")
    if int8:
      params = jax.jit(quantization.quantize_params)(params)
    if mesh is not None:
      from geex_jax import partitioning
      specs = (quantization.quantized_logical_specs(config) if int8
               else M.param_logical_specs(config))
      params = partitioning.shard_params(params, specs, mesh)
    if not hasattr(tokenizer, "encode"):
      tokenizer = tok.load_tokenizer(tokenizer)
    return cls(config, params, tokenizer, mesh=mesh, max_batch=max_batch)

  # -- helpers -------------------------------------------------------------------------------

  def prompt_text(self, prompt: str, language: Optional[str], add_tag: bool = True) -> str:
    """The text the model sees: the language tag line + prompt when a language is given."""
    if language is None or not add_tag:
      return prompt
    return languages.get(language).tag + "\n" + prompt

  def _encode(self, prompt: str, language: Optional[str], add_tag: bool) -> list[int]:
    ids = self.tokenizer.encode(self.prompt_text(prompt, language, add_tag))
    if not ids:
      raise InputError("empty prompt: give at least one character of text")
    if len(ids) >= self.config.max_position:
      raise InputError(f"prompt has {len(ids)} tokens; the model reads at most "
                       f"{self.config.max_position - 1} before generating")
    return ids

  def _rule(self, language: Optional[str]) -> RuleTables:
    kind = languages.get(language).stop_rule if language else None
    return rule_tables(self.tokenizer, kind, self.config.vocab_size)

  def _fit_new_tokens(self, ids: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    room = self.config.max_position - max(len(i) for i in ids)
    if room < max_new_tokens:
      log.warning("max_new_tokens %d lowered to %d: the prompt leaves no more room in the "
                  "model's %d positions", max_new_tokens, room, self.config.max_position)
    return min(max_new_tokens, room)

  # -- sampling ------------------------------------------------------------------------------

  def complete_detailed(self, prompts: Sequence[str], n: int = 1, *, temperature: float = 1.0,
                        top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
                        max_new_tokens: int = 256, language=None, stop: Sequence[str] = (),
                        seed: int = 0, add_tag: bool = True) -> list[list[Completion]]:
    """n completions of each prompt, as `Completion`s ([P][n]).

    language: None, one name for all prompts, or one name (or None) per prompt; it selects the
      tag line (when add_tag) and the stop rule. Seeds: sample j of prompt i uses row id
      i * n + j, so results do not depend on max_batch.
    """
    sampling = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    validate_sampling(temperature, top_k, top_p, max_new_tokens=max_new_tokens, num_samples=n)
    langs = ([language] * len(prompts) if language is None or isinstance(language, str)
             else list(language))
    if len(langs) != len(prompts):
      raise InputError(f"{len(langs)} languages for {len(prompts)} prompts")
    ids = [self._encode(p, l, add_tag) for p, l in zip(prompts, langs)]
    at_start = [p.endswith("\n") or p == "" for p in prompts]
    results: list[list[Completion]] = [[] for _ in prompts]
    # Batches: prompts with the same stop rule, ceil(max_batch / n) prompts at a time; with
    # n > max_batch a prompt's samples are drawn in rounds of max_batch rows.
    by_rule: dict[str, list[int]] = {}
    for i, l in enumerate(langs):
      by_rule.setdefault(self._rule(l).kind, []).append(i)
    per_batch = max(1, self.max_batch // n)
    rounds = [(0, n)] if n <= self.max_batch else [
        (j, min(self.max_batch, n - j)) for j in range(0, n, self.max_batch)]
    for kind, members in by_rule.items():
      rule = self._rule(langs[members[0]])
      for k in range(0, len(members), per_batch):
        group = members[k:k + per_batch]
        new = self._fit_new_tokens([ids[i] for i in group], max_new_tokens)
        for first, count in rounds:
          row_ids = [i * n + first + j for i in group for j in range(count)]
          row_lang = [langs[i] for i in group for _ in range(count)]
          row_start = [at_start[i] for i in group for _ in range(count)]
          check = self._host_check(row_lang, row_start, stop)
          gen = generate_ids(
              self.config, self.params, [ids[i] for i in group], sampling=sampling,
              max_new_tokens=new, num_samples=count, seed=seed,
              eos_id=self.tokenizer.eos_id, vocab_limit=self.tokenizer.vocab_size, rule=rule,
              at_line_start=[at_start[i] for i in group], row_ids=row_ids, host_check=check,
              mesh=self.mesh, steps_per_loop=self.steps_per_loop)
          for r, (toks, reason) in enumerate(zip(gen.tokens, gen.reasons)):
            text = self.tokenizer.decode(toks)
            cut = cut_text(text, row_lang[r], stop, row_start[r])
            if reason in ("length", "eos") and cut != text:
              reason = "stop_rule" if cut_text(text, row_lang[r], (), row_start[r]) != text \
                  else "stop_string"
            results[group[r // count]].append(Completion(cut, toks, reason))
    return results

  def _host_check(self, row_lang, row_start, stop) -> Optional[HostCheck]:
    """Between chunks: stop a row on a stop string, or when the exact text rule fires (a safety
    net for the rare case the byte automaton fires later, see _top_level_next)."""
    if not stop and not any(row_lang):
      return None
    decode = self.tokenizer.decode

    def check(r: int, toks: list[int]) -> bool:
      if not toks:
        return False
      text = decode(toks)
      return cut_text(text, row_lang[r], stop, row_start[r]) != text
    return check

  def complete(self, prompts: Sequence[str], n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 256, language=None, **kwargs
               ) -> list[list[str]]:
    """n completion texts per prompt ([P][n]), cut by the language rule and stop strings.

    The evaluator's entry point. kwargs: top_k, greedy, stop, seed, add_tag (see
    `complete_detailed`). temperature 0 is greedy.
    """
    out = self.complete_detailed(prompts, n, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, language=language, **kwargs)
    return [[c.text for c in row] for row in out]

  def beam(self, prompts: Sequence[str], width: int, *, n: Optional[int] = None,
           length_penalty: float = 1.0, max_new_tokens: int = 256, language=None,
           stop: Sequence[str] = (), add_tag: bool = True) -> list[list[Completion]]:
    """Beam search: the n (default width) best beams per prompt, best first, with scores."""
    validate_sampling(beam=width, max_new_tokens=max_new_tokens)
    n = width if n is None else n
    if not 1 <= n <= width:
      raise InputError(f"num_samples {n} must be between 1 and the beam width {width}")
    langs = ([language] * len(prompts) if language is None or isinstance(language, str)
             else list(language))
    out: list[list[Completion]] = []
    for prompt, lang in zip(prompts, langs):
      ids = self._encode(prompt, lang, add_tag)
      at_start = prompt.endswith("\n") or prompt == ""
      res = beam_search_ids(
          self.config, self.params, [ids], width=width,
          max_new_tokens=self._fit_new_tokens([ids], max_new_tokens),
          length_penalty=length_penalty, eos_id=self.tokenizer.eos_id,
          vocab_limit=self.tokenizer.vocab_size, rule=self._rule(lang), at_line_start=[at_start],
          mesh=self.mesh)
      row = []
      for toks, score, ended in zip(res.tokens[0][:n], res.scores[0][:n], res.ended[0][:n]):
        text = self.tokenizer.decode(toks)
        cut = cut_text(text, lang, stop, at_start)
        reason = "stop_string" if cut != cut_text(text, lang, (), at_start) else (
            "eos" if ended else "length")
        row.append(Completion(cut, toks, reason, score))
      out.append(row)
    return out

  def stream(self, prompt: str, write: Callable[[str], Any], *, temperature: float = 1.0,
             top_p: float = 1.0, top_k: int = 0, greedy: bool = False,
             max_new_tokens: int = 256, language: Optional[str] = None,
             stop: Sequence[str] = (), seed: int = 0, add_tag: bool = True,
             chunk_size: int = 4) -> Completion:
    """Samples one completion of one prompt, passing text to `write` as soon as it is final.

    The concatenation of everything written equals the returned Completion.text.
    """
    sampling = SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = self._encode(prompt, language, add_tag)
    at_start = prompt.endswith("\n") or prompt == ""
    rule = self._rule(language)
    emitted = 0
    decode = self.tokenizer.decode

    def on_chunk(tokens, lengths):
      nonlocal emitted
      text = cut_text(decode(tokens[0, :lengths[0]].tolist()), language, stop, at_start)
      upto = _stable_length(text, rule.kind, at_start, stop)
      if upto > emitted:
        write(text[emitted:upto])
        emitted = upto

    gen = generate_ids(
        self.config, self.params, [ids], sampling=sampling,
        max_new_tokens=self._fit_new_tokens([ids], max_new_tokens), seed=seed,
        eos_id=self.tokenizer.eos_id, vocab_limit=self.tokenizer.vocab_size, rule=rule,
        at_line_start=[at_start], host_check=self._host_check([language], [at_start], stop),
        on_chunk=on_chunk, chunk_size=chunk_size, mesh=self.mesh,
        steps_per_loop=self.steps_per_loop)
    toks = gen.tokens[0]
    text = decode(toks)
    cut = cut_text(text, language, stop, at_start)
    if len(cut) > emitted:
      write(cut[emitted:])
    reason = gen.reasons[0]
    if reason in ("length", "eos") and cut != text:
      reason = "stop_rule" if cut_text(text, language, (), at_start) != text else "stop_string"
    return Completion(cut, toks, reason)
