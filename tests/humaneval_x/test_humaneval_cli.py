"""geex_jax/humaneval_x/cli.py (geex-eval) with evaluate.py, generate.py and report.py behind it."""

import json

import pytest

from geex_jax import fileio
from geex_jax.humaneval_x import cli, evaluate, generate, problems
import humaneval_testing as testing
from geex_jax.humaneval_x.executor import Executor


@pytest.fixture(scope="module")
def data(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  return humaneval_dir


@pytest.fixture(scope="module")
def probs(data):
  return problems.load(data)


def _error(capsys, argv):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("geex-eval: error: "), err
  return lines[0]


def test_help_for_every_command(capsys):
  for cmd in ([], ["selftest"], ["execute"], ["generate"], ["report"]):
    with pytest.raises(SystemExit) as e:
      cli.main(cmd + ["--help"])
    assert e.value.code == 0
  out = capsys.readouterr().out
  assert "selftest" in out and "--samples" in out and "--checkpoint" in out and "--budget" in out


def test_bad_input_is_one_line(capsys, tmp_path, data):
  assert "data directory not found" in _error(
    capsys, ["selftest", "--data", str(tmp_path / "none"), "--languages", "python"]
  )
  assert "samples file not found" in _error(
    capsys, ["execute", "--samples", str(tmp_path / "none.jsonl"), "--data", str(data)]
  )
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"task_id": "Python/0", "generation": "x"}\n{oops\n')
  assert f"{bad}:2: not valid JSON" in _error(
    capsys, ["execute", "--samples", str(bad), "--data", str(data)]
  )
  bad.write_text('{"task_id": "Python/999", "generation": "x"}\n')
  assert "unknown task_id 'Python/999'" in _error(
    capsys, ["execute", "--samples", str(bad), "--data", str(data)]
  )
  bad.write_text('{"task_id": "Cobol/1", "generation": "x"}\n')
  assert "unknown language" in _error(
    capsys, ["execute", "--samples", str(bad), "--data", str(data)]
  )
  assert "not a samples line" not in _error(
    capsys, ["report", str(tmp_path)]
  )  # no results.jsonl: a clear error
  assert not list(tmp_path.glob("*_eval"))  # nothing half-written


def test_selftest_command_reports_known_bad(capsys, data):
  testing.require(Executor(), ["js"])
  code = cli.main(
    [
      "selftest",
      "--data",
      str(data),
      "--tasks",
      "JavaScript/112,JavaScript/2",
      "--no-cache",
      "--quiet",
    ]
  )
  out = capsys.readouterr().out
  assert code == 0
  assert "JavaScript  1/2 passed" in out and "JavaScript/112" in out and "known bad" in out


def test_generate_execute_report_translation_round_trip(tmp_path, data, probs, capsys):
  testing.require(Executor(), ["python", "cpp", "js"])
  pairs = [("python", "cpp"), ("cpp", "js"), ("js", "python")]
  tasks = ["Python/2", "Python/13"]
  jobs = generate.translation_jobs(data, pairs, tasks)
  assert len(jobs) == 6 and all(j.prompt.startswith("code translation\n") for j in jobs)
  by_prompt = {j.prompt: j for j in jobs}

  def complete(prompts, n, temperature, top_p, max_new_tokens):
    """A fake model: sample 0 echoes the prompt + the right body, sample 1 is wrong."""
    out = []
    for p in prompts:
      job = by_prompt[p]
      target = probs[problems.task_language(job.task_id)][job.task_id]
      right = evaluate.assembly.clean(target, target.canonical_solution)
      wrong = "    return 0\n" if target.language == "python" else "    return 0;\n}\n"
      out.append([p + right, wrong][:n])
    return out

  samples = tmp_path / "samples.jsonl"
  assert generate.generate(complete, jobs, samples, 2, 0.8, 0.95, 64, progress=False) == 12
  out_dir = tmp_path / "eval"
  assert (
    cli.main(
      [
        "execute",
        "--samples",
        str(samples),
        "--data",
        str(data),
        "--out",
        str(out_dir),
        "--no-cache",
        "--quiet",
      ]
    )
    == 0
  )
  records = [json.loads(l) for l in (out_dir / "results.jsonl").read_text().splitlines()]
  rows = [json.loads(l) for l in samples.read_text().splitlines()]
  assert [(r["task_id"], r["source_language"]) for r in records] == [
    (r["task_id"], r["source_language"]) for r in rows
  ]
  assert [r["passed"] for r in records] == [True, False] * 6, [r["verdict"] for r in records]
  assert all(r["status"] == "failed" or r["status"] == "compile error" for r in records[1::2])
  summary = json.loads((out_dir / "summary.json").read_text())
  assert set(summary["pairs"]) == {"python->cpp", "cpp->js", "js->python"}
  for e in summary["pairs"].values():
    assert e["pass@1"] == pytest.approx(0.5) and e["pass@10"] is None
  assert summary["languages"]["cpp"]["pass@1"] == pytest.approx(0.5)
  for f in ("summary.md", "pass_at_k.png", "translation_heatmap.png"):
    assert (out_dir / f).stat().st_size > 0
  (out_dir / "summary.json").unlink()
  assert cli.main(["report", str(out_dir)]) == 0
  assert json.loads((out_dir / "summary.json").read_text()) == summary
  assert "| Python -> C++ | 50.00 |" in capsys.readouterr().out


class _Interrupted(Exception):
  pass


def test_generate_resumes_and_drops_a_torn_line(tmp_path, data):
  jobs = generate.generation_jobs(data, ["python"], ["Python/0", "Python/1", "Python/2"])
  assert jobs[0].prompt.startswith("# language: Python\n")
  calls = []
  interrupt = [True]

  def complete(prompts, n, temperature, top_p, max_new_tokens, language=None, seed=None):
    assert language == ["python"] * len(prompts)  # for the sampler's stop rule
    calls.append((len(prompts), n, seed))
    if interrupt[0] and len(calls) == 2:
      raise _Interrupted()  # killed after the first batch
    return [[f"    return {i}\n" for i in range(n)] for _ in prompts]

  out = tmp_path / "s.jsonl"
  with pytest.raises(_Interrupted):
    generate.generate(complete, jobs, out, 3, 0.2, 0.95, 16, batch_size=2, progress=False)
  assert len(out.read_text().splitlines()) == 6  # the first batch: 2 prompts x 3
  with open(out, "a") as f:
    f.write('{"task_id": "Python/2", "genera')  # a torn line
  interrupt[0] = False
  assert generate.generate(complete, jobs, out, 3, 0.2, 0.95, 16, progress=False) == 3
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert (
    sorted(r["task_id"] for r in rows) == ["Python/0"] * 3 + ["Python/1"] * 3 + ["Python/2"] * 3
  )
  assert generate.generate(complete, jobs, out, 3, 0.2, 0.95, 16, progress=False) == 0
  # A batch that wrote nothing is redone with the same seed; more samples of a task that has
  # some come from another seed (not repeats of the ones already there).
  assert calls[-1] == calls[1]
  first_seeds = {c[2] for c in calls}
  assert generate.generate(complete, jobs, out, 5, 0.2, 0.95, 16, progress=False) == 6
  assert calls[-1][1] == 2 and calls[-1][2] not in first_seeds


def test_generate_without_a_sampler_fails_clearly(capsys, tmp_path, data):
  line = _error(
    capsys,
    [
      "generate",
      "--data",
      str(data),
      "--out",
      str(tmp_path / "s.jsonl"),
      "--checkpoint",
      "ck",
      "--tokenizer",
      "tok",
      "--sampler",
      "geex_jax.no_such_sampler:load_completer",
      "--languages",
      "python",
    ],
  )
  assert "sampler module geex_jax.no_such_sampler is not available" in line
  assert not (tmp_path / "s.jsonl").exists()


def test_report_budget_allocation(tmp_path, capsys):
  recs = []
  for lang, prefix, passes in (("python", "Python", [1, 0]), ("cpp", "CPP", [0, 1])):
    for num, p in enumerate(passes):
      for i in range(4):
        recs.append(
          {
            "task_id": f"{prefix}/{num}",
            "language": lang,
            "passed": bool(p),
            "status": "passed" if p else "failed",
          }
        )
  fileio.write_atomic(tmp_path / "results.jsonl", evaluate.jsonl(recs))
  assert cli.main(["report", str(tmp_path), "--budget", "2,4", "--weights", "python=1,cpp=1"]) == 0
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["budget_allocation"]["2"]["allocation"] == {"python": 1, "cpp": 1}
  assert summary["budget_allocation"]["2"]["pass_rate"] == pytest.approx(1.0)
  assert summary["languages"]["python"]["pass@1"] == pytest.approx(0.5)
  assert "budget 2 (python 1, cpp 1): 100.00%" in capsys.readouterr().out


def test_default_sampler_is_wired_to_geex_jax_sampling(monkeypatch):
  import sys
  import types

  seen = {}

  class FakeSampler:
    @classmethod
    def load(cls, checkpoint, tokenizer, **options):
      seen["load"] = (checkpoint, tokenizer, options)
      return cls()

    def complete(self, prompts, n, **kw):
      seen["complete"] = kw
      return [["x"] * n for _ in prompts]

  monkeypatch.setitem(
    sys.modules, "geex_jax.inference.sampler", types.SimpleNamespace(Sampler=FakeSampler)
  )
  complete = generate.load_sampler("ck", "tok", dtype="bf16", int8=True)
  assert seen["load"] == ("ck", "tok", {"dtype": "bf16", "int8": True})
  assert complete(["p"], 2, 0.8, 0.95, 64, language=["cpp"], seed=5) == [["x", "x"]]
  assert seen["complete"] == {
    "temperature": 0.8,
    "top_p": 0.95,
    "max_new_tokens": 64,
    "language": ["cpp"],
    "seed": 5,
    "add_tag": False,
  }
