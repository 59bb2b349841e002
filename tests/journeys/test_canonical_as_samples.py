"""Journey: every canonical solution, fed to `geex-eval execute` as a sample, passes.

Issue 13: the brace stop rule cut each completion right after the function the prompt opens, so
the tasks whose tests call a helper defined after it (Rust/10, 38, 50, 137, 145; Go/72) failed
for every possible model. Here all 984 canonical solutions go through the same path as a model's
samples (samples JSONL -> echo strip + stop rule -> assembly -> sandbox) via the console script.

Runtime: the programs differ from the self-test's (the stop rule trims what follows the last
definition), so a cold run compiles and runs all 984 (about as long as the self-test, ~5 min on
2 shared cores). The run uses geex-eval's default verdict cache (`<toolchain dir>/results`, like
a user's run), so a rerun only executes the programs that changed.
"""

import gzip
import json

import pytest

from geex_jax.humaneval_x import evaluate
import humaneval_testing as testing
from geex_jax.humaneval_x.executor import Executor

from journey_tools import run_ok

pytestmark = pytest.mark.slow

LANGS = ("python", "cpp", "java", "js", "go", "rust")
# The tasks of issue 13 and a helper each defines after the function (its test calls it).
HELPER_TASKS = {
  "Rust/10": "fn make_palindrome",
  "Rust/38": "pub fn encode_cyclic",
  "Rust/50": "pub fn decode_shift",
  "Rust/137": "pub enum RtnType",
  "Rust/145": "pub fn sum_of_digits",
  "Go/72": "func isPalindrome",
}


def test_every_canonical_solution_passes_as_a_sample(humaneval_dir, tmp_path):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  testing.require(Executor(), LANGS)
  samples = tmp_path / "samples.jsonl"
  task_ids = []
  with open(samples, "w", encoding="utf-8") as out:
    for key in LANGS:
      with gzip.open(humaneval_dir / f"humaneval_{key}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
          row = json.loads(line)
          task_ids.append(row["task_id"])
          out.write(
            json.dumps({"task_id": row["task_id"], "generation": row["canonical_solution"]}) + "\n"
          )
  assert len(task_ids) == 6 * 164

  out_dir = tmp_path / "eval"
  run_ok(
    "geex-eval",
    "execute",
    "--samples",
    samples,
    "--data",
    humaneval_dir,
    "--out",
    out_dir,
    "--quiet",
    timeout=3000,
  )

  results = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
  assert [r["task_id"] for r in results] == task_ids
  failed = {r["task_id"]: r["verdict"] for r in results if not r["passed"]}
  # Only the dataset's own mistakes fail (and Go/95 may, by chance).
  assert set(failed) - set(evaluate.NONDETERMINISTIC) == set(evaluate.KNOWN_BAD), failed
  by_id = {r["task_id"]: r for r in results}
  for task_id, helper in HELPER_TASKS.items():
    assert by_id[task_id]["passed"] and helper in by_id[task_id]["completion"], task_id

  summary = json.loads((out_dir / "summary.json").read_text())
  for key in LANGS:
    rows = [r for r in results if r["language"] == key]
    misses = sum(not r["passed"] for r in rows)
    known = sum(r["task_id"] in evaluate.KNOWN_BAD for r in rows)
    flaky = sum(r["task_id"] in evaluate.NONDETERMINISTIC and not r["passed"] for r in rows)
    assert len(rows) == 164 and misses == known + flaky, key
    assert (summary["languages"][key]["samples"], summary["languages"][key]["passed"]) == (
      164,
      164 - misses,
    ), key
