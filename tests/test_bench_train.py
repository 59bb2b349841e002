"""bench/gpu.sh `train`: the training-step sweep runs end to end on the CPU at a toy shape.

The same commands as on the card (one variant at a time, time budget, JSON rows), so the 15
device minutes are not spent on a sweep that cannot start. On the CPU the cuDNN variants fail
(recorded as error rows), the first XLA one is measured, and the budget (0 s here) skips the
rest.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_sh_train_sweep_runs_on_cpu(tmp_path):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    GEEX_TOY="1",
    TRAIN_PRESETS="2.7b",  # the loop's second preset: one process, its budget index 1
    PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
  )
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    ["bash", "bench/gpu.sh", str(tmp_path), "train"],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
  for preset in ("2.7b",):
    mine = [r for r in rows if r["preset"] == preset]
    # The whole grid, in the script's priority order.
    grid = {(r["attention"], r["remat"], r["scan"], r["batch"]) for r in mine}
    assert len(mine) == len(grid) == 24
    assert [r["status"].split(":")[0] for r in mine[:2]] == ["error", "ok"]
    assert mine[0]["attention"] == "cudnn" and mine[1]["attention"] == "xla"
    assert all(r["status"] == "skipped (time budget)" for r in mine[2:])
    ok = mine[1]
    assert ok["tokens_per_s"] > 0 and ok["memory_bytes"]["temp"] > 0 and ok["dtype"] == "bf16"
  assert (tmp_path / "train.md").read_text().count("| xla | full | True | 8 |") == 1
