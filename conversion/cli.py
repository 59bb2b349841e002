"""geex-convert: released PyTorch CodeGeeX checkpoints <-> geex-jax (Orbax) checkpoints.

A thin shell over conversion/convert.py: parse flags, convert, print the summary. Errors the user
can act on are one line on stderr and exit code 2 (geex_jax.errors.cli_errors).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import sys
from typing import Optional, Sequence

from geex_jax.errors import cli_errors

PROG = "geex-convert"

EPILOG = """\
examples:
  geex-convert torch-to-jax codegeex_13b.pt ckpt/codegeex-13b          # bf16, config inferred
  geex-convert torch-to-jax mp8_dir/ ckpt/13b-fp32 --dtype fp32 --verify
  geex-convert jax-to-torch ckpt/codegeex-13b codegeex_13b.pt          # fp16 single file
  geex-convert jax-to-torch runs/ft/ mp4_out/ --shards 4                # latest step of a run

Memory stays about one tensor large (the 13B model converts in a few GB of RAM). Output is
staged beside DST and only renamed into place when everything, --verify included, succeeded;
missing parent directories of DST are created. SRC and DST may be gs:// URLs: a gs:// DST is
written in a local temporary directory ($TMPDIR) and uploaded when finished, a released
checkpoint on gs:// is downloaded there first.
"""


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=PROG,
    description=__doc__.splitlines()[0].split(": ", 1)[1],
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  common = argparse.ArgumentParser(add_help=False)
  common.add_argument(
    "--verify",
    action="store_true",
    help="after converting, compare logits of the JAX model and the PyTorch "
    "reference on a fixed prompt (models up to 200M params), or a "
    "sample of tensors bit for bit (larger models); a mismatch is an "
    "error and nothing is written",
  )
  common.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  progress = common.add_mutually_exclusive_group()
  progress.add_argument(
    "--progress",
    dest="progress",
    action="store_true",
    default=None,
    help="show a progress bar (default: when stderr is a terminal)",
  )
  progress.add_argument("--no-progress", dest="progress", action="store_false")

  t2j = sub.add_parser(
    "torch-to-jax",
    parents=[common],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    help="released PyTorch checkpoint -> geex-jax params checkpoint",
    description="Convert a released CodeGeeX checkpoint (a .pt file, its fused-QKV variant, or "
    "a directory of mp_rank_XX_model_states.pt model-parallel shards) into a "
    "geex-jax checkpoint DST (config.json + params/, an Orbax PyTree checkpoint) "
    "that geex_jax.model.checkpoints.load_params, the trainer and the sampler restore.",
  )
  t2j.add_argument(
    "src", metavar="SRC", help="a .pt file or a directory of mp_rank_XX files (local or gs://)"
  )
  t2j.add_argument("dst", metavar="DST", help="output checkpoint directory (local or gs://)")
  t2j.add_argument(
    "--dtype",
    choices=("bf16", "fp32", "fp16"),
    default="bf16",
    help="stored parameter dtype (default: bf16)",
  )
  t2j.add_argument(
    "--preset",
    metavar="NAME",
    help="model shape (tiny, 350m, 1.3b, 2.7b, 13b) instead of inferring it from "
    "the tensor shapes; its vocab_size trims/pads the embedding",
  )
  t2j.add_argument(
    "--num-heads",
    type=int,
    metavar="N",
    help="attention heads (not visible in the shapes; default: from the preset "
    "of the same hidden size)",
  )
  t2j.add_argument(
    "--vocab-size",
    type=int,
    metavar="N",
    help="trim or zero-pad the embedding table to N rows (default: keep all "
    "rows, 52224 for the release)",
  )
  t2j.add_argument(
    "--layout",
    choices=("scanned", "unscanned"),
    default="scanned",
    help="stacked `layers` (nn.scan, the trainer's default) or layers_0..N",
  )
  t2j.add_argument(
    "--trust-pickle",
    action="store_true",
    help="allow Python objects besides tensors in SRC (e.g. DeepSpeed shards "
    "carrying training args); unpickling them can run code: trusted files "
    "only",
  )

  j2t = sub.add_parser(
    "jax-to-torch",
    parents=[common],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    help="geex-jax checkpoint -> released PyTorch layout",
    description="Convert a geex-jax checkpoint (converted, or a training run / step directory) "
    "to the released PyTorch layout: one file DST, or with --shards N a directory "
    "DST of mp_rank_XX_model_states.pt split by the model-parallel rules. The "
    "result loads with torch.load(weights_only=True) and strict=True.",
  )
  j2t.add_argument(
    "src", metavar="SRC", help="a geex-jax checkpoint, run or step directory (local or gs://)"
  )
  j2t.add_argument(
    "dst", metavar="DST", help="output .pt file (or directory with --shards), local or gs://"
  )
  j2t.add_argument(
    "--dtype",
    choices=("fp16", "fp32", "bf16"),
    default="fp16",
    help="tensor dtype of the output (default: fp16, as released)",
  )
  j2t.add_argument(
    "--shards",
    type=int,
    default=1,
    metavar="N",
    help="write N model-parallel shards into directory DST (default: 1 file)",
  )
  return parser


def _import_quietly() -> None:
  """The heavy imports (jax, orbax), after --help. They create ~1M long-lived objects, which the
  cyclic collector would otherwise scan again and again, while they load and later while the
  conversion allocates (~0.5 CPU-s at 2.7B): collect nothing during the imports, then freeze
  what they made out of the collector's sight."""
  collecting = gc.isenabled()
  gc.disable()
  try:
    for module in ("orbax.checkpoint", "geex_jax.conversion.convert"):  # both directions use orbax
      importlib.import_module(module)
  finally:
    if collecting:
      gc.enable()
  gc.freeze()


def _keep_freed_memory() -> None:
  """glibc hands every freed block over 32 MB straight back to the OS, so each converted tensor
  of a big model (52 MB at 2.7B) is written into fresh pages that fault in one at a time and
  are zeroed first: ~40% of the CPU time of XLA's transposes, and ~1 s of a 2.7B conversion,
  measured. Serve blocks up to 1 GB from one heap (one arena: every thread reuses the same
  freed blocks) and keep its freed memory for reuse. For this process only, which converts one
  checkpoint and exits. A no-op where the C library lacks mallopt or refuses the values."""
  if not sys.platform.startswith("linux"):
    return
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
  mallopt(m_arena_max, 1)
  mallopt(m_mmap_threshold, 1 << 30)
  mallopt(m_trim_threshold, (1 << 31) - 1)


def main(argv: Optional[Sequence[str]] = None) -> None:
  args = build_parser().parse_args(argv)
  with cli_errors(PROG):
    if "geex_jax.conversion.convert" not in sys.modules:  # first call in this process
      _import_quietly()
      _keep_freed_memory()
    from geex_jax.conversion import convert

    if args.command == "torch-to-jax":
      summary = convert.torch_to_jax(
        args.src,
        args.dst,
        dtype=args.dtype,
        preset=args.preset,
        num_heads=args.num_heads,
        vocab_size=args.vocab_size,
        scan_layers=args.layout == "scanned",
        verify=args.verify,
        overwrite=args.overwrite,
        trust_pickle=args.trust_pickle,
        progress=args.progress,
      )
    else:
      summary = convert.jax_to_torch(
        args.src,
        args.dst,
        dtype=args.dtype,
        shards=args.shards,
        verify=args.verify,
        overwrite=args.overwrite,
        progress=args.progress,
      )
    print(summary.line())


if __name__ == "__main__":
  sys.exit(main())
