"""Benchmark: wall time of the full HumanEval-X canonical self-test (984 programs).

    .venv/bin/python bench/eval.py --data ../shared/humaneval_x [--workers N]
        [--baseline-tasks 12] [--json out.json]

Runs, in one process and on one machine:
  1. baseline: the first --baseline-tasks problems of every language with workers=1 (cold cache);
  2. the same subset with --workers (default: cores), cold cache: the ratio is the speed-up;
  3. the full self-test with --workers, cold verdict cache (the toolchain caches: Go build cache,
     prebuilt Rust crates, C++ header, javac archive, are warm after step 1, as after one run);
  4. the full self-test again on the warm verdict cache (a rerun executes nothing).
Prints one line per step and pass counts per language.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geex_jax.humaneval_x import evaluate, problems
from geex_jax.humaneval_x.executor import Executor


def _timed(fn):
  start = time.monotonic()
  out = fn()
  return out, time.monotonic() - start


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument(
    "--data", default=os.path.join(os.environ.get("GEEX_SHARED", "../shared"), "humaneval_x")
  )
  ap.add_argument("--workers", type=int, default=os.cpu_count())
  ap.add_argument("--baseline-tasks", type=int, default=12)
  ap.add_argument("--json", default=None, help="also write the figures here")
  args = ap.parse_args(argv)

  probs = problems.load(args.data)
  subset = [problems.task_id_for(k, i) for k in probs for i in range(args.baseline_tasks)]
  figures = {
    "machine": f"{platform.node()} {os.cpu_count()} cores {platform.processor()}",
    "workers": args.workers,
  }
  with tempfile.TemporaryDirectory() as tmp:

    def run(workers, cache, tasks=None):
      ex = Executor(workers=workers, cache_dir=pathlib.Path(tmp) / cache)
      return evaluate.selftest(args.data, ex, progress=False, task_ids=tasks)

    _, t1 = _timed(lambda: run(1, "base1", subset))
    print(f"subset of {len(subset)} programs, workers=1: {t1:.1f} s")
    _, tn = _timed(lambda: run(args.workers, "baseN", subset))
    print(
      f"subset of {len(subset)} programs, workers={args.workers}: {tn:.1f} s "
      f"(speed-up {t1 / tn:.2f}x)"
    )
    results, full = _timed(lambda: run(args.workers, "full"))
    print(f"full self-test, workers={args.workers}, cold verdict cache: {full:.1f} s")
    _, warm = _timed(lambda: run(args.workers, "full"))
    print(
      f"full self-test again, warm verdict cache: {warm:.1f} s "
      f"({full / max(warm, 1e-9):.0f}x faster)"
    )
  counts = {r.language: f"{r.passed}/{r.total}" for r in results}
  print("passed: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
  for r in results:
    print(
      f"  {r.language:<7} compile {r.compile_s:6.1f} s, run {r.run_s:6.1f} s in total; "
      f"slowest run {r.max_run_s:.2f} s"
    )
  figures["seconds"] = {
    r.language: {
      "compile": round(r.compile_s, 1),
      "run": round(r.run_s, 1),
      "slowest_run": round(r.max_run_s, 2),
    }
    for r in results
  }
  figures.update(
    {
      "subset_programs": len(subset),
      "subset_workers1_s": round(t1, 1),
      "subset_workersN_s": round(tn, 1),
      "full_cold_s": round(full, 1),
      "full_warm_s": round(warm, 1),
      "passed": counts,
      "ok": all(r.ok for r in results),
    }
  )
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
  return 0 if figures["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
