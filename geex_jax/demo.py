"""The demo behind `make demo`: corpus -> training -> checkpoint -> a sampled completion, on CPU.

    python -m geex_jax.demo [--workdir DIR] [--tokenizer_dir DIR] [--steps N] [--gin.KEY=VALUE]

1. builds the embedded corpus (a few MB of this machine's own source trees, no download);
2. trains the tiny model on it (gin_configs/demo.gin) with geex-train's `train()`;
3. restores the checkpoint and prints a sampled completion.
Without --tokenizer_dir the tokens are bytes (vocab 257, padded to 512): the demo needs nothing
but the package registries.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

PROG = "geex-demo"
PROMPT = "def fibonacci(n):\n"


def _parse(argv):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "geex-jax-demo"),
                      help="corpus/ and run/ go here (default: %(default)s)")
  parser.add_argument("--tokenizer_dir", default=None,
                      help="the CodeGeeX tokenizer files (vocab.json, merges.txt); default bytes")
  parser.add_argument("--steps", type=int, default=None, help="training steps (demo.gin: 300)")
  parser.add_argument("--resume", action="store_true",
                      help="continue the run in WORKDIR/run instead of starting afresh")
  parser.add_argument("--prompt", default=PROMPT)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    if not arg.startswith("--gin.") or "=" not in arg:
      parser.error(f"unrecognized argument {arg} (extra gin bindings: --gin.KEY=VALUE)")
    key, _, value = arg[len("--gin."):].partition("=")
    bindings.append(f"{key} = {value}")
  return args, bindings


def run(argv: Optional[Sequence[str]] = None):
  """The demo; returns (TrainResult, completion text)."""
  args, extra = _parse(argv)
  from geex_jax import train as train_lib
  from geex_jax.data.corpus import build_embedded_corpus

  work = pathlib.Path(args.workdir).absolute()
  corpus, model_dir = work / "corpus", work / "run"
  t0 = time.time()
  print(f"[1/3] building the embedded corpus in {corpus} ...", flush=True)
  manifest = build_embedded_corpus(str(corpus), progress=False)
  langs = manifest["languages"]
  print(f"      {sum(v['documents'] for v in langs.values())} files, "
        f"{len(langs)} languages ({time.time() - t0:.0f}s)", flush=True)

  if model_dir.exists() and not args.resume:
    shutil.rmtree(model_dir)
  bindings = [f"MODEL_DIR = {str(model_dir)!r}", f"CORPUS_DIR = {str(corpus)!r}"]
  if args.tokenizer_dir:
    bindings += [f"TOKENIZER_DIR = {os.path.abspath(args.tokenizer_dir)!r}",
                 "VOCAB_SIZE = 52224"]
  if args.steps:
    bindings.append(f"TRAIN_STEPS = {args.steps}")
  train_lib.parse_gin(["demo.gin"], bindings + extra)
  print(f"[2/3] training the tiny model in {model_dir} ...", flush=True)
  t1 = time.time()
  result = train_lib.train()
  if result.losses:
    first, last = result.losses[min(result.losses)], _mean_last(result.losses, 20)
    print(f"      {result.step} steps in {time.time() - t1:.0f}s: loss {first:.3f} -> {last:.3f} "
          f"(perplexity {math.exp(first):.1f} -> {math.exp(last):.1f}); checkpoint saved",
          flush=True)
  else:
    print(f"      nothing to train: {model_dir} is already at step {result.step}", flush=True)

  print("[3/3] sampling from the checkpoint ...", flush=True)
  from geex_jax.sampling import Sampler
  sampler = Sampler.load(str(model_dir), args.tokenizer_dir)
  completion = sampler.complete_detailed(
      [args.prompt], temperature=0.6, top_p=0.95, max_new_tokens=args.max_new_tokens,
      language="Python", seed=0)[0][0]
  print("----- prompt + completion " + "-" * 40)
  print(args.prompt + completion.text)
  print("-" * 66)
  print(f"done in {time.time() - t0:.0f}s. Checkpoint: {model_dir} (geex-sample --checkpoint "
        f"{model_dir} ...)")
  return result, completion.text


def _mean_last(losses: dict, n: int) -> float:
  steps = sorted(losses)[-n:]
  return sum(losses[s] for s in steps) / len(steps)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from geex_jax.errors import cli_errors
  with cli_errors(PROG):
    run(argv)
  return 0


if __name__ == "__main__":
  sys.exit(main())
