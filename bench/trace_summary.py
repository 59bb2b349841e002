"""Where a profiled GPU run spends its time: a summary of a perfetto trace from jax.profiler.

  python bench/trace_summary.py TRACE.json.gz [--top 25] [--steps 63]

For the device's processes (names containing `--process`, default GPU): the span from the first
kernel's start to the last kernel's end, the busy time (union of kernel intervals), the idle
gaps, and the kernels with the most total time (count, total, mean). `--steps` divides the
totals per decode step.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def summarize(path: str, top: int = 25, steps: int = 1, process: str = "GPU") -> str:
  with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  names = {
    e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  chosen = {pid for pid, name in names.items() if process.lower() in name.lower()}
  lines = []
  for pid in sorted(chosen):
    threads = {
      e["tid"]: e["args"]["name"]
      for e in events
      if e.get("pid") == pid and e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    kernels = [e for e in events if e.get("pid") == pid and e.get("ph") == "X"]
    if not kernels:
      continue
    by_tid = collections.Counter(e["tid"] for e in kernels)
    lines.append(
      f"{names[pid]}: {len(kernels)} events on "
      + ", ".join(f"{threads.get(t, t)} ({n})" for t, n in by_tid.most_common(6))
    )
    # The two busiest lines: a stream's kernels, and XLA's per-op line where the trace has one.
    for tid, _ in by_tid.most_common(2):
      lines += _line_summary(
        [e for e in kernels if e["tid"] == tid], threads.get(tid, tid), top, steps
      )
  return "\n".join(lines) if lines else f"{path}: no events of a {process} process"


def _line_summary(events, label, top: int, steps: int) -> list[str]:
  spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
  busy, end = 0.0, spans[0][0]
  for s, t in spans:
    if t > end:
      busy += t - max(s, end)
      end = t
  span = spans[-1][1] - spans[0][0]
  lines = [
    f"  line {label}: span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms "
    f"({busy / span:.1%}), idle {(span - busy) / 1e3:.2f} ms; per step: span "
    f"{span / steps / 1e3:.3f} ms, busy {busy / steps / 1e3:.3f} ms, "
    f"{len(spans) / steps:.0f} events"
  ]
  totals = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    totals[e["name"]][0] += 1
    totals[e["name"]][1] += e["dur"]
  lines.append(f"  {'total ms':>9} {'share':>6} {'count':>6} {'mean us':>8}  name")
  for name, (count, dur) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]:
    lines.append(
      f"  {dur / 1e3:9.2f} {dur / busy:6.1%} {count:6d} {dur / count:8.1f}  {name[:110]}"
    )
  return lines


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("trace")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--steps", type=int, default=1, help="decode steps in the trace")
  ap.add_argument("--process", default="GPU", help="summarise processes whose name has this")
  a = ap.parse_args(argv)
  print(summarize(a.trace, a.top, a.steps, a.process))


if __name__ == "__main__":
  main()
