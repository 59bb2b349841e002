"""bench/: the GPU benchmark scripts run end to end on the CPU at toy sizes.

A device session has 15 minutes in all, so a script that broke since it last ran (a renamed
function, a moved constant) must fail here, not there. Runs the pipeline of `bench/gpu.sh`: the
kernel sweep writes tilings, the sampling benchmark reads them and profiles its batch-1 decodes,
and the trace summary reads the profiles (here the CPU's lines; on a card the GPU's).
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, str(REPO / "bench" / script), *args],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out


def _json_lines(text: str) -> list[dict]:
  return [json.loads(l) for l in text.splitlines() if l.startswith("{")]


def test_gpu_benchmarks_run_on_cpu(tmp_path):
  tilings = tmp_path / "tilings.json"
  # A time budget the toy sweep never reaches: 5 s, hit on a loaded CI machine, cut the bf16 rows.
  _run(
    "decode_matmul.py",
    "--shapes",
    "128x256",
    "--rows",
    "1",
    "--layers",
    "2",
    "--inner",
    "1",
    "--repeats",
    "1",
    "--budget_s",
    "300",
    "--out",
    str(tilings),
  )
  best = json.loads(tilings.read_text())["best"]
  assert {(b["rows"], b["k"], b["n"], b["itemsize"]) for b in best} == {
    (1, 128, 256, 1),
    (1, 128, 256, 2),
  }

  out = _run(
    "sample.py",
    "--gpu",
    "--preset",
    "tiny",
    "--dtype",
    "int8",
    "bf16",
    "--gpu_batch",
    "2",
    "--gpu_new_tokens",
    "6",
    "--prompt_len",
    "8",
    "--matmul",
    "auto",
    "xla",
    "--tilings",
    str(tilings),
    "--steps_per_loop",
    "1",
    "3",
    "--xla_options",
    "xla_gpu_dot_merger_threshold_mb=32",
    "--trace",
    str(tmp_path / "tr"),
  )
  rows = _json_lines(out.stderr)
  variants = {(r["dtype"], r["impl"], r["batch"]) for r in rows}
  assert variants == {
    ("int8", "auto", 1),
    ("int8", "auto", 2),
    ("int8", "xla", 1),
    ("int8", "xla", 2),
    ("int8", "auto, 3 steps/loop", 1),
    ("bf16", "xla", 1),
    ("bf16", "xla", 2),
    ("bf16", "xla, 3 steps/loop", 1),
    ("bf16", "xla_gpu_dot_merger_threshold_mb=32", 1),
  }
  # Greedy decoding of the same weights: every variant of a dtype emits the same 6 tokens (the
  # k-steps-per-loop rows carry k - 1 pad slots more).
  for dtype in ("int8", "bf16"):
    heads = {tuple(r["tokens_head"][:6]) for r in rows if r["dtype"] == dtype}
    assert len(heads) == 1, (dtype, heads)
  assert out.stdout.count("| tiny |") == len(rows)

  traces = sorted((tmp_path / "tr").glob("*/plugins/profile/*/perfetto_trace.json.gz"))
  assert [t.parents[3].name for t in traces] == ["bf16_xla", "int8_auto", "int8_xla"]
  summary = _run("trace_summary.py", str(traces[0]), "--steps", "5", "--process", "cpu").stdout
  assert "/host:CPU" in summary and "per step" in summary and "total ms" in summary
