"""Train-step throughput (tokens/s) and MFU of geex-jax, several variants in one process.

    python bench/train.py --preset tiny --seq_len 128 --batch 16 --remat none,full
    python bench/train.py --preset 350m --seq_len 256 --batch 2 --steps 3 --scan true,false
    # one GPU (the lead's numbers):
    python bench/train.py --preset 1.3b --seq_len 2048 --dtype bf16 --batch 8 --steps 20 \
        --remat full,dots --attention dot_product
    python bench/train.py --preset 2.7b --seq_len 2048 --dtype bf16 --batch 8 --steps 20 \
        --remat full

It times exactly the trainer's step (geex_jax.training.step.make_train_step, compiled by
geex_jax.training.state.build_state: forward, backward, clipped
AdamW update, fp32 master weights) on one fixed synthetic batch, after `--warmup` untimed steps,
with the state donated as in training. Every variant in --remat / --scan is compiled in the same
process, then timed in alternating rounds (best round reported) with its ratio to the first one,
so the comparison does not depend on the machine's load at another time. All variants' states are
held at once: on a small machine compare two at a time for the big presets. MFU = model
FLOPs/token (CodeGeeXConfig.flops_per_token, attention
included, no remat recompute) x tokens/s / (peak FLOP/s x devices); the peak comes from
geex_jax.training.metrics.PEAK_FLOPS by device kind, or --peak_flops, or on CPU from a measured
fp32 matmul.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from geex_jax.data import batches
from geex_jax.training import optim
from geex_jax.model import partitioning
from geex_jax.training import metrics as train_metrics, state as state_lib
from geex_jax.model.codegeex import CodeGeeXConfig


def measured_matmul_flops(n: int = 2048, reps: int = 5, trials: int = 5) -> float:
  """Best achieved fp32 FLOP/s of an n x n matmul on one device: the CPU's practical peak
  (best of several trials, so a moment of load from other processes does not lower it)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = 0.0
  for _ in range(trials):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
  return best


class Variant:
  """One compiled train step with its own state, timed `steps` steps at a time."""

  def __init__(
    self, config: CodeGeeXConfig, *, batch: int, seq_len: int, microbatches: int, mesh_shape
  ):
    mesh = partitioning.make_mesh(*mesh_shape)
    optimizer = optim.make_optimizer(learning_rate=1e-4)
    # The trainer's own setup: same shardings, same compiled step, same initial state.
    self.setup = state_lib.build_state(
      config, mesh, optimizer, lambda s: 1e-4, microbatches=microbatches
    )
    self.state, _ = state_lib.initial_state(self.setup, config, seed=0)
    source = batches.SyntheticBatches(
      batch_size=batch,
      sequence_length=seq_len,
      seed=0,
      vocab_size=min(config.vocab_size, 512),
      max_doc=seq_len,
    )
    self.data = {k: jax.device_put(v, self.setup.batch_sharding) for k, v in next(source).items()}
    self.mesh, self.step = mesh, self.setup.step_fn
    self.rng = jax.device_put(jax.random.PRNGKey(0), state_lib.replicated(mesh))
    self.loss = None

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps (the first call includes compilation)."""
    with partitioning.mesh_context(self.mesh):
      t0 = time.perf_counter()
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.data, self.rng)
      jax.block_until_ready(metrics)
      dt = (time.perf_counter() - t0) / steps
    self.loss = float(metrics["loss"])
    return dt


def _bools(text: str) -> list[bool]:
  return [t.strip().lower() in ("1", "true", "yes") for t in text.split(",")]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=16, help="global rows per step")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--dtype", default="fp32", help="compute dtype: fp32 | bf16 (params stay fp32)")
  p.add_argument("--remat", default="none", help="comma list of remat policies to compare")
  p.add_argument("--scan", default="true", help="comma list: scan the layers (true/false)")
  p.add_argument("--attention", default="xla", help="xla | dot_product (cuDNN on GPUs)")
  p.add_argument("--vocab_size", type=int, default=None, help="override the preset's vocabulary")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation) per variant")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best one is reported")
  p.add_argument("--peak_flops", type=float, default=None, help="per device; overrides the table")
  p.add_argument("--json", default=None, help="append the results (JSON lines) to this file")
  args = p.parse_args(argv)

  dev = jax.devices()[0]
  overrides = dict(
    dtype=args.dtype,
    param_dtype="float32",
    dropout_rate=0.0,
    attention=args.attention,
    max_position=max(args.seq_len, 128),
  )
  if args.vocab_size:
    overrides["vocab_size"] = args.vocab_size
  base = CodeGeeXConfig.preset(args.preset, **overrides)
  peak, peak_note = train_metrics.peak_flops(dev, args.peak_flops), "table/flag"
  if peak is None and dev.platform == "cpu":
    peak, peak_note = measured_matmul_flops(), "measured fp32 2048^3 matmul"
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  print(
    f"# {args.preset} ({base.num_params() / 1e6:.1f}M params), seq {args.seq_len}, batch "
    f"{args.batch}, {args.dtype}, attention {args.attention}, {jax.device_count()} x "
    f"{dev.device_kind} ({platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs visible); peak {peak / 1e12 if peak else float('nan'):.3f} "
    f"TFLOP/s/device ({peak_note})",
    flush=True,
  )
  variants = []
  for remat, scan in itertools.product(args.remat.split(","), _bools(args.scan)):
    config = base.replace(remat_policy=remat.strip(), scan_layers=scan)
    v = Variant(
      config,
      batch=args.batch,
      seq_len=args.seq_len,
      microbatches=args.microbatches,
      mesh_shape=mesh_shape,
    )
    t0 = time.perf_counter()
    v.time(args.warmup)
    v.warmup_s, v.times, v.name, v.config = time.perf_counter() - t0, [], (remat, scan), config
    variants.append(v)
  # Rounds alternate the variants, and each reports its best round: load from other processes
  # on a shared machine then skews every variant alike instead of whichever ran last.
  for _ in range(args.rounds):
    for v in variants:
      v.times.append(v.time(args.steps))
  print(f"best of {args.rounds} rounds of {args.steps} steps per variant")
  print("| remat | scan | step (s) | tokens/s | MFU | vs first |")
  print("|---|---|---|---|---|---|")
  first = None
  for v in variants:
    dt = min(v.times)
    tps = args.batch * args.seq_len / dt
    mfu = (
      v.config.flops_per_token(args.seq_len) * tps / (peak * jax.device_count()) if peak else None
    )
    first = first or tps
    mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a"
    print(
      f"| {v.name[0]} | {v.name[1]} | {dt:.4f} | {tps:,.0f} | {mfu_s} | {tps / first:.2f}x |",
      flush=True,
    )
    if args.json:
      with open(args.json, "a") as f:
        f.write(
          json.dumps(
            {
              "preset": args.preset,
              "seq_len": args.seq_len,
              "batch": args.batch,
              "dtype": args.dtype,
              "remat": v.name[0],
              "scan": v.name[1],
              "device": dev.device_kind,
              "devices": jax.device_count(),
              "peak_flops": peak,
              "step_s": dt,
              "step_s_rounds": v.times,
              "tokens_per_s": tps,
              "mfu": mfu,
              "warmup_s": v.warmup_s,
              "loss": v.loss,
            }
          )
          + "\n"
        )
  return 0


if __name__ == "__main__":
  sys.exit(main())
