"""Train-step throughput (tokens/s), MFU and compiled memory of geex-jax, several variants.

    python bench/train.py --preset tiny --seq_len 128 --batch 16 --remat none,full
    python bench/train.py --preset 350m --seq_len 256 --batch 2 --steps 3 --scan true,false
    # one GPU, one variant at a time (big presets), skipping what does not fit:
    python bench/train.py --preset 2.7b --seq_len 2048 --dtype bf16 --sequential --budget_s 300 \
        --variants cudnn:full:true:8 xla:full:true:8 cudnn:minimal:true:16
    python bench/train.py --preset 1.3b --seq_len 2048 --dtype bf16 --attention cudnn,xla \
        --remat none,minimal,full --batch 8,16 --sequential \
        --xla_options latency_hiding_scheduler=true while_loop_double_buffering=true

It times exactly the trainer's step (geex_jax.training.step.make_train_step, compiled by
geex_jax.training.state.build_state: forward, backward, clipped AdamW update, fp32 master
weights) on one fixed synthetic batch, after `--warmup` untimed steps, with the state donated as
in training. The variants are the product of --attention x --remat x --scan x --batch (or the
explicit --variants list, attention:remat:scan:batch, in that order). By default every variant
is compiled in the same process, then timed in alternating rounds (best round reported) with
its ratio to the first one, so the comparison does not depend on the machine's load at another
time; all variants' states are then held at once. `--sequential` instead builds, times and frees
one variant at a time (a big model on one card), skips one whose compiled memory exceeds the
device's, records an out-of-memory failure as OOM (another error by its first line) and goes
on, and after `--budget_s` starts no variant once one has been measured. Each row also has the
compiled step's memory (`memory_analysis()`: temporaries, arguments, outputs). MFU = model
FLOPs/token (CodeGeeXConfig.flops_per_token, attention included, no remat recompute) x
tokens/s / (peak FLOP/s x devices); the peak comes from geex_jax.training.metrics.PEAK_FLOPS by
device kind, or --peak_flops, or on CPU from a measured fp32 matmul. `--toy` shrinks the preset
to a 2-layer toy (a CPU smoke test of bench/gpu.sh).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

from geex_jax.data import batches
from geex_jax.model import partitioning
from geex_jax.model.codegeex import CodeGeeXConfig
from geex_jax.training import metrics as train_metrics, optim, state as state_lib, xla_options

GB = 1e9
TOY = dict(hidden_size=64, num_layers=2, num_heads=4, ffn_size=256, vocab_size=512)


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


def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


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
    source = batches.SyntheticBatches(
      batch_size=batch,
      sequence_length=seq_len,
      seed=0,
      vocab_size=min(config.vocab_size, 512),
      max_doc=seq_len,
    )
    self.data = {k: jax.device_put(v, self.setup.batch_sharding) for k, v in next(source).items()}
    self.mesh = mesh
    self.rng = jax.device_put(jax.random.PRNGKey(0), state_lib.replicated(mesh))
    self.loss = None
    # Compiled once here (the timed step is this executable): its memory needs come first.
    abstract = state_lib.abstract_with_shardings(self.setup.shapes, self.setup.shardings)
    t0 = time.perf_counter()
    with partitioning.mesh_context(mesh):
      self.step = self.setup.step_fn.lower(abstract, self.data, self.rng).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = compiled_memory(self.step)
    self.state = None

  def init_state(self, config: CodeGeeXConfig) -> None:
    self.state, _ = state_lib.initial_state(self.setup, config, seed=0)

  def time(self, steps: int) -> float:
    """Seconds per step over `steps` steps."""
    with partitioning.mesh_context(self.mesh):
      t0 = time.perf_counter()
      for _ in range(steps):
        self.state, metrics = self.step(self.state, self.data, self.rng)
      jax.block_until_ready(metrics)
      dt = (time.perf_counter() - t0) / steps
    self.loss = float(metrics["loss"])
    return dt

  def free(self) -> None:
    self.state = self.data = self.step = None
    gc.collect()


def compiled_memory(compiled) -> dict:
  """Bytes of the compiled step by kind (XLA's memory_analysis), {} where unsupported."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return {}
  if m is None:
    return {}
  fields = ("temp", "argument", "output", "alias", "generated_code")
  return {f: int(getattr(m, f"{f}_size_in_bytes", 0)) for f in fields}


def device_memory_limit(dev) -> int | None:
  try:
    return int((dev.memory_stats() or {}).get("bytes_limit")) or None
  except Exception:
    return None


def _bools(text: str) -> list[bool]:
  return [t.strip().lower() in ("1", "true", "yes") for t in text.split(",")]


def _variants(args) -> list[tuple[str, str, bool, int]]:
  """(attention, remat, scan, batch) in the order they run."""
  if args.variants:
    out = []
    for item in args.variants:
      attention, remat, scan, batch = item.split(":")
      out.append((attention, remat, _bools(scan)[0], int(batch)))
    return out
  return list(
    itertools.product(
      [a.strip() for a in args.attention.split(",")],
      [r.strip() for r in args.remat.split(",")],
      _bools(args.scan),
      [int(b) for b in str(args.batch).split(",")],
    )
  )


def _parse_xla_options(items: list[str]) -> list[str]:
  """name=value (a geex_jax.training.xla_options name, or a raw xla_... flag) -> flags."""
  named, raw = {}, []
  for item in items:
    name, _, value = item.partition("=")
    if name.startswith("xla_"):
      raw.append(f"--{item}")
    else:
      named[name] = value
  return xla_options.xla_options(named, extra_flags=raw)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--toy", action="store_true", help="the preset's options at a 2-layer toy shape")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", default="16", help="comma list of global rows per step")
  p.add_argument("--microbatches", type=int, default=1)
  p.add_argument("--dtype", default="fp32", help="compute dtype: fp32 | bf16 (params stay fp32)")
  p.add_argument("--remat", default="none", help="comma list of remat policies to compare")
  p.add_argument("--scan", default="true", help="comma list: scan the layers (true/false)")
  p.add_argument("--attention", default="xla", help="comma list: xla, dot_product, cudnn, splash")
  p.add_argument("--variants", nargs="*", default=None, help="attention:remat:scan:batch ...")
  p.add_argument("--scan_unroll", type=int, default=1)
  p.add_argument("--loss_chunk_size", type=int, default=0, help="0 = logits of all positions")
  p.add_argument("--xla_options", nargs="*", default=[], help="name=value (xla_options table)")
  p.add_argument("--vocab_size", type=int, default=None, help="override the preset's vocabulary")
  p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,model")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best one is reported")
  p.add_argument("--sequential", action="store_true", help="one variant at a time (see above)")
  p.add_argument("--budget_s", type=float, default=None, help="start no variant after this")
  p.add_argument("--memory_limit_gb", type=float, default=None, help="default: the device's")
  p.add_argument("--peak_flops", type=float, default=None, help="per device; overrides the table")
  p.add_argument("--json", default=None, help="append the results (JSON lines) to this file")
  args = p.parse_args(argv)
  started = time.perf_counter()
  # Before anything creates a backend: XLA reads its flags once.
  xla_options.apply(_parse_xla_options(args.xla_options))

  dev = jax.devices()[0]
  overrides = dict(
    dtype=args.dtype,
    param_dtype="float32",
    dropout_rate=0.0,
    max_position=max(args.seq_len, 128),
    scan_unroll=args.scan_unroll,
    loss_chunk_size=args.loss_chunk_size,
  )
  if args.toy:
    overrides.update(TOY)
  if args.vocab_size:
    overrides["vocab_size"] = args.vocab_size
  base = CodeGeeXConfig.preset(args.preset, **overrides)
  peak, peak_note = train_metrics.peak_flops(dev, args.peak_flops), "table/flag"
  if peak is None and dev.platform == "cpu":
    peak, peak_note = measured_matmul_flops(), "measured fp32 2048^3 matmul"
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  limit = args.memory_limit_gb * GB if args.memory_limit_gb else device_memory_limit(dev)
  print(
    f"# {args.preset}{' (toy shape)' if args.toy else ''} ({base.num_params() / 1e6:.1f}M "
    f"params), seq {args.seq_len}, {args.dtype}, loss chunk {args.loss_chunk_size}, "
    f"{jax.device_count()} x {dev.device_kind} ({platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs visible, memory limit "
    f"{f'{limit / GB:.1f} GB' if limit else 'n/a'}); peak "
    f"{peak / 1e12 if peak else float('nan'):.3f} TFLOP/s/device ({peak_note})"
    + (f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}" if args.xla_options else ""),
    flush=True,
  )
  mode = "one at a time" if args.sequential else "in alternating rounds"
  print(f"best of {args.rounds} rounds of {args.steps} steps per variant, {mode}")
  print(
    "| attention | remat | scan | batch | step (s) | tokens/s | MFU | vs first | temp GB | "
    "args GB | out GB | compile (s) |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  rows: list[dict] = []

  def report(name, config, v=None, status="ok"):
    attention, remat, scan, batch = name
    row = dict(
      preset=args.preset,
      toy=args.toy,
      seq_len=args.seq_len,
      batch=batch,
      dtype=args.dtype,
      attention=attention,
      remat=remat,
      scan=scan,
      scan_unroll=args.scan_unroll,
      loss_chunk_size=args.loss_chunk_size,
      xla_options=args.xla_options,
      device=dev.device_kind,
      devices=jax.device_count(),
      peak_flops=peak,
      status=status,
    )
    cells = ["—"] * 4
    if v is not None:
      row.update(memory_bytes=v.memory, compile_s=v.compile_s)
    if v is not None and status == "ok":
      dt = min(v.times)
      tps = batch * args.seq_len / dt
      mfu = (
        config.flops_per_token(args.seq_len) * tps / (peak * jax.device_count()) if peak else None
      )
      first = next((r["tokens_per_s"] for r in rows if r["status"] == "ok"), tps)
      row.update(step_s=dt, step_s_rounds=v.times, tokens_per_s=tps, mfu=mfu, loss=v.loss)
      row.update(warmup_s=v.warmup_s)
      mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a"
      cells = [f"{dt:.4f}", f"{tps:,.0f}", mfu_s, f"{tps / first:.2f}x"]
    elif status != "ok":
      cells[0] = status
    mem = v.memory if v is not None else {}
    gb = lambda k: f"{mem[k] / GB:.3f}" if k in mem else "—"
    compile_s = f"{v.compile_s:.1f}" if v is not None else "—"
    print(
      f"| {attention} | {remat} | {scan} | {batch} | {' | '.join(cells)} | {gb('temp')} | "
      f"{gb('argument')} | {gb('output')} | {compile_s} |",
      flush=True,
    )
    rows.append(row)
    if args.json:
      with open(args.json, "a") as f:
        f.write(json.dumps(row) + "\n")

  def build(name):
    attention, remat, scan, batch = name
    config = base.replace(attention=attention, remat_policy=remat, scan_layers=scan)
    v = Variant(
      config,
      batch=batch,
      seq_len=args.seq_len,
      microbatches=args.microbatches,
      mesh_shape=mesh_shape,
    )
    v.name, v.config, v.times = name, config, []
    return v

  def warm(v):
    v.init_state(v.config)
    t0 = time.perf_counter()
    v.time(args.warmup)
    v.warmup_s = time.perf_counter() - t0

  held = []
  for name in _variants(args):
    config = base.replace(attention=name[0], remat_policy=name[1], scan_layers=name[2])
    over = args.budget_s is not None and time.perf_counter() - started > args.budget_s
    if over and (held or any(r["status"] == "ok" for r in rows)):  # one measurement at least
      report(name, config, status="skipped (time budget)")
      continue
    v = None
    try:
      v = build(name)
      need = sum(v.memory.get(k, 0) for k in ("temp", "argument", "output"))
      need -= v.memory.get("alias", 0)
      if limit and need > limit:
        report(name, config, v, status=f"OOM (needs {need / GB:.1f} GB)")
        v.free()
        continue
      warm(v)
      if args.sequential:
        for _ in range(args.rounds):
          v.times.append(v.time(args.steps))
        report(name, config, v)
        v.free()
      else:
        held.append(v)
    except Exception as e:  # a sweep records a failed variant and goes on
      if not (args.sequential or is_oom(e)):
        raise
      report(
        name, config, v, status="OOM" if is_oom(e) else f"error: {str(e).splitlines()[0][:80]}"
      )
      if v is not None:
        v.free()
      gc.collect()
  # Rounds alternate the variants, and each reports its best round: load from other processes
  # on a shared machine then skews every variant alike instead of whichever ran last.
  for _ in range(args.rounds):
    for v in held:
      v.times.append(v.time(args.steps))
  for v in held:
    report(v.name, v.config, v)
  return 0


if __name__ == "__main__":
  sys.exit(main())
