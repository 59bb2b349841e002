"""Scoring: samples file -> programs -> verdicts -> results JSONL + summary; and the self-test.

Samples JSONL, one sample per line:
  {"task_id": "CPP/3", "generation": "..."}                               generation
  {"task_id": "CPP/3", "generation": "...", "source_language": "python"}  translation python -> cpp
(`completion` is accepted for `generation`.) The task_id names the TARGET problem.

Results JSONL, one line per sample, in input order:
  {"line": 1, "task_id": "CPP/3", "language": "cpp", "source_language": null | "python",
   "sample": 0 (index among the samples of this task / pair), "completion": <cleaned>,
   "status": "passed" | "failed" | "timed out" | "compile error" | "skipped",
   "reason": "...", "verdict": "failed: AssertionError", "passed": false, "compile_s", "run_s"}
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from typing import Iterable, Optional, Sequence, Union

from geex_jax import fileio
from geex_jax.errors import InputError
from geex_jax.humaneval_x import assembly, metrics
from geex_jax.humaneval_x import problems as problems_lib
from geex_jax.humaneval_x.executor import SKIPPED, Executor, Verdict

# The dataset's own mistakes: canonical solutions that fail their own tests. The self-test expects
# exactly these to fail, and nothing else.
KNOWN_BAD: dict[str, str] = {
  "JavaScript/112": "canonical solution fails its own test (the data is wrong)",
  "JavaScript/155": "canonical solution fails its own test (the data is wrong)",
}

# Canonical solutions whose verdict depends on chance; the self-test accepts either verdict.
NONDETERMINISTIC: dict[str, str] = {
  "Go/95": (
    "canonical solution stops after the first two map keys and Go randomises map "
    "iteration order, so the {'p', 'A', 'B'} case passes or fails by chance"
  ),
}


@dataclasses.dataclass(frozen=True)
class Sample:
  """One line of a samples file."""

  line: int
  task_id: str
  generation: str
  source_language: Optional[str] = None  # HumanEval-X key, translation only


def read_samples(path: Union[str, os.PathLike]) -> list[Sample]:
  """Parses a samples JSONL; raises InputError naming the file and line of the first bad line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"samples file not found: {path}")
  out = []
  bad = lambda lineno, e: InputError(f"{path}:{lineno}: not valid JSON ({getattr(e, 'msg', e)})")
  for lineno, row in fileio.iter_jsonl(path, error=bad):
    if not isinstance(row, dict) or "task_id" not in row:
      raise InputError(f"{path}:{lineno}: a sample needs a task_id")
    gen = row.get("generation", row.get("completion"))
    if not isinstance(gen, str):
      raise InputError(f"{path}:{lineno}: a sample needs a string 'generation'")
    src = row.get("source_language")
    if src is not None:
      src = problems_lib.language_of(str(src)).humaneval
    out.append(Sample(lineno, str(row["task_id"]), gen, src))
  if not out:
    raise InputError(f"{path} holds no samples")
  return out


def assemble_samples(
  samples: Sequence[Sample], data_dir: Union[str, os.PathLike]
) -> list[assembly.Assembled]:
  """Programs for samples (the dataset supplies all code around the completion)."""
  needed = {problems_lib.task_language(s.task_id) for s in samples}
  needed |= {s.source_language for s in samples if s.source_language}
  probs = problems_lib.load(data_dir, sorted(needed))
  programs = []
  for s in samples:
    lang = problems_lib.task_language(s.task_id)
    target = probs[lang].get(s.task_id)
    if target is None:
      raise InputError(f"line {s.line}: unknown task_id {s.task_id!r}")
    if s.source_language:
      if s.source_language == lang:
        raise InputError(f"line {s.line}: source_language equals the target language ({lang})")
      src_id = problems_lib.task_id_for(s.source_language, target.number)
      source = probs[s.source_language].get(src_id)
      if source is None:
        raise InputError(f"line {s.line}: no source problem {src_id}")
      programs.append(assembly.assemble_translation(source, target, s.generation))
    else:
      programs.append(assembly.assemble_generation(target, s.generation))
  return programs


