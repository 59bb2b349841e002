"""What one compiled decode step is made of: cache leaves, fusions, dynamic-update-slices, and
copies or transposes of a whole layer's key or value cache.

  python bench/decode_ops.py --preset tiny --layers 8 [--batch 8]

Compiles a one-token decode step (unrolled layers, as the sampler runs them) for the host
backend and counts its HLO. A proxy for the small kernels per step on an accelerator, where each
fusion is a kernel launch; compare two versions of the model on the same command.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geex_jax.model import codegeex as M


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--layers", type=int, default=8, help="ordinary layers (+ the top query layer)")
  ap.add_argument("--cache_len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=1)
  args = ap.parse_args()
  cfg = M.CodeGeeXConfig.preset(args.preset, scan_layers=False, num_layers=args.layers)
  params = M.init_params(cfg, jax.random.key(0))
  cache = M.init_cache(cfg, args.batch, args.cache_len)

  def step(params, cache, token):
    logits, state = M.CodeGeeX(cfg).apply(
      {"params": params, "cache": cache}, token, decode=True, mutable=["cache"]
    )
    return logits, state["cache"]

  token = jnp.zeros((args.batch, 1), jnp.int32)
  hlo = jax.jit(step, donate_argnums=1).lower(params, cache, token).compile().as_text()
  # Ops that copy or transpose a buffer the size of one layer's key (or value) cache.
  leaf = args.batch * args.cache_len * cfg.hidden_size
  whole = 0
  for line in hlo.splitlines():
    op = re.search(r"= \w+\[([\d,]*)\]\S* (copy|transpose)\(", line)
    if op and math.prod(int(d) for d in op.group(1).split(",") if d) == leaf:
      whole += 1
  print(
    f"{args.preset}, {args.layers}+1 layers, batch {args.batch}, {jax.default_backend()}: "
    f"cache leaves {len(jax.tree.leaves(cache))}, fusions {hlo.count(' fusion(')}, "
    f"dynamic-update-slices {hlo.count('dynamic-update-slice(')}, "
    f"whole-cache copies/transposes {whole}"
  )


if __name__ == "__main__":
  main()
