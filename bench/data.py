"""Tokens/s of the batch pipeline (read + tag + tokenize + pack) on this machine, real tokenizer.

Baseline, measured in the same run on the same documents: the bare `tokenizers` BPE encode
(no tag line, no whitespace tokens, no packing). The ratio says what the pipeline costs over it.
Beside it, on the same corpus and mixture: the seqio path (`train.data_source=@seqio_batches`:
seqio Tasks, tf.data, DecoderFeatureConverter(pack=True)), its tokens/s (non-padding target
tokens, as for the pipeline), and what seqio's packing costs: the documents longer than the
sequence length are truncated to it (their tails are dropped) and rows are padded; the own
pipeline drops nothing and pads nothing. The dropped fraction is computed exactly over every
document of the corpus (tag line + text + EOD tokens); the padding fraction is measured on the
timed seqio rows.

  .venv/bin/python bench/data.py --tokenizer ../shared/codegeex_tokenizer [--corpus DIR] \\
      [--no-seqio] [--tokens N]

Without --corpus the embedded corpus is built into a temporary directory first (not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--tokenizer", required=True)
  p.add_argument("--corpus")
  p.add_argument("--sequence-length", type=int, default=2048)
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--tokens", type=int, default=4_000_000, help="tokens to time")
  p.add_argument("--no-seqio", action="store_true", help="skip the seqio path")
  args = p.parse_args()

  from geex_jax.data import catalog, corpus, pipeline
  from geex_jax.data.tfds_corpus import DocumentReader

  corpus_dir = args.corpus or os.path.join(tempfile.mkdtemp(), "corpus")
  if not args.corpus:
    corpus.build_embedded_corpus(corpus_dir, progress=False)
  name = pipeline.register_corpus_tasks(
    corpus_dir, args.tokenizer, name="bench", seqio_tasks=not args.no_seqio
  )
  it = pipeline.make_batch_iterator(
    mixture_or_task=name, sequence_length=args.sequence_length, batch_size=args.batch_size, seed=0
  )
  next(it)  # warm: open shards, first permutations
  tokens, start = 0, time.perf_counter()
  while tokens < args.tokens:
    tokens += int((next(it)["decoder_segment_ids"] > 0).sum())
  pipe_rate = tokens / (time.perf_counter() - start)

  from tokenizers import Tokenizer, models, pre_tokenizers

  bpe = Tokenizer(
    models.BPE.from_file(
      os.path.join(args.tokenizer, "vocab.json"), os.path.join(args.tokenizer, "merges.txt")
    )
  )
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  texts = [
    r[i].decode()
    for t in catalog.get(name).tasks
    for r in [DocumentReader(t.shards)]
    for i in range(len(r))
  ]
  base_tokens, start = 0, time.perf_counter()
  while base_tokens < args.tokens:
    for t in texts:
      base_tokens += len(bpe.encode(t).ids)
  base_rate = base_tokens / (time.perf_counter() - start)

  print(
    f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  )
  print(
    f"pipeline (read+tag+tokenize+pack, L={args.sequence_length}, B={args.batch_size}): "
    f"{pipe_rate:,.0f} tokens/s over {tokens:,} tokens"
  )
  print(f"baseline (bare tokenizers BPE encode, 1 thread): {base_rate:,.0f} tokens/s")
  print(f"ratio pipeline/baseline: {pipe_rate / base_rate:.2f}")
  if not args.no_seqio:
    seqio_report(name, args, pipe_rate)


def seqio_report(name: str, args, pipe_rate: float) -> None:
  """The seqio path on the same mixture: tokens/s, and its packing's truncation and padding."""
  import numpy as np

  from geex_jax.data import catalog, seqio_batches
  from geex_jax.data.tfds_corpus import DocumentReader
  from geex_jax.tokenizer import load_tokenizer

  L = args.sequence_length
  start = time.perf_counter()
  it = seqio_batches.seqio_batches(
    batch_size=args.batch_size, sequence_length=L, seed=0, mixture_or_task_name=name
  )
  next(it)  # warm: build the graph, fill the shuffle buffers
  warm = time.perf_counter() - start
  tokens = padding = 0
  start = time.perf_counter()
  while tokens < args.tokens:
    real = next(it)["decoder_segment_ids"] > 0
    tokens += int(real.sum())
    padding += int((~real).sum())
  timed = time.perf_counter() - start
  seqio_rate = tokens / timed

  tok = load_tokenizer(args.tokenizer)
  lengths = np.asarray(
    [
      len(tok.encode(t.tag + "\n" + r[i].decode())) + 1
      for t in catalog.get(name).tasks
      for r in [DocumentReader(t.shards)]
      for i in range(len(r))
    ]
  )
  dropped = np.maximum(lengths - L, 0)
  print(
    f"seqio (Tasks + tf.data + DecoderFeatureConverter(pack=True), L={L}, B={args.batch_size}): "
    f"{seqio_rate:,.0f} tokens/s over {tokens:,} tokens after the first batch, which took "
    f"{warm:.1f} s (graph + shuffle buffers: a corpus smaller than the buffers is read and "
    f"tokenized whole first); with it: {tokens / (warm + timed):,.0f} tokens/s"
  )
  print(f"ratio seqio/pipeline: {seqio_rate / pipe_rate:.2f}")
  print(
    f"seqio packing cost, all {len(lengths):,} documents ({lengths.sum():,} tokens): "
    f"{(lengths > L).mean():.1%} truncated, {dropped.sum() / lengths.sum():.1%} of tokens dropped; "
    f"{padding / (tokens + padding):.1%} of the timed rows' positions are padding "
    "(own pipeline: 0% dropped, 0% padding)"
  )


if __name__ == "__main__":
  main()
