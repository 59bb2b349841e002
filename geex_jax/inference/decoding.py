"""Decoding token ids with the KV cache: prefill once, then a jitted `lax.while_loop` of steps.

Shapes: P = prompts in a batch, n = samples per prompt, B = P * n decode rows, L = padded prompt
length, T = max new tokens, V = vocabulary.

How a batch is generated (`generate_ids`):
  1. Prompts are left-padded to a bucketed length (segment id 0 = padding, see model.py) and
     prefilled ONCE; the prefilled cache is repeated n times along the batch axis (`num_samples`
     costs no extra prefill).
  2. Decoding runs inside `lax.while_loop` in chunks of up to `chunk_size` tokens; the loop exits
     as soon as every row has ended. EOS, max_new_tokens and the language stop rule are checked ON
     THE DEVICE: the Python "new top-level line" rule and the brace rule are tiny automata over the
     bytes of each token, precomputed as per-token tables (`inference.stop_automata`), so they
     cost a gather per step and no host round trip.
  3. User stop strings (and, as a safety net, the exact text rule of `geex_jax.stop_rules`) are
     checked on the host between chunks, by the caller's `host_check` (`inference.sampler`). The
     host check of chunk k runs while chunk k + 1 is already queued on the device, so the device
     never waits for Python; a row stopped by the host is masked at the start of the chunk after
     that (its extra tokens are cut off anyway).

Randomness: every row has its own key, `fold_in(key(seed), row_id)` with row_id = prompt index *
n + sample index, folded again with the step. A row's sample therefore does not depend on how rows
are batched, and the same seed reproduces the same output.

Beam search (`geex_jax.inference.beam_search`) reuses `DecodeSpec`, `forward` and `pad_prompts`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.inference import decode_matmul
from geex_jax.model import partitioning
from geex_jax.inference import quantization
from geex_jax.model import codegeex as M
from geex_jax.errors import InputError
from geex_jax.inference.stop_automata import NO_RULE, RuleTables, rule_initial_state, rule_step
from geex_jax.inference.token_choice import (
  NEG_INF,
  SamplingParams,
  sample_tokens,
  seed_value,
  validate_sampling,
)

Array = jax.Array

# Prompt lengths are padded up to a multiple of this, so a run over many prompts compiles a
# handful of shapes rather than one per prompt length.
PROMPT_BUCKET = 64


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
  eos_id: int  # -1: no EOS (benchmarks)
  vocab_limit: int  # ids >= this are never produced (the tokenizer cannot decode them)
  rule: str
  quantized: bool
  matmul: str = "auto"  # decode_matmul.IMPLEMENTATIONS: how the blocks' linears multiply
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
  tokens: Array  # [B, T] int32 new tokens (EOS after a row ended)
  lengths: Array  # [B] int32 tokens that belong to the completion (EOS excluded)
  step: Array  # [] int32 tokens generated so far (all rows)
  done: Array  # [B] bool
  reason: Array  # [B] int32, see FINISH_REASONS
  rule_state: Array  # [B] int32
  keys: Array  # [B] typed PRNG keys of the rows


FINISH_REASONS = ("length", "eos", "stop_rule", "stop_string")
_LENGTH, _EOS, _RULE, _STOP = range(4)


def forward(spec: DecodeSpec, params, cache, tokens, segment_ids=None):
  """One decode-mode forward. tokens: [B, t] -> (logits [B, V] fp32 of the last position, cache)."""
  model = M.CodeGeeX(spec.config)
  logits, state = decode_matmul.apply(
    model,
    {"params": params, "cache": cache},
    tokens,
    segment_ids=segment_ids,
    decode=True,
    only_last=True,
    mutable=["cache"],
    matmul_impl=spec.matmul,
  )
  logits = logits[:, 0]
  if spec.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < spec.vocab_limit, logits, NEG_INF)
  return logits, state["cache"]


def _choose(
  spec: DecodeSpec, st: DecodeState, logits: Array, temperature, top_p, rule_table
) -> DecodeState:
  """Samples token `st.step` of every row from logits [B, V] and updates the stop state."""
  keys = jax.vmap(jax.random.fold_in, (0, None))(st.keys, st.step)
  tok = sample_tokens(
    logits,
    keys,
    greedy=spec.greedy,
    top_k=spec.top_k,
    use_top_p=spec.use_top_p,
    temperature=temperature,
    top_p=top_p,
  )
  pad = max(spec.eos_id, 0)
  tok = jnp.where(st.done, pad, tok)
  rule_state, fired = rule_step(spec.rule, rule_table, st.rule_state, tok)
  is_eos = tok == spec.eos_id
  live = ~st.done
  lengths = st.lengths + (live & ~is_eos).astype(jnp.int32)
  reason = jnp.where(live & is_eos, _EOS, jnp.where(live & fired, _RULE, st.reason))
  done = st.done | is_eos | fired | (st.step + 1 >= spec.max_new_tokens)
  return st._replace(
    tokens=st.tokens.at[:, st.step].set(tok),
    lengths=lengths,
    step=st.step + 1,
    done=done,
    reason=reason,
    rule_state=rule_state,
  )


# XLA options for the decode programs. Each layer's query, key and value products share their
# input; with the dot merger's default size limit XLA merged only two of them, and raising the
# limit took 13B bf16 batch-1 decoding from 7.28 to 7.12 ms/token on an H200 (BENCHMARKS.md).
# Only XLA:GPU reads it.
DECODE_COMPILER_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 1024}


@functools.partial(jax.jit, static_argnames=("spec",), compiler_options=DECODE_COMPILER_OPTIONS)
def prefill(
  spec: DecodeSpec,
  params,
  prompt,
  segment_ids,
  row_ids,
  seed,
  rule_init,
  temperature,
  top_p,
  rule_table,
) -> tuple[Any, DecodeState]:
  """Prefill [P, L] prompts once, repeat for n samples, choose every row's first token.

  row_ids: [P * n] int32 global row numbers (seeding). rule_init: [P * n] int32.
  Returns (cache, carry); carry.cache is None (the cache travels separately so that it alone is
  donated to the next chunk while the host still reads the previous carry).
  """
  p, l = prompt.shape
  n = spec.num_samples
  cache = M.init_cache(spec.config, p, l + spec.room, spec.config.compute_dtype)
  logits, cache = forward(spec, params, cache, prompt, segment_ids)
  if n > 1:
    cache = M.map_cache_batch(spec.config, cache, lambda x, ax: jnp.repeat(x, n, axis=ax))
    logits = jnp.repeat(logits, n, axis=0)
  b = p * n
  base = jax.random.key(seed)
  st = DecodeState(
    cache=None,
    tokens=jnp.full((b, spec.room), max(spec.eos_id, 0), jnp.int32),
    lengths=jnp.zeros((b,), jnp.int32),
    step=jnp.zeros((), jnp.int32),
    done=jnp.zeros((b,), bool),
    reason=jnp.full((b,), _LENGTH, jnp.int32),
    rule_state=rule_init,
    keys=jax.vmap(jax.random.fold_in, (None, 0))(base, row_ids),
  )
  st = _choose(spec, st, logits, temperature, top_p, rule_table)
  st = st._replace(done=st.done | (st.step >= spec.max_new_tokens))
  return cache, st


@functools.partial(
  jax.jit,
  static_argnames=("spec",),
  donate_argnames=("cache",),
  compiler_options=DECODE_COMPILER_OPTIONS,
)
def decode_chunk(
  spec: DecodeSpec,
  params,
  cache,
  st: DecodeState,
  stop_at,
  host_done,
  temperature,
  top_p,
  rule_table,
) -> tuple[Any, DecodeState]:
  """Decodes until step == stop_at or every row has ended. host_done: [B] rows the host stopped.

  The cache is donated (updated in place); the carry `st` is not, so the host may still read it.
  """
  st = st._replace(
    cache=cache, done=st.done | host_done, reason=jnp.where(host_done & ~st.done, _STOP, st.reason)
  )

  def cond(s):
    return (s.step < stop_at) & ~jnp.all(s.done)

  def step(s):
    last = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)  # [B, 1]
    logits, new_cache = forward(spec, params, s.cache, last)
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

  tokens: list[list[int]]  # the completion's tokens (EOS and tokens after a stop excluded)
  reasons: list[str]  # one of FINISH_REASONS
  steps: int  # decode steps run (max over rows)


def pad_prompts(
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  max_position: int,
  pad_id: int,
  bucket: int = PROMPT_BUCKET,
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to a bucketed length. Returns (tokens [P, L], segment_ids [P, L]).

  InputError when a prompt plus max_new_tokens does not fit the model's positions.
  """
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise InputError("empty prompt: give at least one token of text")
  if longest + max_new_tokens > max_position:
    raise InputError(
      f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
      f"model's maximum length of {max_position} tokens; shorten the prompt or "
      "lower --max_new_tokens"
    )
  length = min(-(-longest // bucket) * bucket, max_position - max_new_tokens)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for r, p in enumerate(prompts):
    tokens[r, length - len(p) :] = p
    segments[r, length - len(p) :] = 1
  return tokens, segments


HostCheck = Callable[[int, list[int]], bool]


def generate_ids(
  config: M.CodeGeeXConfig,
  params: Any,
  prompts: Sequence[Sequence[int]],
  *,
  sampling: SamplingParams = SamplingParams(greedy=True),
  max_new_tokens: int = 64,
  num_samples: int = 1,
  seed: int = 0,
  eos_id: int = 50256,
  vocab_limit: Optional[int] = None,
  rule: Optional[RuleTables] = None,
  at_line_start: Optional[Sequence[bool]] = None,
  row_ids: Optional[Sequence[int]] = None,
  host_check: Optional[HostCheck] = None,
  on_chunk: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
  chunk_size: Optional[int] = None,
  mesh=None,
  matmul: str = "auto",
  steps_per_loop: int = 1,
) -> Generation:
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
  validate_sampling(
    sampling.temperature,
    sampling.top_k,
    sampling.top_p,
    max_new_tokens=max_new_tokens,
    num_samples=num_samples,
  )
  rule = rule or NO_RULE
  if not (isinstance(steps_per_loop, (int, np.integer)) and steps_per_loop >= 1):
    raise InputError(f"steps_per_loop must be an integer >= 1, got {steps_per_loop}")
  if max(len(q) for q in prompts) + max_new_tokens + steps_per_loop - 1 > config.max_position:
    steps_per_loop = 1  # no room for the inner loop's overrun (DecodeSpec.room)
  p, n = len(prompts), num_samples
  b = p * n
  vocab_limit = config.vocab_size if vocab_limit is None else min(vocab_limit, config.vocab_size)
  spec = DecodeSpec(
    config=config,
    num_samples=n,
    max_new_tokens=max_new_tokens,
    greedy=sampling.is_greedy,
    top_k=int(sampling.top_k),
    use_top_p=sampling.top_p < 1.0,
    eos_id=eos_id,
    vocab_limit=vocab_limit,
    rule=rule.kind,
    quantized=quantization.is_quantized(params),
    matmul=matmul,
    steps_per_loop=int(steps_per_loop),
  )
  prompt, segments = pad_prompts(prompts, spec.room, config.max_position, max(eos_id, 0))
  at_line_start = [True] * p if at_line_start is None else list(at_line_start)
  rule_init = np.repeat([rule_initial_state(rule.kind, a) for a in at_line_start], n)
  row_ids = np.arange(b) if row_ids is None else np.asarray(row_ids)
  temperature = jnp.float32(sampling.temperature if sampling.temperature > 0 else 1.0)
  top_p = jnp.float32(sampling.top_p)
  table = jnp.asarray(rule.table)
  if chunk_size is None:
    chunk_size = 16 if (host_check or on_chunk) else max_new_tokens

  with partitioning.mesh_context(mesh):
    cache, carry = prefill(
      spec,
      params,
      jnp.asarray(prompt),
      jnp.asarray(segments),
      jnp.asarray(row_ids, jnp.int32),
      seed_value(seed),
      jnp.asarray(rule_init, jnp.int32),
      temperature,
      top_p,
      table,
    )
    host_stopped = np.zeros(b, bool)
    no_stop = jnp.zeros((b,), bool)
    dispatched = 1  # steps covered by the chunks queued so far
    unread = carry  # the newest carry the host has not looked at
    while unread is not None:
      # Queue the next chunk BEFORE reading the previous carry: the device keeps decoding while
      # the host decodes text. Host stops found now take effect at the chunk after this one.
      queued = None
      if dispatched < max_new_tokens:
        dispatched = min(dispatched + chunk_size, max_new_tokens)
        mask = jnp.asarray(host_stopped) if host_stopped.any() else no_stop
        cache, carry = decode_chunk(
          spec, params, cache, carry, jnp.int32(dispatched), mask, temperature, top_p, table
        )
        queued = carry
      if host_check or on_chunk or queued is not None:
        tokens, lengths, done = jax.device_get((unread.tokens, unread.lengths, unread.done))
        if host_check:
          for r in np.flatnonzero(~host_stopped & ~done):
            if host_check(int(r), tokens[r, : lengths[r]].tolist()):
              host_stopped[r] = True
        if on_chunk:
          on_chunk(tokens, lengths)
        if (done | host_stopped).all():
          break
      unread = queued
    tokens, lengths, reasons, steps = jax.device_get(
      (carry.tokens, carry.lengths, carry.reason, carry.step)
    )
    del cache
  out_tokens, out_reasons = [], []
  for r in range(b):
    toks = tokens[r, : lengths[r]].tolist()
    # The host stops a row only while the device still runs it, so its reason wins.
    reason = "stop_string" if host_stopped[r] else FINISH_REASONS[int(reasons[r])]
    out_tokens.append(toks)
    out_reasons.append(reason)
  return Generation(out_tokens, out_reasons, min(int(steps), max_new_tokens))
