"""Tokens/s of the batch pipeline (read + tag + tokenize + pack) on this machine, real tokenizer.

Baseline, measured in the same run on the same documents: the bare `tokenizers` BPE encode
(no tag line, no whitespace tokens, no packing). The ratio says what the pipeline costs over it.

  .venv/bin/python bench/data.py --tokenizer ../shared/codegeex_tokenizer [--corpus DIR]

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
  args = p.parse_args()

  from geex_jax.data import catalog, corpus, pipeline
  from geex_jax.data.records import RecordReader

  corpus_dir = args.corpus or os.path.join(tempfile.mkdtemp(), "corpus")
  if not args.corpus:
    corpus.build_embedded_corpus(corpus_dir, progress=False)
  name = pipeline.register_corpus_tasks(corpus_dir, args.tokenizer, name="bench", seqio_tasks=False)
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
    for r in [RecordReader(t.shards)]
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


if __name__ == "__main__":
  main()
