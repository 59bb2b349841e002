"""Packed, host-sharded, resumable LM batches from the corpus tasks/mixture.

The stream, in order:
  1. mixture order: global position g draws a task with probability = its rate, from a counter-based
     RNG keyed by (seed, g // 4096), so any position's draw is computed without replaying the past;
  2. host sharding: host i of n takes the positions g with g % n == i (disjoint; their union is the
     single-host stream);
  3. document: the k-th draw of a task reads document perm_epoch[k % N] of its shards (a fresh
     seeded permutation each epoch), by random access;
  4. tag line + "\\n" + text -> tokenizer -> + EOD (the same as the seqio task's preprocessors);
  5. packing: documents are laid end to end and cut into rows of `sequence_length` (CodeGeeX's
     concatenate-and-split packing): no token is dropped, no row is padded until a finite stream
     ends. A document cut by a row boundary continues in the next row as a new segment whose first
     input is the real previous token, so every target keeps its loss weight.

Features per row (seqio LMFeatureConverter names, bos = EOD):
  decoder_target_tokens  the document tokens
  decoder_input_tokens   the targets shifted right by one; EOD at the start of each document
  decoder_loss_weights   1.0, except 0 on padding and where the input token is EOD
  decoder_segment_ids    1, 2, ... per document piece in the row, 0 on padding
  decoder_positions      0, 1, ... restarting with each segment

Why not seqio's packing (`LMFeatureConverter(pack=True)`): it truncates every example to the
sequence length (a 100 KB source file is ~30k tokens: most would be lost), and a tf.data iterator
cannot be checkpointed without saving its buffers. Here the whole iterator state is three numbers
and a per-task counter, restoring costs one document read, and resumed == uninterrupted exactly.
The seqio Tasks/Mixture are still registered (tasks.py) for seqio/t5x users, and the tests check
that they produce the same documents.
"""

from __future__ import annotations

import collections
import os
import zlib
from typing import Any, Iterator, Mapping, Optional

import gin
import numpy as np

from geex_jax import fileio
from geex_jax import languages as langs
from geex_jax.data import catalog
from geex_jax.data.corpus import load_manifest
from geex_jax.data.mixture import language_rates
from geex_jax.data.tfds_corpus import DocumentReader
from geex_jax.errors import ConfigError, InputError
from geex_jax.tokenizer import Tokenizer, load_tokenizer

_BLOCK = 4096  # mixture draws are generated per block of global positions
_STATE_VERSION = 1
FEATURES = (
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_loss_weights",
  "decoder_segment_ids",
  "decoder_positions",
)


@gin.configurable("register_corpus_tasks")
def register_corpus_tasks(
  corpus_dir: str = gin.REQUIRED,
  tokenizer_dir: Optional[str] = None,
  rates: Optional[Mapping[str, float]] = None,
  name: str = "codegeex",
  seqio_tasks: bool = True,
) -> str:
  """Registers one task per corpus language, `{name}_{slug}`, and the mixture `name`.

  Args:
    corpus_dir: a directory built by `geex-data build` (local, or copied to gs://).
    tokenizer_dir: the CodeGeeX tokenizer files (local or gs://); None = the byte-level fallback.
    rates: {language: weight} overriding the paper's shares (see `mixture.language_rates`).
    name: the mixture name (and task-name prefix). Registering a name again replaces it.
    seqio_tasks: also register the seqio Tasks and Mixture (imports TensorFlow).
  Returns:
    the mixture name, for `make_batch_iterator(mixture_or_task=...)`.
  """
  manifest = load_manifest(corpus_dir)
  # Absolute local paths, or gs:// URLs as given (never a local ./gs:/ folder).
  tokenizer_dir = fileio.resolve(tokenizer_dir) if tokenizer_dir else None
  load_tokenizer(tokenizer_dir)  # fail now, with a clear message, on a bad directory
  specs = []
  root = fileio.resolve(corpus_dir)
  for lang_name, info in sorted(manifest["languages"].items()):
    lang = langs.get(lang_name)
    specs.append(
      catalog.TaskSpec(
        f"{name}_{lang.slug}",
        lang.name,
        lang.tag,
        tuple(os.path.join(root, s) for s in info["shards"]),
        int(info["documents"]),
        tokenizer_dir,
        # Corpora built before the held-out split have neither field: no validation split.
        validation_shards=tuple(os.path.join(root, s) for s in info.get("validation_shards", ())),
        num_validation_documents=int(info.get("validation_documents", 0)),
      )
    )
  if not specs:
    raise InputError(f"corpus {corpus_dir!r} holds no documents")
  by_lang = (
    language_rates([s.language for s in specs])
    if rates is None
    else language_rates([s.language for s in specs], overrides=rates)
  )
  specs = [s for s in specs if s.language in by_lang]
  for s in specs:
    catalog.add_task(s)
  catalog.add_mixture(
    catalog.MixtureSpec(name, tuple(specs), tuple(by_lang[s.language] for s in specs))
  )
  if seqio_tasks:
    from geex_jax.data import tasks  # TensorFlow lives behind this import

    tasks.register_seqio(name, specs, [by_lang[s.language] for s in specs])
  return name


