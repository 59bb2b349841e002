"""HumanEval-X problems: loading the six languages and building generation / translation prompts.

Files: `<dir>/humaneval_<key>.jsonl.gz` (or plain `.jsonl`) for key in python, cpp, java, js, go,
rust; 164 problems each, task ids `Python/0`, `CPP/0`, `Java/0`, `JavaScript/0`, `Go/0`, `Rust/0`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Iterable, Optional, Union

from geex_jax import fileio, languages
from geex_jax.errors import InputError
from geex_jax.languages import Language


@dataclasses.dataclass(frozen=True)
class Problem:
  """One HumanEval-X problem in one language (the dataset's fields, unchanged)."""

  task_id: str  # "CPP/12"
  language: str  # HumanEval-X key: "cpp"
  prompt: str  # signature + docstring (Go: with its import block)
  declaration: str  # signature without docstring (Rust: with the `use` lines)
  canonical_solution: str
  test: str
  example_test: str = ""
  extra: tuple[tuple[str, str], ...] = ()  # other fields: Go's import / test_setup, ...

  @property
  def number(self) -> int:
    """The task number shared across languages (CPP/12 and Java/12 are the same problem)."""
    return int(self.task_id.rsplit("/", 1)[1])

  def field(self, name: str, default: str = "") -> str:
    return dict(self.extra).get(name, default)


_CORE = {"task_id", "prompt", "declaration", "canonical_solution", "test", "example_test"}


def language_of(name: Union[str, Language]) -> Language:
  """The registry entry of a HumanEval-X language (accepts "cpp", "C++", "JavaScript", ...)."""
  try:
    lang = name if isinstance(name, Language) else languages.get(name)
  except languages.UnknownLanguageError as e:
    raise InputError(str(e)) from None
  if not lang.humaneval:
    keys = ", ".join(l.humaneval for l in languages.humaneval_languages())
    raise InputError(f"{lang.name} is not a HumanEval-X language (those are: {keys})")
  return lang


def parse_languages(spec: Optional[Union[str, Iterable[str]]]) -> list[str]:
  """ "python,cpp" / ["Python", "C++"] / None (all six) -> HumanEval-X keys in dataset order."""
  if spec is None:
    return [l.humaneval for l in languages.humaneval_languages()]
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  keys = [language_of(s.strip()).humaneval for s in items if s.strip()]
  if not keys:
    raise InputError("no languages given")
  return list(dict.fromkeys(keys))


def data_file(data_dir: Union[str, pathlib.Path], key: str) -> pathlib.Path:
  """The dataset file of one language; raises InputError when the directory or file is missing."""
  d = pathlib.Path(data_dir)
  if not d.is_dir():
    raise InputError(f"HumanEval-X data directory not found: {d}")
  for name in (f"humaneval_{key}.jsonl.gz", f"humaneval_{key}.jsonl"):
    if (d / name).is_file():
      return d / name
  raise InputError(f"no humaneval_{key}.jsonl.gz in {d}")


def load_language(
  data_dir: Union[str, pathlib.Path], language: Union[str, Language]
) -> dict[str, Problem]:
  """Loads one language's problems: {task_id: Problem}, in file order."""
  key = language_of(language).humaneval
  path = data_file(data_dir, key)
  out: dict[str, Problem] = {}
  for lineno, row in fileio.iter_jsonl(path):
    try:
      problem = Problem(
        task_id=row["task_id"],
        language=key,
        prompt=row["prompt"],
        declaration=row["declaration"],
        canonical_solution=row["canonical_solution"],
        test=row["test"],
        example_test=row.get("example_test") or "",
        extra=tuple(
          sorted((k, v) for k, v in row.items() if k not in _CORE and isinstance(v, str))
        ),
      )
    except (KeyError, TypeError, AttributeError) as e:
      raise InputError(f"{path}:{lineno}: malformed problem ({type(e).__name__}: {e})") from None
    out[problem.task_id] = problem
  if not out:
    raise InputError(f"{path} holds no problems")
  return out


def load(
  data_dir: Union[str, pathlib.Path], langs: Optional[Iterable[str]] = None
) -> dict[str, dict[str, Problem]]:
  """Loads several languages: {key: {task_id: Problem}} (all six when `langs` is None)."""
  return {k: load_language(data_dir, k) for k in parse_languages(langs)}


def task_language(task_id: str) -> str:
  """ "CPP/3" -> "cpp" (the task id prefix is the registry name, or CPP for C++)."""
  prefix = task_id.split("/", 1)[0]
  if "/" not in task_id:
    raise InputError(f"malformed task_id {task_id!r} (expected e.g. 'Python/0')")
  return language_of(prefix).humaneval


def task_id_for(language: str, number: int) -> str:
  """("cpp", 3) -> "CPP/3"."""
  lang = language_of(language)
  prefix = "CPP" if lang.humaneval == "cpp" else lang.name
  return f"{prefix}/{number}"


# -- prompts -----------------------------------------------------------------------------------


def problem_text(problem: Problem) -> str:
  """The code the model continues for generation (without tag): the dataset prompt.

  Rust's prompt holds only the doc comment; the signature (and the `use` lines) are in its
  declaration, so both are given.
  """
  if problem.language == "rust":
    return problem.prompt + problem.declaration
  return problem.prompt


def generation_prompt(problem: Problem) -> str:
  """Tag line + newline + the problem text, e.g. "# language: Python\\nfrom typing ..."."""
  return language_of(problem.language).tag + "\n" + problem_text(problem)


def translation_prompt(source: Problem, target: Problem) -> str:
  """The code-translation prompt: source solution in full, then the target's declaration.

  Format: "code translation\\n<Src>:\\n<src.declaration>\\n<src.solution.rstrip()>\\n<Tgt>:\\n
  <tgt.declaration>" with display names from the registry (Python, C++, Java, ...); no tag.
  """
  if source.number != target.number:
    raise InputError(
      f"translation pair of different problems: {source.task_id} -> {target.task_id}"
    )
  src, tgt = language_of(source.language), language_of(target.language)
  return (
    "code translation\n"
    + src.name
    + ":\n"
    + source.declaration
    + "\n"
    + source.canonical_solution.rstrip()
    + "\n"
    + tgt.name
    + ":\n"
    + target.declaration
  )


def translation_pairs(langs: Optional[Iterable[str]] = None) -> list[tuple[str, str]]:
  """All ordered (source, target) pairs of distinct languages: 30 for the six."""
  keys = parse_languages(langs)
  return [(s, t) for s in keys for t in keys if s != t]
