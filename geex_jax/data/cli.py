"""`geex-data`: build a corpus (thin wrapper over geex_jax.data.corpus)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from geex_jax.data import corpus
from geex_jax.errors import InputError, cli_errors

PROG = "geex-data"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description="CodeGeeX data tools.")
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser(
    "build",
    help="source trees -> filtered, deduplicated TFRecord corpus",
    description="Walks --src trees, keeps files of known languages that pass the "
    "paper's filters, drops duplicates, writes language-partitioned "
    "TFRecord shards and manifest.json to --out. Rerun to resume.",
  )
  b.add_argument(
    "--src", action="append", default=[], metavar="DIR", help="a source tree (repeatable)"
  )
  b.add_argument("--out", required=True, metavar="DIR", help="the corpus directory")
  b.add_argument(
    "--languages",
    nargs="+",
    metavar="LANG",
    help="keep only these languages (names or aliases: python cpp js ...)",
  )
  b.add_argument(
    "--embedded",
    action="store_true",
    help="build the small demo corpus from this machine's own sources "
    "(Python stdlib, /usr/include, /usr/share, /usr/lib); no --src needed",
  )
  b.add_argument(
    "--flush-mb", type=int, default=256, help="MB of text per flush (shard and resume granularity)"
  )
  b.add_argument(
    "--heldout-fraction",
    "--heldout_fraction",
    type=float,
    default=None,
    metavar="F",
    help="share of each language's documents held out as its validation split, chosen by "
    f"content hash (default {corpus.DEFAULT_HELDOUT_FRACTION}, "
    f"--embedded {corpus.EMBEDDED_HELDOUT_FRACTION}; 0 = none)",
  )
  b.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = _parser().parse_args(argv)
  with cli_errors(PROG):
    heldout = {} if args.heldout_fraction is None else {"heldout_fraction": args.heldout_fraction}
    if args.embedded:
      if args.src or args.languages:
        raise InputError("--embedded takes no --src or --languages")
      m = corpus.build_embedded_corpus(args.out, progress=not args.no_progress, **heldout)
    else:
      if args.flush_mb < 1:
        raise InputError("--flush-mb must be >= 1")
      m = corpus.build_corpus(
        args.src,
        args.out,
        languages=args.languages,
        flush_bytes=args.flush_mb << 20,
        progress=not args.no_progress,
        **heldout,
      )
    dropped = ", ".join(f"{k} {v}" for k, v in m["dropped"].items() if v)
    langs = ", ".join(f"{n} {c['documents']}" for n, c in sorted(m["languages"].items()))
    held = m.get("validation_documents", 0)
    print(
      f"{args.out}: kept {m['kept']} of {m['files']} source files "
      f"({m['bytes'] / 1e6:.1f} MB; {held} held out for validation); "
      f"dropped: {dropped or 'none'}; per language: {langs}"
    )


if __name__ == "__main__":
  main(sys.argv[1:])