class DocumentStream:
  """The host's documents in stream order: (global position, task index, token ids)."""

  def __init__(
    self,
    spec: catalog.MixtureSpec,
    tokenizer: Tokenizer,
    *,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    num_epochs: Optional[int] = None,
  ):
    if not 0 <= shard_index < num_shards:
      raise ConfigError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
    self.spec = spec
    self.tokenizer = tokenizer
    self.seed = int(seed)
    self.shard_index, self.num_shards = shard_index, num_shards
    self.num_epochs = num_epochs
    self._readers = [DocumentReader(t.shards) for t in spec.tasks]
    for t, r in zip(spec.tasks, self._readers):
      if len(r) != t.num_documents:
        raise InputError(
          f"task {t.name}: shards hold {len(r)} documents, manifest says "
          f"{t.num_documents}; rebuild the corpus"
        )
    self._cum_rates = np.cumsum(np.asarray(spec.rates, np.float64) / sum(spec.rates))
    # A task's document order depends on its language, not on which mixture it is part of.
    self._salts = [zlib.crc32(t.language.encode()) for t in spec.tasks]
    self._tags = [t.tag + "\n" for t in spec.tasks]
    self._perms: dict[tuple[int, int], np.ndarray] = {}
    self.seek(0, [0] * len(spec.tasks))

  def seek(self, position: int, counts) -> None:
    """Continue from global `position`; `counts[t]` = draws of task t before it."""
    self._scan = int(position)
    self._counts = np.asarray(counts, np.int64).copy()
    self._queue: collections.deque = collections.deque()

  def _draws(self, block: int) -> np.ndarray:
    if len(self._cum_rates) == 1:
      return np.zeros(_BLOCK, np.int64)
    u = np.random.default_rng([self.seed, 0x6D6978, block]).random(_BLOCK)
    return np.minimum(np.searchsorted(self._cum_rates, u, side="right"), len(self._cum_rates) - 1)

  def _fill(self) -> None:
    """Draws the rest of the current block and queues this host's positions."""
    block, start = divmod(self._scan, _BLOCK)
    draws = self._draws(block)[start:]
    onehot = draws[:, None] == np.arange(len(self._cum_rates))[None, :]
    before = self._counts[None, :] + np.cumsum(onehot, axis=0) - onehot
    positions = self._scan + np.arange(len(draws))
    for j in np.nonzero(positions % self.num_shards == self.shard_index)[0]:
      self._queue.append((int(positions[j]), int(draws[j]), before[j]))
    self._scan += len(draws)
    self._counts += onehot.sum(axis=0)

  def next_address(self) -> Optional[tuple[int, int, np.ndarray]]:
    """(position, task index, draws per task before it) of this host's next document, or None
    when a finite stream ends. Cheap: nothing is read."""
    while not self._queue:
      self._fill()
    position, task, before = self._queue[0]
    if self.num_epochs is not None and before[task] >= self.num_epochs * len(self._readers[task]):
      return None
    return self._queue.popleft()

  def next(self) -> Optional[tuple[int, list[int], int, np.ndarray]]:
    """(position, counts before it, task index, ids incl. EOD); None when a finite stream ends."""
    address = self.next_address()
    if address is None:
      return None
    position, task, before = address
    size = len(self._readers[task])
    epoch, k = divmod(int(before[task]), size)
    key = (task, epoch)
    perm = self._perms.get(key)
    if perm is None:
      self._perms = {k_: v for k_, v in self._perms.items() if k_[0] != task}  # one epoch per task
      perm = self._perms[key] = np.random.default_rng(
        [self.seed, 0x7065726D, self._salts[task], epoch]
      ).permutation(size)
    text = self._readers[task][int(perm[k])].decode("utf-8")
    ids = self.tokenizer.encode(self._tags[task] + text)
    ids.append(self.tokenizer.eos_id)
    return position, [int(c) for c in before], task, np.asarray(ids, np.int32)

  def __iter__(self):
    while (doc := self.next()) is not None:
      yield doc


