"""geex_jax/humaneval_x/executor.py: verdicts for right, wrong, broken and slow programs."""

import json
import re

import pytest

from geex_jax.humaneval_x import assembly, problems
import humaneval_testing as testing
from geex_jax.humaneval_x.assembly import Assembled
from geex_jax.humaneval_x.executor import Executor

LANGS = ["python", "cpp", "java", "js", "go", "rust"]

# Wrong bodies for tasks 0 (bool: any two numbers closer than threshold), 2 (float: fractional
# part) and 13 (int: gcd), written like a model's completion (ending at the function's brace).
WRONG = {
  "python": {0: "    return False\n", 2: "    return number\n", 13: "    return a * b\n"},
  "cpp": {0: "    return false;\n}\n", 2: "    return number;\n}\n", 13: "    return a*b;\n}\n"},
  "java": {
    0: "        return false;\n    }\n}",
    2: "        return number;\n    }\n",
    13: "        return a * b;\n    }\n",
  },
  "js": {0: "  return false;\n}\n", 2: "  return number;\n}\n", 13: "  return a * b;\n}\n"},
  "go": {0: "    return false\n}\n", 2: "    return number\n}\n", 13: "    return a * b\n}\n"},
  "rust": {
    0: "    return false;\n}\n",
    2: "    return *number;\n}\n",
    13: "    return a * b;\n}\n",
  },
}
# What a failed test says, per language.
FAIL_REASON = {
  "python": r"AssertionError",
  "cpp": r"Assertion .* failed",
  "java": r"AssertionError",
  "js": r"Assertion failed",
  "go": r"FAIL|Error",
  "rust": r"panicked|assert",
}
# Text after the function that the stop rule must cut (it would break or fail the program).
JUNK = {
  "python": "\n\nassert False, 'junk'\n",
  "cpp": "\nint main() { return 1; }\n",
  "java": "\n    junk junk\n}",
  "js": "\nprocess.exit(1);\n",
  "go": "\nfunc main() { panic(1) }\n",
  "rust": "\nfn main() { panic!(); }\n",
}


@pytest.fixture(scope="module")
def probs(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  return problems.load(humaneval_dir)


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
  e = Executor(workers=2, cache_dir=tmp_path_factory.mktemp("verdicts"), run_timeout_s=10)
  testing.require(e, LANGS)
  return e


def _body(p):
  """The canonical solution cut like a generation (up to the function's closing brace)."""
  return assembly.clean(p, p.canonical_solution)


def test_right_wrong_and_junk_completions(ex, probs):
  cases = []  # (program, expected status, reason pattern)
  for lang in LANGS:
    for num, body in WRONG[lang].items():
      p = probs[lang][problems.task_id_for(lang, num)]
      cases.append((assembly.assemble_generation(p, body), "failed", FAIL_REASON[lang]))
    p = probs[lang][problems.task_id_for(lang, 2)]
    cases.append((assembly.assemble_generation(p, _body(p) + JUNK[lang]), "passed", ""))
  # numpy is importable in the sandbox (the reference harness offers it as np).
  p = probs["python"]["Python/2"]
  cases.append(
    (assembly.assemble_generation(p, "    return float(np.modf(number)[0])\n"), "passed", "")
  )
  verdicts = ex.execute([c[0] for c in cases], progress=False)
  for (prog, status, pattern), v in zip(cases, verdicts):
    assert v.status == status, (prog.task_id, v.text)
    assert re.search(pattern, v.reason), (prog.task_id, v.text)


def test_compile_error_and_compile_time_not_counted(ex, probs):
  p = probs["cpp"]["CPP/2"]
  broken = assembly.assemble_generation(p, "    return undefined_name;\n}\n")
  v = ex.execute([broken], progress=False)[0]
  assert v.status == "compile error" and "undefined_name" in v.reason
  # A run that loops forever times out on the run clock; its compile time is separate.
  slow = Executor(workers=1, run_timeout_s=1.5)
  looping = assembly.assemble_generation(p, "    while (true) {}\n    return 0;\n}\n")
  v = slow.execute([looping], progress=False)[0]
  assert v.status == "timed out" and v.text == "timed out"
  assert 1.4 <= v.run_s < 5 and v.compile_s > 0


def test_verdicts_are_cached_by_content(ex, probs, tmp_path):
  e = Executor(workers=1, cache_dir=tmp_path)
  prog = assembly.canonical(probs["python"]["Python/2"])
  first = e.execute([prog], progress=False)[0]
  assert first.passed and not first.cached
  files = list(tmp_path.rglob("*.json"))
  assert len(files) == 1 and json.loads(files[0].read_text())["status"] == "passed"
  again = e.execute([prog], progress=False)[0]
  assert again.passed and again.cached
  changed = Assembled(prog.language, prog.task_id, prog.source + "\nassert False\n", "")
  assert not e.execute([changed], progress=False)[0].cached


def test_identical_programs_run_once(ex, probs):
  prog = assembly.canonical(probs["js"]["JavaScript/2"])
  e = Executor(workers=2)
  calls = []
  orig = e.run_one
  e.run_one = lambda p, uid=None: calls.append(p) or orig(p, uid)
  verdicts = e.execute([prog] * 5, progress=False)
  assert [v.status for v in verdicts] == ["passed"] * 5 and len(calls) == 1


def test_missing_toolchain_is_a_skip_not_a_failure(tmp_path, probs):
  e = Executor(workers=1, toolchain_dir=tmp_path)  # no js-md5 there
  v = e.execute([assembly.canonical(probs["js"]["JavaScript/2"])], progress=False)[0]
  assert v.status == "skipped" and "js-md5" in v.reason
