"""Continuous batching: a fixed pool of KV-cache slots that requests join and leave between chunks.

Shapes: S = slots, M = max_length (cache positions per slot), Lb = a prompt's bucketed length
(a power of two, at most M), k = decode steps per chunk, V = vocabulary.

The device side is three jitted programs (`inference.slot_programs`), none of which depends on a
request's parameters:
  prefill   one prompt [1, Lb] (left-padded, `decoding.forward`) -> its last logits and its
            cache. Compiled once per bucket.
  insert    copies that cache into slot s of the pool (rolled so the prompt starts at position 0:
            no capacity lost to padding) and chooses the slot's first token from the logits.
            Called once per sample of a request (n samples share one prefill); one program for
            all buckets (the prefill pads its cache to M).
  chunk     k decode steps over all S slots at once (a `while_loop` that exits early when every
            slot is idle); the pool state is donated, so it is updated in place.
Per-slot sampling parameters (temperature, top-k, top-p, greedy, token budget, language stop rule,
RNG key) are arrays [S], so a new request never forces a recompile.

Every slot keeps its own cache position: the model's decode step is `jax.vmap`ped over slots, each
seeing a batch-1 cache with its own `cache_index` (the model, with a shared index per batch, is
used unchanged). An idle slot's index is frozen, so it never runs past M.

Randomness: sample j of a request with seed s uses `fold_in(key(s), first_row + j)`, folded again
with the token's step, exactly like `decoding.generate_ids` with row id first_row + j. Greedy and
temperature-only sampling therefore give the same tokens as `Sampler.complete` for prompt i of a
call with n samples when first_row = i * n (up to float rounding between different batch
shapes); top-k / top-p use per-row thresholds (from the top 256 logits, or a full sort where those
do not hold the answer), which equal `token_choice.filter_logits`' up to the rounding of the
nucleus mass.

One host thread (`Engine`'s worker) owns the device. Between chunks it admits waiting samples into
free slots, reads the previous chunk's tokens (the next chunk is already queued: the device does
not wait for Python), detokenizes incrementally, applies stop strings and the exact text stop rules
(`sampler.cut_text`), and frees finished or cancelled slots. Callers get a `RequestHandle` whose
events are text deltas and, per sample, one `Finished`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import secrets
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax import languages
from geex_jax.errors import GeexError, InputError
from geex_jax.inference import quantization
from geex_jax.inference import stop_automata as SA
from geex_jax.inference import slot_programs as P
from geex_jax.inference.decoding import FINISH_REASONS, DecodeSpec
from geex_jax.inference.slot_programs import EngineSpec, SlotParams
from geex_jax.inference.sampler import Sampler, _completion, _ends_line, _stable_length, cut_text
from geex_jax.inference.token_choice import seed_value, validate_sampling
from geex_jax.model import codegeex as M

log = logging.getLogger(__name__)
Array = jax.Array

MIN_BUCKET = 16


class QueueFullError(GeexError):
  """The waiting queue is full: try again later (the server answers 429)."""


class ShuttingDownError(GeexError):
  """The engine is draining and takes no new requests (the server answers 503)."""


def bucket_length(length: int, max_length: int) -> int:
  """The prefill length of a prompt: the next power of two >= length (at least MIN_BUCKET),
  capped at max_length."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


# ---------------------------------------------------------------------------------------------
# Requests and their handles (host side).


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
  """One prompt and how to complete it (n samples). temperature 0 or greedy: argmax."""

  prompt: str
  n: int = 1
  max_tokens: int = 16
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  greedy: bool = False
  seed: Optional[int] = None  # None: a random seed
  stop: tuple[str, ...] = ()
  language: Optional[str] = None  # prepends its tag line (add_tag) and applies its stop rule
  add_tag: bool = True
  # Sample j draws from fold_in(key(seed), first_row + j): the keys of Sampler rows
  # first_row..first_row+n-1 (prompt i of a Sampler call with n samples: first_row = i * n).
  first_row: int = 0
  # Report each completion token's log-probability and the `logprobs` most likely tokens at its
  # step (0..slot_programs.LOGPROBS); None: none.
  logprobs: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Delta:
  """New final text of sample `index` (and, when asked, the log-probabilities of the tokens that
  start in it: `logprobs`, in the OpenAI completions format)."""

  index: int
  text: str
  logprobs: Optional[dict] = None


