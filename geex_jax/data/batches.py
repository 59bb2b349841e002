"""Batch sources for the trainer, chosen in gin (`train.data_source = @synthetic_batches` or
`@pipeline_batches`; `train.eval_source = @heldout_batches`: one held-out source per language).

A batch source is called as `source(batch_size=, sequence_length=, seed=, shard_index=,
num_shards=)` and returns an iterator of dicts of numpy arrays [batch_size, sequence_length]
(decoder_input_tokens, decoder_target_tokens, decoder_loss_weights (float32),
decoder_segment_ids, decoder_positions) with `get_state() -> dict` (JSON-able) and
`set_state(state)`. `batch_size` is the global batch; shard `shard_index` of `num_shards`
returns its batch_size // num_shards rows. The trainer checkpoints the state after every
consumed batch so a resumed run
sees exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import time
from typing import Iterator, Optional, Sequence

import gin
import numpy as np

from geex_jax import languages as langs
from geex_jax.data import catalog
from geex_jax.errors import ConfigError

# Imported now, not when first used: its gin configurables (register_corpus_tasks.rates, ...)
# must exist before the trainer parses and locks the gin config. No TensorFlow behind it.
from geex_jax.data import pipeline as data_pipeline

FEATURES = (
  "decoder_input_tokens",
  "decoder_target_tokens",
  "decoder_loss_weights",
  "decoder_segment_ids",
  "decoder_positions",
)


def pack_stream(stream: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
  """One packed row from T + 1 tokens of concatenated EOS-terminated documents.

  Inputs are stream[:T], targets stream[1:]. A document's EOS belongs to it, the token after it
  starts a new segment whose positions restart at 0 ("eod reset"), and positions whose input is
  EOS carry no loss (codegeex-facts.md §4): they would predict the next document from nothing.
  """
  inputs, targets = stream[:-1], stream[1:]
  is_eos = inputs == eos_id
  starts = np.concatenate([[False], is_eos[:-1]])
  segment_ids = (np.cumsum(starts) + 1).astype(np.int32)
  idx = np.arange(len(inputs))
  positions = idx - np.maximum.accumulate(np.where(starts | (idx == 0), idx, 0))
  return {
    "decoder_input_tokens": inputs.astype(np.int32),
    "decoder_target_tokens": targets.astype(np.int32),
    "decoder_loss_weights": (~is_eos).astype(np.float32),
    "decoder_segment_ids": segment_ids,
    "decoder_positions": positions.astype(np.int32),
  }


class SyntheticBatches:
  """Deterministic in-memory packed batches with learnable structure (tests, benchmarks).

  Row r of global batch k is a function of (seed, k, r) only, so any sharding of the rows over
  hosts sees the same global batch, and the state is just the batch counter.
  Each document starts at a random token and follows one fixed random permutation of the
  vocabulary (next = perm[current]), terminated by EOS = vocab_size - 1: a bigram table a tiny
  model learns in a few dozen steps, so a falling loss is a meaningful check.
  """

  def __init__(
    self,
    *,
    batch_size: int,
    sequence_length: int,
    seed: int,
    shard_index: int = 0,
    num_shards: int = 1,
    vocab_size: int = 512,
    min_doc: int = 8,
    max_doc: int = 64,
    delay_s: float = 0.0,
  ):
    if batch_size % num_shards:
      raise ConfigError(f"batch size {batch_size} is not divisible by {num_shards} data shards")
    if vocab_size < 3:
      raise ConfigError(f"synthetic_batches.vocab_size must be >= 3, got {vocab_size}")
    self.global_batch = batch_size
    self.rows = range(
      shard_index * batch_size // num_shards, (shard_index + 1) * batch_size // num_shards
    )
    self.seq_len, self.seed = sequence_length, seed
    self.vocab, self.eos = vocab_size - 1, vocab_size - 1
    self.min_doc, self.max_doc = min_doc, max(max_doc, min_doc)
    # The permutation is part of the "language", not of the sample order: independent of seed.
    self.perm = np.random.default_rng(0x5EED).permutation(self.vocab)
    self.delay_s = delay_s  # simulates a slow input pipeline (tests interrupt a running job)
    self.step = 0

  def _row(self, k: int, r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, k, r])
    out, n = [], 0
    while n < self.seq_len + 1:
      length = int(rng.integers(self.min_doc, self.max_doc + 1))
      doc = np.empty(length, np.int64)
      doc[0] = rng.integers(0, self.vocab)
      for i in range(1, length):
        doc[i] = self.perm[doc[i - 1]]
      out.append(doc)
      out.append([self.eos])
      n += length + 1
    return pack_stream(np.concatenate(out)[: self.seq_len + 1], self.eos)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.delay_s:
      time.sleep(self.delay_s)
    rows = [self._row(self.step, r) for r in self.rows]
    self.step += 1
    return {f: np.stack([row[f] for row in rows]) for f in FEATURES}

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


@gin.configurable
def synthetic_batches(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  vocab_size: int = 512,
  min_doc: int = 8,
  max_doc: int = 64,
  delay_s: float = 0.0,
) -> SyntheticBatches:
  return SyntheticBatches(
    batch_size=batch_size,
    sequence_length=sequence_length,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    vocab_size=vocab_size,
    min_doc=min_doc,
    max_doc=max_doc,
    delay_s=delay_s,
  )


@gin.configurable
def pipeline_batches(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  mixture_or_task: Optional[str] = None,
  corpus_dir: Optional[str] = None,
  tokenizer_dir: Optional[str] = None,
  split: str = "train",
):
  """The packed-batch pipeline of geex_jax.data: a registered `mixture_or_task`, or the tasks of a
  built corpus (`corpus_dir`, tokenized with `tokenizer_dir`, or bytes when None).

  batch_size is the global batch; this host reads batch_size // num_shards rows of its own
  documents (the pipeline shards documents, not rows, across hosts). split "validation" reads the
  held-out documents (an endless stream; `heldout_batches` gives finite ones per language).
  """
  _check_rows(batch_size, num_shards)
  return data_pipeline.make_batch_iterator(
    mixture_or_task=_mixture(mixture_or_task, corpus_dir, tokenizer_dir, "pipeline_batches"),
    sequence_length=sequence_length,
    batch_size=batch_size // num_shards,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    split=split,
  )


@gin.configurable
def heldout_batches(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  mixture_or_task: Optional[str] = None,
  corpus_dir: Optional[str] = None,
  tokenizer_dir: Optional[str] = None,
  languages: Optional[Sequence[str]] = None,
) -> dict:
  """{language slug: batch source} over each language's held-out (validation) documents, for
  `train.eval_source`: the trainer reports `eval_loss/<slug>` per language and `eval_loss` over all
  of them, token-weighted.

  Each source is one pass over its language's held-out documents in a seeded order, then ends (the
  last batch zero-padded): an evaluation scores its first `train.eval_batches` batches, or all of
  them when there are fewer. The languages are those of the mixture (`mixture_or_task`, or the
  corpus at `corpus_dir`) that have held-out documents, or only `languages` (names or aliases).
  """
  _check_rows(batch_size, num_shards)
  spec = catalog.get(_mixture(mixture_or_task, corpus_dir, tokenizer_dir, "heldout_batches"))
  wanted = None
  if languages is not None:
    try:
      wanted = {langs.get(n).name for n in languages}
    except langs.UnknownLanguageError as e:
      raise ConfigError(f"heldout_batches.languages: {e}") from None
  tasks = [
    t
    for t in spec.tasks
    if t.num_validation_documents > 0 and (wanted is None or t.language in wanted)
  ]
  if not tasks:
    which = f" of {sorted(wanted)}" if wanted is not None else ""
    raise ConfigError(
      f"{spec.name}: no language{which} has held-out documents; rebuild the corpus with "
      "`geex-data build --heldout-fraction F` (F > 0; corpora built before the held-out split "
      "have none), or set train.eval_every = 0"
    )
  return {
    langs.get(t.language).slug: data_pipeline.make_batch_iterator(
      mixture_or_task=t.name,
      sequence_length=sequence_length,
      batch_size=batch_size // num_shards,
      seed=seed,
      shard_index=shard_index,
      num_shards=num_shards,
      num_epochs=1,
      split="validation",
    )
    for t in tasks
  }


def _check_rows(batch_size: int, num_shards: int) -> None:
  if batch_size % num_shards:
    raise ConfigError(f"batch size {batch_size} is not divisible by {num_shards} data shards")


def _mixture(
  mixture_or_task: Optional[str], corpus_dir: Optional[str], tokenizer_dir: Optional[str], who: str
) -> str:
  """The registered mixture or task to read: `mixture_or_task`, or the corpus at `corpus_dir`."""
  if corpus_dir:
    # seqio_tasks=False: the trainer reads the corpus directly; no TensorFlow import.
    return data_pipeline.register_corpus_tasks(
      corpus_dir, tokenizer_dir=tokenizer_dir, seqio_tasks=False
    )
  if not mixture_or_task:
    raise ConfigError(f"{who} needs mixture_or_task or corpus_dir")
  return mixture_or_task