class BatchIterator:
  """Iterator of packed batches: dicts of numpy arrays [batch_size, sequence_length]."""

  def __init__(
    self, stream: DocumentStream, *, sequence_length: int, batch_size: int, fingerprint: dict
  ):
    if sequence_length < 1 or batch_size < 1:
      raise ConfigError(
        f"sequence_length ({sequence_length}) and batch_size ({batch_size}) must be positive"
      )
    self.stream = stream
    self.sequence_length = sequence_length
    self.batch_size = batch_size
    self._fingerprint = fingerprint
    self._eos = stream.tokenizer.eos_id
    self._reset(0, [0] * len(stream.spec.tasks), 0)

  def _reset(self, position: int, counts, offset: int) -> None:
    self.stream.seek(position, counts)
    self._doc_state = (position, list(counts))
    self._ids = self._inputs = None
    self._offset = 0
    self._pending_offset = offset  # tokens of the next document already emitted before a restore
    self._done = False

  def _next_doc(self) -> bool:
    doc = self.stream.next()
    if doc is None:
      self._done = True
      return False
    position, before, _, ids = doc
    self._doc_state = (position, before)
    self._ids = ids
    # Inputs of a document: EOD, then its tokens shifted by one.
    self._inputs = np.concatenate([[self._eos], ids[:-1]]).astype(np.int32)
    self._offset, self._pending_offset = self._pending_offset, 0
    return True

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    B, L = self.batch_size, self.sequence_length
    out = {k: np.zeros((B, L), np.int32) for k in FEATURES}
    out["decoder_loss_weights"] = np.zeros((B, L), np.float32)
    filled = 0
    for r in range(B):
      col, seg = 0, 0
      while col < L:
        if self._ids is None or self._offset >= len(self._ids):
          if self._done or not self._next_doc():
            break
          if self._offset >= len(self._ids):
            continue
        k = min(L - col, len(self._ids) - self._offset)
        seg += 1
        sl, src = slice(col, col + k), slice(self._offset, self._offset + k)
        out["decoder_target_tokens"][r, sl] = self._ids[src]
        out["decoder_input_tokens"][r, sl] = self._inputs[src]
        out["decoder_segment_ids"][r, sl] = seg
        out["decoder_positions"][r, sl] = np.arange(k, dtype=np.int32)
        col += k
        self._offset += k
      filled += col
      if self._done:
        break
    if filled == 0:
      raise StopIteration
    seg = out["decoder_segment_ids"]
    out["decoder_loss_weights"][:] = (seg > 0) & (out["decoder_input_tokens"] != self._eos)
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position in the stream: restore it with `set_state`."""
    position, counts = self._doc_state
    return {
      "version": _STATE_VERSION,
      "position": position,
      "counts": counts,
      "offset": int(self._offset + self._pending_offset),
      **self._fingerprint,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continue exactly after the batch at which `state` was taken."""
    if state.get("version") != _STATE_VERSION:
      raise ConfigError(
        f"data iterator state version {state.get('version')!r} is not {_STATE_VERSION}"
      )
    diff = [k for k, v in self._fingerprint.items() if state.get(k) != v]
    if diff:
      raise ConfigError(
        "data iterator state belongs to another data configuration (differs in "
        + ", ".join(f"{k}: saved {state.get(k)!r} vs now {self._fingerprint[k]!r}" for k in diff)
        + ")"
      )
    # The position names the document in progress; re-reading it and skipping `offset` tokens
    # puts the packer exactly where it was (a document whose tokens were all emitted is skipped).
    self._reset(int(state["position"]), state["counts"], int(state["offset"]))


