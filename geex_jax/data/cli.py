"""`geex-data`: build a corpus (thin wrapper over geex_jax.data.corpus)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from geex_jax.data import corpus, tfds_corpus
from geex_jax.errors import InputError, cli_errors

PROG = "geex-data"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog=PROG, description="CodeGeeX data tools.")
  sub = p.add_subparsers(dest="command", required=True)
  b = sub.add_parser(
    "build",
    help="source trees -> filtered, deduplicated corpus (a TFDS dataset)",
    description="Walks --src trees, keeps files of known languages that pass the "
    "paper's filters, drops duplicates, and writes to --out a TFDS dataset with one split per "
    "language (<slug>, and <slug>_validation for the held-out documents) plus manifest.json. "
    "Rerun to resume. With --runner, the same build runs as an Apache Beam pipeline.",
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
  b.add_argument(
    "--file-format",
    "--file_format",
    choices=tfds_corpus.FILE_FORMATS,
    default=tfds_corpus.DEFAULT_FILE_FORMAT,
    help="shard format: tfrecord (default; local disks and gs://, read by seqio and the batch "
    "pipeline) or array_record (random access for tfds data sources / Grain; local disks)",
  )
  b.add_argument(
    "--runner",
    metavar="RUNNER",
    help="build with Apache Beam on this runner (DirectRunner, DataflowRunner, SparkRunner, "
    "FlinkRunner, ...) instead of in this process: for corpora that outgrow one machine. "
    "Beam options follow a `--`, e.g. `-- --project P --region R --temp_location gs://B/tmp`; "
    "--flush-mb is then the target shard size",
  )
  b.add_argument(
    "--num-workers",
    "--num_workers",
    type=int,
    default=2,
    metavar="N",
    help="--runner DirectRunner: worker processes (default 2)",
  )
  b.add_argument("--no-progress", action="store_true", help="no progress bar")
  return p


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  beam_args = argv[argv.index("--") + 1 :] if "--" in argv else []
  argv = argv[: argv.index("--")] if "--" in argv else argv
  args = _parser().parse_args(argv)
  with cli_errors(PROG):
    heldout = {} if args.heldout_fraction is None else {"heldout_fraction": args.heldout_fraction}
    if args.flush_mb < 1:
      raise InputError("--flush-mb must be >= 1")
    if beam_args and not args.runner:
      raise InputError(f"Beam options ({' '.join(beam_args)}) given without --runner")
    common = dict(languages=args.languages, file_format=args.file_format, **heldout)
    if args.embedded:
      if args.src or args.languages:
        raise InputError("--embedded takes no --src or --languages")
      if args.runner:
        raise InputError("--embedded is built in this process; drop --runner")
      m = corpus.build_embedded_corpus(
        args.out, file_format=args.file_format, progress=not args.no_progress, **heldout
      )
    elif args.runner:
      from geex_jax.data import beam_corpus

      if args.num_workers < 1:
        raise InputError("--num-workers must be >= 1")
      m = beam_corpus.build_corpus_beam(
        args.src,
        args.out,
        shard_bytes=args.flush_mb << 20,
        runner=args.runner,
        num_workers=args.num_workers,
        pipeline_args=beam_args,
        **common,
      )
    else:
      m = corpus.build_corpus(
        args.src, args.out, flush_bytes=args.flush_mb << 20, progress=not args.no_progress, **common
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