@dataclasses.dataclass(frozen=True)
class Finished:
  """Sample `index` has ended: `text` is its whole (cut) completion; reason is one of
  decoding.FINISH_REASONS or "cancelled"."""

  index: int
  text: str
  reason: str
  num_tokens: int
  # When asked: {"tokens", "token_logprobs", "top_logprobs", "text_offset"} of the whole
  # completion's tokens (those that start within `text`).
  logprobs: Optional[dict] = None

  @property
  def openai_reason(self) -> str:
    return "length" if self.reason == "length" else "stop"


class RequestHandle:
  """What `Engine.submit` returns: events (Delta, Finished) of the request's samples, and
  `cancel()`. Sync callers iterate `events()`; async callers pass `loop` to submit and use
  `aevents()`."""

  def __init__(self, request: CompletionRequest, prompt_tokens: int, loop=None):
    self.request = request
    self.prompt_tokens = prompt_tokens
    self.submitted = time.monotonic()
    self.first_token_at: Optional[float] = None
    self.finished_at: Optional[float] = None
    self.completion_tokens = 0
    self.cancelled = False
    self._open = request.n
    self._loop = loop
    self._queue: Any = asyncio.Queue() if loop is not None else queue.Queue()
    self._engine: Optional["Engine"] = None

  # -- engine side
  def _push(self, event) -> None:
    if self._loop is not None:
      try:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
      except RuntimeError:  # the loop has closed: nobody listens any more
        pass
    else:
      self._queue.put(event)

  # -- caller side
  @property
  def done(self) -> bool:
    return self.finished_at is not None

  def cancel(self) -> None:
    """Stops every sample (queued or running); its slots are freed between chunks."""
    if self._engine is not None and not self.done:
      self._engine._cancel(self)

  def events(self, timeout: Optional[float] = None):
    """Yields Delta / Finished events until every sample has finished (sync callers)."""
    left = self.request.n
    while left:
      ev = self._queue.get(timeout=timeout)
      left -= isinstance(ev, Finished)
      yield ev

  async def aevents(self):
    left = self.request.n
    while left:
      ev = await self._queue.get()
      left -= isinstance(ev, Finished)
      yield ev

  def result(self, timeout: Optional[float] = None) -> list[Finished]:
    """Blocks until done; the Finished event of every sample, by index."""
    out = [ev for ev in self.events(timeout) if isinstance(ev, Finished)]
    return sorted(out, key=lambda e: e.index)

  @property
  def open_samples(self) -> int:
    """Samples of this request that have not finished yet."""
    return self._open

  @property
  def ttft(self) -> Optional[float]:
    return None if self.first_token_at is None else self.first_token_at - self.submitted


class _Sample:
  """Host bookkeeping of one sample of a request while it waits or runs in a slot."""

  def __init__(self, handle: RequestHandle, index: int, ids: list[int], seed: int, new: int):
    self.handle = handle
    self.index = index
    self.ids = ids
    self.seed = seed
    self.max_tokens = new
    self.tokens: list[int] = []
    self.emitted = 0  # characters of final text sent
    self.slot: Optional[int] = None
    self.finished = False
    # With logprobs: per token (log p, top ids, top log p) and its offset in the decoded text.
    self.scores: list[tuple[float, list[int], list[float]]] = []
    self.offsets: list[int] = []
    self.scores_sent = 0
    self.dispatched = 0  # decode steps queued for its slot (an upper bound of those run)

  def reach(self, k: int) -> int:
    """Cache positions the next chunk of k steps may touch (prompt + tokens so far + k)."""
    return len(self.ids) + min(self.dispatched + k, self.max_tokens)

  @property
  def at_start(self) -> bool:
    return _ends_line(self.handle.request.prompt)


# ---------------------------------------------------------------------------------------------
# The engine.