def result_records(
  samples: Sequence[Sample], programs: Sequence[assembly.Assembled], verdicts: Sequence[Verdict]
) -> list[dict]:
  """One results record per sample (see the module docstring)."""
  seen: collections.Counter = collections.Counter()
  out = []
  for s, p, v in zip(samples, programs, verdicts):
    idx = seen[(s.task_id, s.source_language)]
    seen[(s.task_id, s.source_language)] += 1
    out.append(
      {
        "line": s.line,
        "task_id": s.task_id,
        "language": p.language,
        "source_language": s.source_language,
        "sample": idx,
        "completion": p.completion,
        "status": v.status,
        "reason": v.reason,
        "verdict": v.text,
        "passed": v.passed,
        "compile_s": round(v.compile_s, 3),
        "run_s": round(v.run_s, 3),
      }
    )
  return out


def read_results(path: Union[str, os.PathLike]) -> list[dict]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(f"results file not found: {path}")
  out = []
  bad = lambda lineno, e=None: InputError(f"{path}:{lineno}: not a results record")
  for lineno, rec in fileio.iter_jsonl(path, error=bad):
    try:
      rec["task_id"], rec["language"], rec["passed"]
    except (KeyError, TypeError):
      raise bad(lineno) from None
    out.append(rec)
  return out


def _counts(records: Iterable[dict]) -> dict[str, dict[int, tuple[int, int]]]:
  """{group: {problem number: (n, c)}}."""
  acc: dict[str, dict[int, list[int]]] = collections.defaultdict(
    lambda: collections.defaultdict(lambda: [0, 0])
  )
  for r in records:
    num = int(r["task_id"].rsplit("/", 1)[1])
    nc = acc[r["_group"]][num]
    nc[0] += 1
    nc[1] += bool(r["passed"])
  return {g: {k: (v[0], v[1]) for k, v in d.items()} for g, d in acc.items()}


def _stats(records: list[dict], group_of) -> dict[str, dict]:
  groups: dict[str, list[dict]] = collections.defaultdict(list)
  for r in records:
    groups[group_of(r)].append({**r, "_group": group_of(r)})
  out = {}
  for g, recs in groups.items():
    counts = list(_counts(recs)[g].values())
    skipped = [r for r in recs if r.get("status") == SKIPPED]
    entry = metrics.pass_at_ks(counts) if not skipped else {f"pass@{k}": None for k in metrics.KS}
    entry.update(
      {
        "problems": len(counts),
        "samples": len(recs),
        "passed": sum(bool(r["passed"]) for r in recs),
        "samples_per_problem": min(n for n, _ in counts),
      }
    )
    if skipped:
      entry["skipped"] = skipped[0].get("reason", "")
    out[g] = entry
  return out


def summarize(records: list[dict]) -> dict:
  """Summary of results records.

  Returns:
    {"languages": {lang: {"pass@1", "pass@10", "pass@100" (None where n < k), "problems",
                          (generation samples; for a translation-only file: per target)
                          "samples", "passed", "samples_per_problem"[, "skipped"]}},
     "average": {"pass@k": mean over languages where defined},
     "pairs": {"python->cpp": {...same...}}   (translation samples only),
     "verdicts": {"passed": count, ...}}
  """
  order = [l.humaneval for l in problems_lib.languages.humaneval_languages()]
  # Per language: the generation samples; a translation-only file is scored per target language.
  gen = [r for r in records if not r.get("source_language")] or records
  langs = _stats(gen, lambda r: r["language"])
  langs = {
    k: langs[k] for k in sorted(langs, key=lambda k: (order.index(k) if k in order else 99, k))
  }
  avg = {}
  for k in metrics.KS:
    vals = [v[f"pass@{k}"] for v in langs.values() if v[f"pass@{k}"] is not None]
    avg[f"pass@{k}"] = sum(vals) / len(vals) if vals else None
  summary = {
    "languages": langs,
    "average": avg,
    "verdicts": dict(collections.Counter(r.get("status", "") for r in records)),
  }
  trans = [r for r in records if r.get("source_language")]
  if trans:
    summary["pairs"] = _stats(trans, lambda r: f"{r['source_language']}->{r['language']}")
  return summary


