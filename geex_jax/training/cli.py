"""`geex-train` (also `python -m geex_jax.training`): flags, jax.distributed, gin, and the one-line
error for anything a user can fix.

    geex-train --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin \\
        --gin.MODEL_DIR="'/tmp/run'" --gin.CORPUS_DIR="'/tmp/corpus'"

The gin files name what they configure with `import` lines (runs/pretrain.gin imports the data
sources); this module imports only the loop (`geex_jax.training.train`).
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
from typing import Optional, Sequence

import gin
import jax

from geex_jax.errors import ConfigError, GeexError, cli_errors
from geex_jax.training import xla_options
from geex_jax.training.train import PROG, train

# gin_configs/: installed inside the package (geex_jax/gin_configs, see pyproject.toml), or the
# checkout's top-level folder (editable installs and running from the source tree).
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]  # geex_jax/
GIN_DIR = next(
  (d for d in (_PACKAGE_DIR / "gin_configs", _PACKAGE_DIR.parent / "gin_configs") if d.is_dir()),
  _PACKAGE_DIR.parent / "gin_configs",
)


def _parse_args(argv: Optional[Sequence[str]]):
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="Train CodeGeeX (gin-configured). Bindings: --gin.KEY=VALUE, e.g. "
    "--gin.MODEL_DIR=\"'/tmp/run'\" --gin.train.num_steps=1000",
  )
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    help="gin file (repeatable; relative paths also searched in gin_configs/)",
  )
  parser.add_argument(
    "--gin_search_path",
    action="append",
    default=[],
    help="extra directories for gin files and includes",
  )
  parser.add_argument(
    "--allow_config_change",
    action="store_true",
    help="resume although bindings differ from MODEL_DIR/config.gin (they are "
    "listed, and config.gin is rewritten)",
  )
  parser.add_argument(
    "--init_from",
    default=None,
    help="shorthand for --gin.train.init_from: params-only checkpoint to start from (fine-tuning)",
  )
  dist = parser.add_argument_group("multi-host (one process per host)")
  dist.add_argument(
    "--coordinator_address",
    default=os.environ.get("GEEX_COORDINATOR_ADDRESS"),
    help="host:port of process 0 [$GEEX_COORDINATOR_ADDRESS]",
  )
  dist.add_argument(
    "--num_processes",
    type=int,
    default=_env_int("GEEX_NUM_PROCESSES"),
    help="[$GEEX_NUM_PROCESSES]",
  )
  dist.add_argument(
    "--process_id", type=int, default=_env_int("GEEX_PROCESS_ID"), help="[$GEEX_PROCESS_ID]"
  )
  dist.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() with cluster auto-detection "
    "(TPU pod slices, SLURM) when no coordinator is given",
  )
  args, rest = parser.parse_known_args(argv)
  bindings, unknown = [], []
  for arg in rest:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin.") :].partition("=")
      if not sep:
        parser.error(f"{arg}: expected --gin.KEY=VALUE")
      bindings.append(f"{key} = {value}")
    else:
      unknown.append(arg)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if args.init_from:
    bindings.append(f"train.init_from = {args.init_from!r}")
  if args.allow_config_change:
    bindings.append("train.allow_config_change = True")
  return args, bindings


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value else None


def initialize_distributed(
  coordinator_address: Optional[str] = None,
  num_processes: Optional[int] = None,
  process_id: Optional[int] = None,
  auto: bool = False,
) -> None:
  """jax.distributed.initialize from explicit values, or auto-detected with `auto`."""
  if not (coordinator_address or auto):
    return
  if (
    os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
    or os.environ.get("JAX_PLATFORM_NAME") == "cpu"
  ):
    # Cross-process CPU collectives (tests, CPU clusters) need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if coordinator_address:
      if num_processes is None or process_id is None:
        raise ConfigError("--coordinator_address needs --num_processes and --process_id")
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise ConfigError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None


def parse_gin(
  files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str] = ()
) -> None:
  """Parses gin files/bindings; any gin error becomes one ConfigError line."""
  for path in (*search_paths, GIN_DIR):
    if os.path.isdir(path):
      gin.add_config_file_search_path(os.fspath(path))
  resolved = []
  for f in files:
    if not os.path.exists(f) and (GIN_DIR / f).exists():
      f = os.fspath(GIN_DIR / f)
    resolved.append(f)
  # gin logs an ERROR for every search path an include is not found in before it finds it.
  quiet = logging.Filter()
  quiet.filter = lambda record: not record.getMessage().startswith("Path not found")
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(resolved, bindings)
  except Exception as e:  # gin raises ValueError, OSError, TokenError, SyntaxError, ...
    raise ConfigError(
      "gin: " + " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    ) from None
  finally:
    logging.getLogger().removeFilter(quiet)


def _unwrapped_type(error: Exception) -> type:
  """The class of `error` before gin wrapped it. gin re-raises an exception from a configurable
  as an instance of a local subclass (`ExceptionProxy`) whose __init__ takes no message."""
  cls = type(error)
  while "augment_exception_message" in getattr(cls.__init__, "__qualname__", ""):
    cls = cls.__mro__[1]
  return cls


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, bindings = _parse_args(argv)
  with cli_errors(PROG):
    if not args.gin_file:
      raise ConfigError(
        "no --gin_file given (e.g. --gin_file=models/tiny.gin --gin_file=runs/pretrain.gin)"
      )
    # gin first: its XLA options must be in XLA_FLAGS before any backend exists.
    parse_gin(args.gin_file, bindings, args.gin_search_path)
    try:
      flags = xla_options.xla_options()
    except GeexError as e:
      raise _unwrapped_type(e)(str(e).splitlines()[0]) from None
    if flags:
      xla_options.apply(flags)
      print(f"{PROG}: XLA flags from gin: {' '.join(flags)}", flush=True)
    initialize_distributed(
      args.coordinator_address, args.num_processes, args.process_id, args.distributed
    )
    try:
      result = train()
    except GeexError as e:
      # gin appends "In call to configurable ..." lines: keep the user's line only.
      raise _unwrapped_type(e)(str(e).splitlines()[0]) from None
    except (TypeError, ValueError, RuntimeError) as e:
      if "configurable" in str(e) or "Required bindings" in str(e):
        raise ConfigError("gin: " + str(e).splitlines()[0]) from None
      raise
    if result.status == "preempted":
      return 143  # 128 + SIGTERM: the scheduler should restart (it resumes from the checkpoint)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