class Engine:
  """A continuous-batching server core over a loaded `Sampler`'s model and tokenizer.

  >>> engine = Engine(Sampler.load("ckpt/", "tokenizer/"), slots=8, max_length=1024)
  >>> engine.start()   # the worker thread; engine.ready is set once the programs are compiled
  >>> h = engine.submit(CompletionRequest("def add(a, b):\\n", max_tokens=64, language="python"))
  >>> h.result()[0].text
  """

  def __init__(
    self,
    sampler: Sampler,
    *,
    slots: int = 8,
    max_length: Optional[int] = None,
    chunk: int = 8,
    max_waiting: int = 64,
  ):
    config = sampler.config
    max_length = config.max_position if max_length is None else max_length
    for name, value, low in (
      ("slots", slots, 1),
      ("max_length", max_length, 2),
      ("chunk", chunk, 1),
    ):
      if not (isinstance(value, (int, np.integer)) and value >= low):
        raise InputError(f"{name} must be an integer >= {low}, got {value}")
    if max_length > config.max_position:
      raise InputError(
        f"max_length {max_length} exceeds the model's {config.max_position} positions"
      )
    if max_waiting < 0:
      raise InputError(f"max_waiting must be >= 0, got {max_waiting}")
    self.sampler = sampler
    self.tokenizer = sampler.tokenizer
    self.params = sampler.params
    self.max_waiting = max_waiting
    decode = DecodeSpec(
      config=config,
      num_samples=1,
      max_new_tokens=1,
      greedy=False,
      top_k=0,
      use_top_p=False,
      eos_id=self.tokenizer.eos_id,
      vocab_limit=min(self.tokenizer.vocab_size, config.vocab_size),
      rule="mixed",
      quantized=quantization.is_quantized(sampler.params),
      matmul="xla",  # the Pallas kernel is for batch-1 shapes; here the slots form the batch
    )
    self.mesh = sampler.mesh
    self.spec = EngineSpec(
      decode, int(slots), int(max_length), int(chunk), self.tokenizer.eos_id, self.mesh
    )
    # Attention windows of the chunk program (max_length / 8, / 4, / 2, max_length): a chunk
    # attends over the smallest that holds its running samples, not always over max_length.
    self.windows = sorted(
      {min(self.spec.max_length, max(MIN_BUCKET, self.spec.max_length >> i)) for i in range(4)}
    )
    top = SA.rule_tables(self.tokenizer, SA.RULE_TOP_LEVEL, config.vocab_size).table
    brace = SA.rule_tables(self.tokenizer, SA.RULE_BRACE, config.vocab_size).table
    self._tables = (jnp.asarray(top), jnp.asarray(brace))
    one = jax.tree.map(lambda x: x[None], M.init_cache(config, 1, max_length, config.compute_dtype))
    self._cache = jax.tree.map(lambda x: jnp.repeat(x, slots, axis=0), one)
    key_words = jax.random.key_data(jax.random.key(0)).shape[-1]
    self._rows = P.empty_rows(slots, key_words)
    if self.mesh is not None:
      self._cache, self._rows, self._tables = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(x, P.pool_sharding(self.mesh, p, x)),
        (self._cache, self._rows, self._tables),
      )
    self._host_done = np.zeros(slots, bool)
    self._owner: list[Optional[_Sample]] = [None] * slots
    self._waiting: collections.deque[_Sample] = collections.deque()
    self._depth = 0  # requests with a sample in _waiting (kept by _recount, lock held)
    self._lock = threading.Condition()
    self._cancelled: list[RequestHandle] = []
    self._accepting = True
    self._stopping = False
    self._thread: Optional[threading.Thread] = None
    self.ready = threading.Event()
    self.error: Optional[BaseException] = None
    self.stats = collections.Counter()  # requests, tokens, cancelled, chunks (monitoring)

  # -- public API ------------------------------------------------------------------------------

  @property
  def slots(self) -> int:
    return self.spec.slots

  @property
  def max_length(self) -> int:
    return self.spec.max_length

  def slots_in_use(self) -> int:
    return sum(o is not None for o in self._owner)

  def queue_depth(self) -> int:
    """Requests waiting for a slot (not yet started)."""
    return self._depth

  def _recount(self) -> None:
    self._depth = len({id(s.handle) for s in self._waiting})

  def start(self, warmup: bool = True) -> "Engine":
    """Starts the worker thread; with warmup it first compiles the programs (smallest bucket)
    and sets `ready`."""
    self._thread = threading.Thread(target=self._run, args=(warmup,), name="geex-engine")
    self._thread.daemon = True
    self._thread.start()
    return self

  def encode(self, request: CompletionRequest) -> list[int]:
    """The prompt's token ids (tag line included); InputError where it does not fit."""
    ids = self.tokenizer.encode(
      self.sampler.prompt_text(request.prompt, request.language, request.add_tag)
    )
    if not ids:
      raise InputError("empty prompt: give at least one character of text")
    if len(ids) >= self.max_length:
      raise InputError(
        f"prompt has {len(ids)} tokens; this server reads at most {self.max_length - 1} "
        f"(max_length {self.max_length}) before generating"
      )
    return ids

  def validate(self, request: CompletionRequest) -> None:
    validate_sampling(
      request.temperature,
      request.top_k,
      request.top_p,
      max_new_tokens=request.max_tokens,
      num_samples=request.n,
    )
    if request.seed is not None:
      seed_value(request.seed)
    if not (isinstance(request.first_row, (int, np.integer)) and request.first_row >= 0):
      raise InputError(f"first_row must be an integer >= 0, got {request.first_row!r}")
    lp = request.logprobs
    if lp is not None and not (
      isinstance(lp, (int, np.integer)) and not isinstance(lp, bool) and 0 <= lp <= P.LOGPROBS
    ):
      raise InputError(f"logprobs must be an integer in [0, {P.LOGPROBS}], got {lp!r}")
    if request.language is not None:
      try:
        languages.get(request.language)
      except languages.UnknownLanguageError as e:
        raise InputError(str(e)) from None
    if any(not isinstance(s, str) for s in request.stop):
      raise InputError("stop must be a string or a list of strings")

  def submit(self, request: CompletionRequest, loop=None) -> RequestHandle:
    """Queues a request. InputError (bad parameters, prompt too long), QueueFullError (the
    waiting queue holds max_waiting requests), ShuttingDownError."""
    self.validate(request)
    ids = self.encode(request)
    new = min(request.max_tokens, self.max_length - len(ids))
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    handle = RequestHandle(request, len(ids), loop)
    handle._engine = self
    with self._lock:
      if not self._accepting:
        raise ShuttingDownError("the server is shutting down")
      if self.error is not None:
        raise GeexError(f"the engine has failed: {self.error}")
      if self._depth >= self.max_waiting:
        raise QueueFullError(f"the waiting queue is full ({self.max_waiting} requests)")
      for j in range(request.n):
        self._waiting.append(_Sample(handle, j, ids, seed, new))
      self._recount()
      self.stats["requests"] += 1
      self._lock.notify_all()
    return handle

  def complete(self, request: CompletionRequest, timeout: Optional[float] = None):
    """submit + wait: the Finished events of every sample."""
    return self.submit(request).result(timeout)

  def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
    """Stops taking requests; with drain, finishes those in flight first; then ends the
    worker thread."""
    with self._lock:
      self._accepting = False
      if not drain:
        for s in list(self._waiting) + [o for o in self._owner if o is not None]:
          self._cancelled.append(s.handle)
      self._stopping = True
      self._lock.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)

  def _cancel(self, handle: RequestHandle) -> None:
    with self._lock:
      if not handle.cancelled:
        handle.cancelled = True
        self._cancelled.append(handle)
        self._lock.notify_all()

  # -- the worker ------------------------------------------------------------------------------

  def _run(self, warmup: bool) -> None:
    from geex_jax.model import partitioning

    try:
      with partitioning.mesh_context(self.mesh):  # the model's logical constraints, as Sampler
        if warmup:
          self._warmup()
        self.ready.set()
        self._loop()
    except BaseException as e:  # reported to every waiting caller
      log.exception("engine worker failed")
      self.error = e
      self.ready.set()
      with self._lock:
        self._accepting = False
        pending = list(self._waiting) + [o for o in self._owner if o is not None]
      for s in pending:
        self._finish(s, "error")

  def _warmup(self) -> None:
    """Compiles prefill (smallest bucket), insert and chunk by running a tiny request."""
    t0 = time.monotonic()
    ids = [0]  # any id: the output is thrown away
    handle = RequestHandle(CompletionRequest("", max_tokens=2, greedy=True), 1)
    s = _Sample(handle, 0, ids, 0, min(2, self.max_length - 1))
    self._admit_group([s], [0])
    idle = jnp.zeros(self.slots, bool)
    for w in self.windows:  # the first runs the sample, the others compile (the pool is idle)
      self._cache, self._rows, *_ = P.chunk(
        self.spec, self.params, self._cache, self._rows, idle, self._tables, w
      )
    self._owner[0] = None
    self._host_done[0] = True
    jax.block_until_ready(self._rows)
    log.info("engine warm in %.1f s", time.monotonic() - t0)

  def _loop(self) -> None:
    pending = None  # (outputs of the last dispatched chunk, owners when dispatched)
    while True:
      with self._lock:
        self._drop_cancelled()
        busy = any(o is not None for o in self._owner)
        if not busy and pending is None and not self._waiting:
          if self._stopping:
            return
          self._lock.wait(0.5)
          continue
        admit = self._take_admissions()
      inserted = self._admit(admit)
      dispatched = None
      if any(o is not None for o in self._owner):
        cache, rows, outs, fin = P.chunk(
          self.spec,
          self.params,
          self._cache,
          self._rows,
          jnp.asarray(self._host_done),
          self._tables,
          self._window(),
        )
        for o in self._owner:
          if o is not None:
            o.dispatched += self.spec.chunk
        self._cache, self._rows = cache, rows
        self.stats["chunks"] += 1
        dispatched = ((outs, fin), list(self._owner))
      # While the chunk runs: the first tokens of the new slots, then the previous chunk.
      for sample, (out, code) in inserted:
        out, code = jax.device_get((out, code))
        self._take(sample, jax.tree.map(lambda x: x[0], out), int(code[0]))
      if pending is not None:
        self._read(*pending)
      pending = dispatched

  def _window(self) -> int:
    """The smallest of `windows` holding every running sample's positions for the next chunk."""
    need = max(o.reach(self.spec.chunk) for o in self._owner if o is not None)
    return next(w for w in self.windows if w >= need)

  def _drop_cancelled(self) -> None:
    """(lock held) Cancelled requests leave the queue and their slots."""
    if not self._cancelled:
      return
    gone = set(map(id, self._cancelled))
    self._cancelled.clear()
    kept = collections.deque()
    for s in self._waiting:
      if id(s.handle) in gone:
        self._finish(s, "cancelled")
      else:
        kept.append(s)
    self._waiting = kept
    self._recount()
    for o in self._owner:
      if o is not None and id(o.handle) in gone:
        self._finish(o, "cancelled")
    self.stats["cancelled"] += len(gone)

  def _take_admissions(self) -> list[tuple[list[_Sample], list[int]]]:
    """(lock held) Waiting samples for the free slots, grouped by request (one prefill each)."""
    free = [i for i, o in enumerate(self._owner) if o is None]
    groups: list[tuple[list[_Sample], list[int]]] = []
    while free and self._waiting:
      s = self._waiting.popleft()
      slot = free.pop(0)
      if groups and groups[-1][0][0].handle is s.handle:
        groups[-1][0].append(s)
        groups[-1][1].append(slot)
      else:
        groups.append(([s], [slot]))
      self._owner[slot] = s
      s.slot = slot
    self._recount()
    return groups

  def _admit(self, groups) -> list:
    out = []
    for samples, slots in groups:
      out.extend(self._admit_group(samples, slots))
    return out

  def _admit_group(self, samples: list[_Sample], slots: list[int]) -> list:
    """Prefills the group's prompt once and inserts it into each slot (device work queued)."""
    spec, ids = self.spec, samples[0].ids
    lb = bucket_length(len(ids), spec.max_length)
    prompt = np.full((1, lb), max(spec.eos_id, 0), np.int32)
    segments = np.zeros((1, lb), np.int32)
    prompt[0, lb - len(ids) :] = ids
    segments[0, lb - len(ids) :] = 1
    logits, small = P.prefill(spec, self.params, jnp.asarray(prompt), jnp.asarray(segments))
    req = samples[0].handle.request
    greedy = req.greedy or req.temperature == 0
    kind_name = self.sampler._rule(req.language).kind
    kind = P.KINDS[kind_name]
    rule_init = SA.rule_initial_state(kind_name, _ends_line(req.prompt))
    base = jax.random.key(seed_value(samples[0].seed))
    out = []
    for s, slot in zip(samples, slots):
      p = SlotParams(
        key=jax.random.key_data(jax.random.fold_in(base, req.first_row + s.index)),
        temperature=jnp.float32(1.0 if greedy else req.temperature),
        top_p=jnp.float32(req.top_p),
        top_k=jnp.int32(req.top_k),
        greedy=jnp.bool_(greedy),
        max_tokens=jnp.int32(s.max_tokens),
        rule_kind=jnp.int32(kind),
        rule_init=jnp.int32(rule_init),
        logprobs=jnp.bool_(req.logprobs is not None),
      )
      self._cache, self._rows, emitted, code = P.insert(
        spec,
        self._cache,
        self._rows,
        small,
        logits,
        jnp.int32(slot),
        jnp.int32(lb),
        jnp.int32(len(ids)),
        p,
        self._tables,
      )
      self._host_done[slot] = False
      out.append((s, (emitted, code)))
    return out

  def _read(self, outputs, owners) -> None:
    outs, fin = jax.device_get(outputs)
    for slot, s in enumerate(owners):
      if s is None or s.finished:
        continue
      self._take(s, jax.tree.map(lambda x: x[slot], outs), int(fin[slot]))

  def _take(self, s: _Sample, out: P.Emitted, code: int) -> None:
    """New tokens of a sample (`out`: one slot's steps): stream the text that became final, stop
    it on a stop string or the text rule, finish it when the device says it ended."""
    if s.finished:
      return
    keep = out.emitted
    new = out.tokens[keep].tolist()
    h = s.handle
    if new and h.first_token_at is None:
      h.first_token_at = time.monotonic()
    req = h.request
    if req.logprobs is not None:
      for tok, lp, ids, lps in zip(
        new, out.logprob[keep], out.top_ids[keep], out.top_logprobs[keep]
      ):
        s.offsets.append(len(self.tokenizer.decode(s.tokens)) if s.tokens else 0)
        s.tokens.append(tok)
        s.scores.append((float(lp), ids.tolist(), lps.tolist()))
    else:
      s.tokens.extend(new)
    text = self.tokenizer.decode(s.tokens) if s.tokens else ""
    if code >= 0 or cut_text(text, req.language, req.stop, s.at_start) != text:
      reason = FINISH_REASONS[code] if code >= 0 else "length"
      done = _completion(text, s.tokens, reason, req.language, req.stop, s.at_start)
      self._finish(s, done.finish_reason, done.text, decoded=text)
      return
    upto = _stable_length(text, req.language, s.at_start, req.stop)
    if upto > s.emitted:
      h._push(Delta(s.index, text[s.emitted : upto], self._scores(s, text, upto)))
      s.emitted = upto

  def _scores(self, s: _Sample, decoded: str, upto: int, everything: bool = False):
    """The OpenAI logprobs object of the tokens that start before character `upto` of the
    decoded text and were not reported yet (all such tokens with `everything`); None when the
    request did not ask."""
    want = s.handle.request.logprobs
    if want is None:
      return None
    start = 0 if everything else s.scores_sent
    end = start
    while end < len(s.offsets) and s.offsets[end] < upto:
      end += 1
    if not everything:
      s.scores_sent = end
    bounds = s.offsets[start : end + 1] + ([len(decoded)] if end == len(s.offsets) else [])
    decode = self.tokenizer.decode
    return {
      "tokens": [decoded[a:b] for a, b in zip(bounds, bounds[1:])],
      "token_logprobs": [lp for lp, _, _ in s.scores[start:end]],
      "top_logprobs": [
        {decode([i]): lp for i, lp in zip(ids[:want], lps[:want])}
        for _, ids, lps in s.scores[start:end]
      ],
      "text_offset": s.offsets[start:end],
    }

  def _finish(self, s: _Sample, reason: str, text: Optional[str] = None, decoded: str = "") -> None:
    """Ends a sample: the rest of its text, its Finished event, its slot freed. decoded: the
    sample's whole decoded text (`text` is its cut completion), for the log-probabilities."""
    if s.finished:
      return
    s.finished = True
    h = s.handle
    scores = None
    if text is not None:
      if len(text) > s.emitted:
        h._push(Delta(s.index, text[s.emitted :], self._scores(s, decoded, len(text))))
      scores = self._scores(s, decoded, len(text), everything=True)
    if s.slot is not None and self._owner[s.slot] is s:
      self._owner[s.slot] = None
      self._host_done[s.slot] = True
    h.completion_tokens += len(s.tokens)
    self.stats["tokens"] += len(s.tokens)
    h._push(Finished(s.index, text if text is not None else "", reason, len(s.tokens), scores))
    h._open -= 1
    if h._open == 0:
      h.finished_at = time.monotonic()


def engine_from_checkpoint(
  checkpoint,
  tokenizer,
  *,
  dtype: str = "fp32",
  int8: bool = False,
  **kwargs,
) -> Engine:
  """Loads a checkpoint and tokenizer (as `Sampler.load`) into an Engine (not started)."""
  return Engine(Sampler.load(checkpoint, tokenizer, dtype=dtype, int8=int8), **kwargs)