def split_spec(spec: catalog.MixtureSpec, split: str) -> catalog.MixtureSpec:
  """`spec` reading `split`; for "validation" only its tasks that have held-out documents (rates
  renormalised). ConfigError when none has any."""
  if split == "train":
    return spec
  tasks = [t.split(split) for t in spec.tasks]
  kept = [(t, r) for t, r in zip(tasks, spec.rates) if t.num_documents > 0]
  if not kept:
    raise ConfigError(
      f"{spec.name}: no held-out ({split}) documents; rebuild the corpus with "
      "`geex-data build --heldout-fraction F` (F > 0; corpora built before the held-out split "
      "have none)"
    )
  total = sum(r for _, r in kept)
  return catalog.MixtureSpec(
    spec.name, tuple(t for t, _ in kept), tuple(r / total for _, r in kept)
  )


@gin.configurable("make_batch_iterator", allowlist=["num_epochs"])
def make_batch_iterator(
  *,
  mixture_or_task: str,
  sequence_length: int,
  batch_size: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  num_epochs: Optional[int] = None,
  split: str = "train",
) -> BatchIterator:
  """Packed LM batches of a registered mixture or task, for one host.

  Args:
    mixture_or_task: a name returned by `register_corpus_tasks` (or one of its task names).
    sequence_length: tokens per row.
    batch_size: rows per batch on this host.
    seed: fixes the mixture draws and the document order.
    shard_index, num_shards: this host's index and the host count (jax.process_index() /
      jax.process_count()); hosts see disjoint documents whose union is the 1-host stream.
    num_epochs: None = endless; else stop once a task would start its (num_epochs+1)-th pass
      (for a single task: exactly num_epochs passes; the last batch is zero-padded).
    split: "train", or "validation": the held-out documents of each task (tasks without any
      are left out of a mixture).
  Returns:
    a BatchIterator (`next()`, `get_state()`, `set_state(state)`).
  """
  spec = split_spec(catalog.get(mixture_or_task), split)
  tokenizer_dirs = {t.tokenizer_dir for t in spec.tasks}
  if len(tokenizer_dirs) != 1:
    raise ConfigError(f"{mixture_or_task}: tasks use different tokenizers {tokenizer_dirs}")
  tokenizer_dir = tokenizer_dirs.pop()
  tokenizer = load_tokenizer(tokenizer_dir)
  stream = DocumentStream(
    spec,
    tokenizer,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    num_epochs=num_epochs,
  )
  fingerprint = {
    "mixture": spec.name,
    "tasks": [t.name for t in spec.tasks],
    "rates": [round(r, 12) for r in spec.rates],
    "documents": [t.num_documents for t in spec.tasks],
    "tokenizer": tokenizer_dir or "bytes",
    "seed": int(seed),
    "shard_index": shard_index,
    "num_shards": num_shards,
    "num_epochs": num_epochs,
  }
  if split != "train":  # states saved before splits existed carry no "split": they are train
    fingerprint["split"] = split
  return BatchIterator(
    stream, sequence_length=sequence_length, batch_size=batch_size, fingerprint=fingerprint
  )
