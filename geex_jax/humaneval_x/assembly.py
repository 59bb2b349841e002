"""Program assembly: dataset prompt (or declaration) + cleaned completion + the dataset's test.

The code around the completion always comes from the DATASET, never from text in the samples
file: an echoed prompt at the start of a generation is stripped, then the completion is cut by the
language's stop rule (`geex_jax.stop_rules.truncate`, as a finished completion: helper definitions
after the function are kept, an unfinished tail after them is not).

  generation:  <header> + problem_text(problem) + completion + test
  translation: <header> + target.declaration + completion + test   (the TARGET language's program)

Headers per language: Python helper imports; C++ standard includes; Go `test_setup` plus the std
imports the code uses (Go rejects unused imports) with the prompt's own import block removed; Rust
`fn main(){}` (tests are compiled with `rustc --test`). Java gets the class-closing `}` appended
when the completion closed only the method (the brace stop rule ends there).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from geex_jax import stop_rules
from geex_jax.humaneval_x import problems as problems_lib
from geex_jax.humaneval_x.problems import Problem

# Imports the reference harness makes available to every Python program.
PYTHON_HEADER = (
  "import math\nimport re\nimport sys\nimport copy\nimport datetime\nimport itertools\n"
  "import collections\nimport heapq\nimport statistics\nimport functools\nimport hashlib\n"
  "import string\nfrom typing import *\nfrom collections import *\n"
)
# The reference also imports numpy (as numpy and np); importing it takes longer than most tests
# run, so it is imported only into programs that mention it (no other program can tell).
PYTHON_NUMPY = "import numpy\nimport numpy as np\n"

# Standard headers a C++ completion may rely on without including them (include guards make
# repeats harmless). Kept to the common ones: each header costs compile time.
CPP_HEADER = (
  "".join(
    f"#include<{h}>\n"
    for h in (
      "stdlib.h",
      "stdio.h",
      "math.h",
      "string.h",
      "algorithm",
      "climits",
      "cmath",
      "cstdlib",
      "cstring",
      "iostream",
      "map",
      "numeric",
      "queue",
      "set",
      "sstream",
      "stack",
      "string",
      "unordered_map",
      "unordered_set",
      "vector",
    )
  )
  + "using namespace std;\n"
)

# Std packages a Go completion may use, by the identifier it is referred to with.
GO_PACKAGES = {
  "math": "math",
  "strings": "strings",
  "strconv": "strconv",
  "sort": "sort",
  "fmt": "fmt",
  "bytes": "bytes",
  "regexp": "regexp",
  "unicode": "unicode",
  "utf8": "unicode/utf8",
  "rand": "math/rand",
  "big": "math/big",
  "bits": "math/bits",
  "md5": "crypto/md5",
  "hex": "encoding/hex",
  "time": "time",
  "heap": "container/heap",
  "list": "container/list",
  "reflect": "reflect",
  "errors": "errors",
  "cmplx": "math/cmplx",
}

_GO_IMPORT_BLOCK = re.compile(r'^import\s*(\([^)]*\)|"[^"\n]*")[ \t]*\n?', re.M)
# Comments, strings and runes, removed before looking for package uses.
_GO_NOISE = re.compile(
  r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|`[^`]*`|\'(?:\\.|[^\'\\\n])*\'', re.S
)


@dataclasses.dataclass(frozen=True)
class Assembled:
  """A program ready for the executor."""

  language: str  # HumanEval-X key of the program ("java")
  task_id: str  # the target problem ("Java/3")
  source: str  # the whole program text
  completion: str  # the cleaned completion that went into it


def strip_echo(completion: str, candidates: list[str]) -> str:
  """Removes the longest candidate prompt that the completion starts with (models may echo it)."""
  for cand in sorted((c for c in candidates if c), key=len, reverse=True):
    if completion.startswith(cand):
      return completion[len(cand) :]
  return completion


def clean(problem: Problem, completion: str, source: Optional[Problem] = None) -> str:
  """Echo-stripped, stop-rule-truncated completion for `problem` (source given: translation)."""
  if source is None:
    cands = [
      problems_lib.generation_prompt(problem),
      problems_lib.problem_text(problem),
      problem.prompt,
    ]
  else:
    cands = [problems_lib.translation_prompt(source, problem), problem.declaration]
  return stop_rules.truncate(problem.language, strip_echo(completion, cands), finished=True)


def _go_imports(code: str, already: str) -> str:
  """An import block with the std packages `code` refers to that `already` does not import."""
  bare = _GO_NOISE.sub(" ", code)
  have = set(re.findall(r'"([^"]+)"', already))
  need = []
  for ident, path in GO_PACKAGES.items():
    if path not in have and re.search(r"(?<![\w.])" + ident + r"\.\w", bare):
      need.append(path)
  if not need:
    return ""
  return "import (\n" + "".join(f'    "{p}"\n' for p in sorted(set(need))) + ")\n"


def _java_close_class(code: str) -> str:
  """Appends the `}` of class Solution when the completion ended with the method's brace."""
  if code.count("{") - code.count("}") == 1:
    return code + "\n}\n"
  return code


def build(problem: Problem, body: str, completion: str) -> str:
  """The full program for `problem` from the dataset `body` (prompt or declaration) + completion."""
  lang = problem.language
  code = body + completion
  if lang == "python":
    header = PYTHON_HEADER
    if re.search(r"\b(np|numpy)\b", code + problem.test):
      header += PYTHON_NUMPY
    return header + code + "\n\n" + problem.test + "\n"
  if lang == "cpp":
    return CPP_HEADER + code + "\n" + problem.test + "\n"
  if lang == "java":
    return _java_close_class(code) + "\n" + problem.test + "\n"
  if lang == "js":
    return code + "\n" + problem.test + "\n"
  if lang == "go":
    setup = problem.field("test_setup") or "package main\n\nimport (\n    \"testing\"\n)\n"
    code = _GO_IMPORT_BLOCK.sub("", code)
    return setup + _go_imports(code + problem.test, setup) + code + "\n" + problem.test + "\n"
  if lang == "rust":
    return "fn main(){}\n" + code + "\n" + problem.test + "\n"
  raise ValueError(f"no assembly for language {lang!r}")


def assemble_generation(problem: Problem, generation: str) -> Assembled:
  """Program for a generation sample: dataset prompt + cleaned completion + test."""
  completion = clean(problem, generation)
  return Assembled(
    problem.language,
    problem.task_id,
    build(problem, problems_lib.problem_text(problem), completion),
    completion,
  )


def assemble_translation(source: Problem, target: Problem, generation: str) -> Assembled:
  """Program for a translation sample: the TARGET's declaration + cleaned completion + test."""
  completion = clean(target, generation, source=source)
  return Assembled(
    target.language, target.task_id, build(target, target.declaration, completion), completion
  )


def canonical(problem: Problem) -> Assembled:
  """The canonical solution's program (the self-test), exactly as the dataset has it.

  Not cut by the stop rule (the self-test checks the data): some canonical solutions define
  helper functions after the target function (Go/72, Rust/10, ...); the stop rule keeps those
  too (tests/journeys/test_canonical_as_samples.py runs them through `clean`).
  """
  sol = problem.canonical_solution
  return Assembled(
    problem.language, problem.task_id, build(problem, problems_lib.problem_text(problem), sol), sol
  )