def jsonl(records: Iterable[dict]) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def execute_file(
  samples_path, data_dir, executor: Executor, out_dir=None, progress: bool = True
) -> tuple[list[dict], dict]:
  """Scores a samples file; with `out_dir` writes results.jsonl, summary.json and summary.md (and
  the plots, see report.write_report). Returns (records, summary)."""
  samples = read_samples(samples_path)
  programs = assemble_samples(samples, data_dir)
  verdicts = executor.execute(programs, progress=progress)
  records = result_records(samples, programs, verdicts)
  summary = summarize(records)
  if out_dir is not None:
    from geex_jax.humaneval_x import report

    fileio.write_atomic(pathlib.Path(out_dir) / "results.jsonl", jsonl(records))
    report.write_report(out_dir, summary)
  return records, summary


@dataclasses.dataclass
class SelfTestResult:
  """Canonical solutions of one language."""

  language: str
  total: int
  passed: int
  failures: dict[str, str]  # task_id -> verdict text
  skipped: Optional[str] = None  # toolchain missing
  ran: frozenset = frozenset()  # task ids run
  compile_s: float = 0.0  # summed over programs (cached verdicts: as first measured)
  run_s: float = 0.0
  max_run_s: float = 0.0

  @property
  def unexpected(self) -> dict[str, str]:
    """Failures that are not in KNOWN_BAD (nor NONDETERMINISTIC)."""
    return {
      t: v for t, v in self.failures.items() if t not in KNOWN_BAD and t not in NONDETERMINISTIC
    }

  @property
  def unexpectedly_passing(self) -> list[str]:
    return [t for t in KNOWN_BAD if t in self.ran and t not in self.failures and not self.skipped]

  @property
  def ok(self) -> bool:
    return not self.skipped and not self.unexpected and not self.unexpectedly_passing


def selftest(
  data_dir,
  executor: Executor,
  langs: Optional[Iterable[str]] = None,
  progress: bool = True,
  task_ids: Optional[Iterable[str]] = None,
) -> list[SelfTestResult]:
  """Runs every canonical solution (or those in `task_ids`) of `langs` (default: all six)."""
  wanted = set(task_ids) if task_ids is not None else None
  if wanted is not None and langs is None:
    langs = sorted({problems_lib.task_language(t) for t in wanted})
  probs = problems_lib.load(data_dir, langs)
  if wanted is not None:
    known = {t for k in probs for t in probs[k]}
    unknown = sorted(wanted - known)
    if unknown:
      raise InputError(f"unknown task_id(s) for the selected languages: {', '.join(unknown)}")
    probs = {k: v for k, v in probs.items() if any(t in wanted for t in v)}
  programs = [
    assembly.canonical(p)
    for k in probs
    for p in probs[k].values()
    if wanted is None or p.task_id in wanted
  ]
  verdicts = executor.execute(programs, progress=progress, desc="self-test")
  out = []
  for k in probs:
    pairs = [(p, v) for p, v in zip(programs, verdicts) if p.language == k]
    skipped = next((v.reason for _, v in pairs if v.status == SKIPPED), None)
    out.append(
      SelfTestResult(
        language=k,
        total=len(pairs),
        passed=sum(v.passed for _, v in pairs),
        failures={p.task_id: v.text for p, v in pairs if not v.passed and not skipped},
        skipped=skipped,
        ran=frozenset(p.task_id for p, _ in pairs),
        compile_s=sum(v.compile_s for _, v in pairs),
        run_s=sum(v.run_s for _, v in pairs),
        max_run_s=max((v.run_s for _, v in pairs), default=0.0),
      )
    )
  return out
