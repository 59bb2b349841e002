"""The decode matmul on a GPU: the split-K Pallas kernel's tilings against XLA.

  python bench/decode_matmul.py --peak_bw 4.8e12 --out tilings.json

For each linear of the 13B model ([5120 -> 5120] q/k/v/dense, [5120 -> 20480], [20480 -> 5120])
and each number of activation rows (`--rows`, default 1 and 64), times x @ W over `--layers`
distinct weight copies in one jitted function (so the weights do not sit in the 50-60 MB L2, and
launches are counted as in the decoder; `--inner` passes per dispatch), for:
  xla bf16      the bf16 product (what bf16 decoding does)
  xla int8      int8 widened right before XLA's dot (`decode_matmul.xla_matmul`)
  kernel int8   the Pallas kernel, for a sweep of tilings, then a second round around the best
  kernel bf16   the kernel on the bf16 weights, with the best int8 tilings and half their block_n
Reports microseconds per product and the weight bytes / time as a fraction of `--peak_bw`.
`--out` writes the best tiling per (rows, K, N, weight dtype) as JSON for `bench/sample.py
--tilings`, or null where XLA's product was faster (the sampler then keeps XLA there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from geex_jax.inference import decode_matmul as I  # noqa: E402

SHAPES_13B = ((5120, 5120), (5120, 20480), (20480, 5120))


def _time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _stacked(product, inner: int):
  """A jitted loop of `inner` passes over the layers' weights, one product per weight, so that
  one dispatch covers many products (times are per product, launch gaps included as in the
  decoder). Each pass's input depends on the last pass's output, so XLA cannot hoist it."""

  @jax.jit
  def run(x, ws):
    def one_pass(_, acc):
      xi = x + (acc[0, 0] * 0).astype(x.dtype)
      return acc + sum(product(xi, w) for w in ws)

    n = ws[0].shape[1]
    return jax.lax.fori_loop(0, inner, one_pass, jnp.zeros((x.shape[0], n), jnp.float32))

  return run


def candidates(rows: int, k: int, n: int) -> list[I.Tiling]:
  out = []
  for bn in (64, 128, 256):
    if n % bn:
      continue
    for splits in I.k_splits_for(k):
      if 192 <= (n // bn) * splits <= 1800:
        out.append(
          I.Tiling(block_n=bn, k_splits=splits, block_k=min(128 if rows == 1 else 64, k // splits))
        )
  return out


def neighbours(t: I.Tiling, rows: int) -> list[I.Tiling]:
  deferred = (
    [dataclasses.replace(t, deferred_reduce=True, block_k=bk) for bk in (16, 32)]
    if rows == 1
    else []
  )
  return (
    deferred
    + [dataclasses.replace(t, num_warps=w) for w in (2, 8)]
    + [dataclasses.replace(t, num_stages=s) for s in (2, 4)]
    + [
      dataclasses.replace(t, block_k=t.block_k // 2),
      dataclasses.replace(t, block_k=t.block_k * 2),
    ]
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--rows", type=int, nargs="+", default=[1, 64])
  ap.add_argument("--layers", type=int, default=16, help="distinct weight copies per timing")
  ap.add_argument("--inner", type=int, default=8, help="passes over the weights per timing")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--peak_bw", type=float, default=3.35e12, help="card's peak HBM bytes/s")
  ap.add_argument("--budget_s", type=float, default=240, help="stop sweeping after this long")
  ap.add_argument("--out", type=pathlib.Path, help="best tilings as JSON")
  ap.add_argument(
    "--shapes",
    nargs="+",
    default=[f"{k}x{n}" for k, n in SHAPES_13B],
    help="K x N products (default: the 13B linears)",
  )
  a = ap.parse_args(argv)
  start = time.perf_counter()
  rng = np.random.RandomState(0)
  results, best = [], []
  print(
    f"{jax.devices()[0].device_kind}, peak {a.peak_bw / 1e12:.2f} TB/s, {a.layers} weight "
    "copies per timing\n",
    flush=True,
  )
  print("| rows | K x N | method | tiling | us / product | weight bytes / time / peak |")
  print("|---|---|---|---|---|---|", flush=True)
  shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes]
  weights = {}
  for k, n in shapes:
    keys = jax.random.split(jax.random.key(k + n), a.layers)
    weights[k, n] = (
      [jax.random.randint(kk, (k, n), -127, 128, jnp.int32).astype(jnp.int8) for kk in keys],
      [(jax.random.normal(kk, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16) for kk in keys],
    )
  # Rows outermost: batch 1 (the bandwidth target) for every shape first, within the budget.
  for rows in a.rows:
    for k, n in shapes:
      w8, wb = weights[k, n]
      x = jnp.asarray(rng.randn(rows, k), jnp.bfloat16)

      def report(method, tiling, seconds, nbytes):
        per = seconds / (a.layers * a.inner)
        us = per * 1e6
        frac = nbytes / per / a.peak_bw
        row = dict(
          rows=rows,
          k=k,
          n=n,
          method=method,
          tiling=dataclasses.asdict(tiling) if tiling else None,
          us=us,
          bw_fraction=frac,
        )
        results.append(row)
        print(
          f"| {rows} | {k} x {n} | {method} | {_short(tiling)} | {us:.1f} | {frac:.0%} |",
          flush=True,
        )
        return us

      xla = _stacked(I.xla_matmul, a.inner)
      xla16 = report("xla bf16", None, _time(xla, (x, wb), a.repeats), k * n * 2)
      xla8 = report("xla int8", None, _time(xla, (x, w8), a.repeats), k * n)
      ref = np.asarray(I.xla_matmul(x, w8[0]))
      timed: dict[I.Tiling, float] = {}

      def try_tiling(t):
        if t in timed or not I.fits(t, rows, k, n) or time.perf_counter() - start > a.budget_s:
          return
        try:
          got = np.asarray(I.pallas_matmul(x, w8[0], t))
          err = float(np.abs(got - ref).max() / np.abs(ref).max())
          if not err < 1e-4:
            print(f"<!-- {_short(t)}: wrong result, rel err {err} -->", flush=True)
            return
          fn = _stacked(lambda xx, w, t=t: I.pallas_matmul(xx, w, t), a.inner)
          timed[t] = report("kernel int8", t, _time(fn, (x, w8), a.repeats), k * n)
        except Exception as e:
          print(f"<!-- {_short(t)}: {type(e).__name__}: {str(e)[:200]} -->", flush=True)

      for t in candidates(rows, k, n):
        try_tiling(t)
      if timed:
        for t in neighbours(min(timed, key=timed.get), rows):
          try_tiling(t)
      if not timed:
        continue
      ranked = sorted(timed, key=timed.get)
      best.append(
        dict(
          rows=I.row_bucket(rows),
          k=k,
          n=n,
          itemsize=1,
          tiling=dataclasses.asdict(ranked[0]) if timed[ranked[0]] < xla8 else None,
          kernel_us=timed[ranked[0]],
          xla_us=xla8,
        )
      )
      # bf16 weights: the best int8 tilings, and the same with half the columns (same bytes
      # per row of a program's tile).
      timed16: dict[I.Tiling, float] = {}
      for t in ranked[:3] + [dataclasses.replace(t, block_n=t.block_n // 2) for t in ranked[:3]]:
        if t in timed16 or not I.fits(t, rows, k, n) or time.perf_counter() - start > a.budget_s:
          continue
        try:
          fn = _stacked(lambda xx, w, t=t: I.pallas_matmul(xx, w, t), a.inner)
          timed16[t] = report("kernel bf16", t, _time(fn, (x, wb), a.repeats), k * n * 2)
        except Exception as e:
          print(f"<!-- bf16 {_short(t)}: {type(e).__name__}: {str(e)[:200]} -->", flush=True)
      if timed16:
        top = min(timed16, key=timed16.get)
        best.append(
          dict(
            rows=I.row_bucket(rows),
            k=k,
            n=n,
            itemsize=2,
            tiling=dataclasses.asdict(top) if timed16[top] < xla16 else None,
            kernel_us=timed16[top],
            xla_us=xla16,
          )
        )
  print("\nBest per shape and weight size (tiling null: XLA's product was faster):")
  for b in best:
    print(json.dumps(b))
  if a.out:
    a.out.write_text(
      json.dumps({"device": jax.devices()[0].device_kind, "best": best, "all": results}, indent=1)
    )
  print(f"\nsweep took {time.perf_counter() - start:.0f} s", flush=True)


def _short(t) -> str:
  if t is None:
    return "-"
  return f"bn{t.block_n} s{t.k_splits} bk{t.block_k} w{t.num_warps} st{t.num_stages}" + (
    " deferred" if t.deferred_reduce else ""
  )


def load_tilings(path: pathlib.Path) -> None:
  """Fills decode_matmul.TILINGS from a file this script wrote."""
  for b in json.loads(pathlib.Path(path).read_text())["best"]:
    key = (b["rows"], b["k"], b["n"], b["itemsize"])
    I.TILINGS[key] = I.Tiling(**b["tiling"]) if b["tiling"] else None


if __name__ == "__main__":
  main()
