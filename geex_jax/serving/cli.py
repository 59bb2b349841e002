"""`geex-serve`: an OpenAI-compatible completions server over the continuous-batching engine.

  geex-serve --checkpoint DIR --tokenizer DIR [--host 127.0.0.1] [--port 8000]
      [--dtype fp32|bf16] [--int8] [--slots N] [--max_length L] [--model_name NAME]
      [--max_waiting N] [--chunk K]

The checkpoint is loaded before the port opens (a bad path is one line on stderr, exit 2); the
programs are then compiled while GET /health answers 503. SIGTERM or Ctrl-C: stop accepting,
finish the requests in flight, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from geex_jax.errors import InputError, cli_errors

PROG = "geex-serve"

EPILOG = """\
routes:
  POST /v1/completions                     OpenAI completions: prompt (string or list), max_tokens,
                                           temperature (0 = greedy), top_p, top_k, n, stop, seed,
                                           stream (SSE, ends with `data: [DONE]`); extra field
                                           `lang` prepends the language tag line and applies its
                                           stop rule; `suffix` is refused (no infilling)
  POST /api/v2/multilingual_code_generate  the CodeGeeX API: {prompt, n, lang}
  GET  /v1/models, /health (503 until warm), /metrics (Prometheus)

limits: a prompt of max_length tokens or more is refused with 400; max_tokens is lowered to what
the slot has left (max_length - prompt tokens). When --max_waiting requests already wait for a
slot, new ones get 429 with Retry-After.
"""


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog=PROG,
    description="Serve a geex-jax checkpoint over HTTP with continuous batching.",
    epilog=EPILOG,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument("--checkpoint", required=True, help="geex-jax checkpoint (converted or trained)")
  p.add_argument(
    "--tokenizer",
    required=True,
    help="directory of the released tokenizer files ('bytes': byte-level fallback)",
  )
  p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
  p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute")
  p.add_argument("--int8", action="store_true", help="INT8 weight-only quantization")
  p.add_argument(
    "--model_parallel",
    type=int,
    default=1,
    metavar="N",
    help="shard the weights (and the slots' keys and values, by heads) over N devices",
  )
  p.add_argument(
    "--slots", type=int, default=8, help="KV-cache slots: samples decoded at once (default 8)"
  )
  p.add_argument(
    "--max_length",
    type=int,
    help="positions per slot, prompt + completion (default: the model's maximum); "
    "longer prompts are refused with 400",
  )
  p.add_argument("--chunk", type=int, default=8, help="decode steps between admissions (default 8)")
  p.add_argument(
    "--model_name", help="the model id clients send and see (default: the checkpoint's name)"
  )
  p.add_argument(
    "--max_waiting",
    type=int,
    default=64,
    help="requests that may wait for a slot before new ones get 429 (default 64)",
  )
  p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
  return p


def _check_args(a) -> None:
  from geex_jax import fileio

  if not 0 < a.port < 65536:
    raise InputError(f"--port must be in 1..65535, got {a.port}")
  if a.slots < 1 or a.chunk < 1 or a.max_waiting < 0 or a.model_parallel < 1:
    raise InputError("--slots, --chunk and --model_parallel must be >= 1, --max_waiting >= 0")
  if a.max_length is not None and a.max_length < 2:
    raise InputError(f"--max_length must be >= 2, got {a.max_length}")
  if not fileio.as_path(a.checkpoint).exists():
    raise InputError(f"checkpoint not found: {a.checkpoint}")
  if a.tokenizer != "bytes" and not fileio.as_path(a.tokenizer).is_dir():
    raise InputError(f"tokenizer directory not found: {a.tokenizer}")


def run(argv=None) -> int:
  a = build_parser().parse_args(argv)
  _check_args(a)
  logging.basicConfig(level=a.log_level.upper(), format=f"{PROG}: %(message)s")
  import uvicorn

  from geex_jax.inference.engine import Engine
  from geex_jax.inference.sampler import Sampler
  from geex_jax.serving.app import create_app

  from geex_jax.model import partitioning

  sampler = Sampler.load(
    a.checkpoint,
    None if a.tokenizer == "bytes" else a.tokenizer,
    dtype=a.dtype,
    int8=a.int8,
    mesh=partitioning.model_parallel_mesh(a.model_parallel),
  )
  engine = Engine(
    sampler, slots=a.slots, max_length=a.max_length, chunk=a.chunk, max_waiting=a.max_waiting
  )
  name = a.model_name or os.path.basename(os.path.normpath(str(a.checkpoint))) or "geex"
  app = create_app(engine, name)
  print(f"{PROG}: serving {name} on http://{a.host}:{a.port} ({a.slots} slots)", file=sys.stderr)
  # uvicorn drains on SIGTERM, then re-raises the signal to the handler found at start: this one
  # makes that a clean exit (status 0) rather than death by signal.
  signal.signal(signal.SIGTERM, lambda *_: None)
  uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=None)
  print(f"{PROG}: stopped", file=sys.stderr)
  return 0


def main(argv=None) -> None:
  with cli_errors(PROG):
    sys.exit(run(argv))


if __name__ == "__main__":
  main()
