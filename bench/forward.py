"""Forward-pass and decode-step throughput of the CodeGeeX model.

  python bench/forward.py --presets tiny 350m --batch 4 --seq_len 256
  python bench/forward.py --presets 1.3b 13b --dtype bf16 --batch 8 --seq_len 2048   # on a GPU

For each preset: tokens/s of a full forward pass (training shape, no backward) with the plain XLA
attention and with jax.nn.dot_product_attention (the baseline ratio), and of one KV-cache decode
step at the given batch with the cache filled to seq_len/2. Weights are random, made on device.
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from geex_jax.model import codegeex as M


def timed(fn, *args, warmup: int = 1, iters: int = 5) -> float:
  """Median seconds of fn(*args), excluding compilation."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def bench_preset(name: str, dtype: str, batch: int, seq_len: int, iters: int) -> list[dict]:
  cfg = M.CodeGeeXConfig.preset(name, dtype=dtype, param_dtype=dtype)
  seq_len = min(seq_len, cfg.max_position)
  params = jax.jit(lambda k: M.init_params(cfg, k))(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, 50000)
  rows = []
  for attention in ("xla", "dot_product"):
    model = M.CodeGeeX(cfg.replace(attention=attention))
    fwd = jax.jit(lambda p, t, model=model: model.apply({"params": p}, t))
    sec = timed(fwd, params, tokens, iters=iters)
    rows.append(
      dict(
        preset=name,
        what=f"forward ({attention} attention)",
        batch=batch,
        seq=seq_len,
        ms=sec * 1e3,
        tok_s=batch * seq_len / sec,
      )
    )

  prefill_len = seq_len // 2
  one = tokens[:, prefill_len : prefill_len + 1]
  for scan in (True, False):  # the sampler decodes unrolled: compare against the scanned stack
    dcfg = cfg.replace(scan_layers=scan)
    dparams = M.convert_layout(params, dcfg, scan)
    model = M.CodeGeeX(dcfg)
    cache = M.init_cache(dcfg, batch, seq_len)
    prefill = jax.jit(
      lambda p, c, t, model=model: model.apply(
        {"params": p, "cache": c}, t, decode=True, only_last=True, mutable=["cache"]
      )
    )
    _, state = prefill(dparams, cache, tokens[:, :prefill_len])

    @jax.jit
    def step(p, c, t, model=model):
      logits, new = model.apply({"params": p, "cache": c}, t, decode=True, mutable=["cache"])
      return logits, new["cache"]

    sec = timed(step, dparams, state["cache"], one, iters=iters)
    layers = "scanned" if scan else "unrolled"
    rows.append(
      dict(
        preset=name,
        what=f"decode step (KV cache, {layers} layers)",
        batch=batch,
        seq=prefill_len,
        ms=sec * 1e3,
        tok_s=batch / sec,
      )
    )
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--presets", nargs="+", default=["tiny", "350m"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "bf16", "fp32"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--iters", type=int, default=5)
  args = ap.parse_args()
  device = jax.devices()[0]
  print(
    f"device: {device.platform} {getattr(device, 'device_kind', '')} x{jax.device_count()}, "
    f"dtype {args.dtype}"
  )
  print("| preset | what | batch | tokens | ms | tokens/s |")
  print("|---|---|---|---|---|---|")
  for name in args.presets:
    for r in bench_preset(name, args.dtype, args.batch, args.seq_len, args.iters):
      print(
        f"| {r['preset']} | {r['what']} | {r['batch']} | {r['seq']} | {r['ms']:.2f} | "
        f"{r['tok_s']:,.0f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
