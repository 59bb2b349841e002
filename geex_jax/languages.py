"""The language registry: every language fact the project uses, in one table.

The data pipeline (file detection, tag lines, mixture rates), the sampler (prompt tags, stop rules)
and the HumanEval-X evaluator (dataset keys, program names) all read this table; nothing else
hard-codes a language.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


class UnknownLanguageError(ValueError):
  """A language name that is not in the registry."""


@dataclasses.dataclass(frozen=True)
class Language:
  """Facts about one programming language.

  Attributes:
    name: canonical name, as in the CodeGeeX tag line ("C++", "Python").
    extensions: file suffixes (lower case, with the dot) that identify a source file.
    tag: the exact tag line CodeGeeX prepends to every sample (no trailing newline).
    line_comment: the line-comment prefix, or None.
    block_comment: (open, close) of a block comment, or None.
    stop_rule: how a code completion ends: "top_level" (a new unindented line, Python), "brace"
      (the closing brace of the function), or None (only EOS / max tokens / user stop strings).
    corpus_share: share of the CodeGeeX training corpus in percent (paper §5); 0 when unreported.
    humaneval: the HumanEval-X dataset key ("cpp", "js", ...) or None.
    aliases: other names a user may type (lower case).
  """

  name: str
  extensions: tuple[str, ...]
  tag: str
  line_comment: Optional[str]
  block_comment: Optional[tuple[str, str]]
  stop_rule: Optional[str] = None
  corpus_share: float = 0.0
  humaneval: Optional[str] = None
  aliases: tuple[str, ...] = ()

  @property
  def slug(self) -> str:
    """A name usable in file names and seqio task names ("cpp", "objective_cpp", "csharp")."""
    return (
      self.name.lower()
      .replace("++", "pp")
      .replace("#", "sharp")
      .replace("-", "_")
      .replace(" ", "_")
    )


_C = ("//", ("/*", "*/"))
_HASH = ("#", None)

# name, extensions, tag, (line comment, block comment), stop rule, corpus share %, HumanEval-X key,
# aliases. Shares: paper §5; the 13 "other" languages share 3.10% and are listed with 0.0 here (the
# mixture gives them an equal split of that remainder, see geex_jax.data.mixture).
LANGUAGES: tuple[Language, ...] = (
  Language(
    "C++",
    (".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx", ".h++", ".c++"),
    "// language: C++",
    *_C,
    "brace",
    28.5,
    "cpp",
    ("cpp", "c++", "cxx"),
  ),
  Language(
    "Python", (".py",), "# language: Python", *_HASH, "top_level", 26.67, "python", ("python", "py")
  ),
  Language("Java", (".java",), "// language: Java", *_C, "brace", 15.98, "java", ("java",)),
  Language(
    "JavaScript",
    (".js", ".mjs", ".cjs"),
    "// language: JavaScript",
    *_C,
    "brace",
    7.13,
    "js",
    ("javascript", "js", "node"),
  ),
  Language("C", (".c", ".h"), "// language: C", *_C, "brace", 6.72, None, ("c",)),
  Language("Go", (".go",), "// language: Go", *_C, "brace", 4.71, "go", ("go", "golang")),
  Language("HTML", (".html", ".htm"), "<!--language: HTML-->", None, ("<!--", "-->"), None, 3.11),
  Language(
    "Shell",
    (".sh", ".bash"),
    "# language: Shell",
    *_HASH,
    None,
    1.73,
    None,
    ("shell", "sh", "bash"),
  ),
  Language("PHP", (".php",), "// language: PHP", *_C, "brace", 1.37),
  Language("CSS", (".css",), "/* language: CSS */", None, ("/*", "*/"), None, 0.99),
  Language("C#", (".cs",), "// language: C#", *_C, "brace", 0.0, None, ("csharp", "c#", "cs")),
  Language("Cuda", (".cu", ".cuh"), "// language: Cuda", *_C, "brace", 0.0, None, ("cuda",)),
  Language(
    "Objective-C",
    (".m",),
    "// language: Objective-C",
    *_C,
    "brace",
    0.0,
    None,
    ("objective-c", "objc"),
  ),
  Language(
    "Objective-C++",
    (".mm",),
    "// language: Objective-C++",
    *_C,
    "brace",
    0.0,
    None,
    ("objective-c++", "objcpp"),
  ),
  Language("Scala", (".scala",), "// language: Scala", *_C, "brace", 0.0),
  Language("TeX", (".tex",), "% language: TeX", "%", None, None, 0.0),
  Language(
    "TypeScript",
    (".ts", ".tsx"),
    "// language: TypeScript",
    *_C,
    "brace",
    0.0,
    None,
    ("typescript", "ts"),
  ),
  Language("Rust", (".rs",), "// language: Rust", *_C, "brace", 0.0, "rust", ("rust", "rs")),
  Language("SQL", (".sql",), "-- language: SQL", "--", ("/*", "*/"), None, 0.0),
  Language("Kotlin", (".kt", ".kts"), "// language: Kotlin", *_C, "brace", 0.0),
  Language("Pascal", (".pas", ".pp"), "// language: Pascal", "//", ("{", "}"), None, 0.0),
  Language("R", (".r",), "# language: R", *_HASH, None, 0.0),
  Language(
    "Fortran", (".f", ".f90", ".f95", ".f03", ".for"), "!language: Fortran", "!", None, None, 0.0
  ),
  # Tagged by the release beyond the paper's 23.
  Language("Lean", (".lean",), "-- language: Lean", "--", ("/-", "-/"), None, 0.0),
  Language("Ruby", (".rb",), "# language: Ruby", *_HASH, None, 0.0),
  Language("Lua", (".lua",), "-- language: Lua", "--", ("--[[", "]]"), None, 0.0),
  Language("Dart", (".dart",), "// language: Dart", *_C, "brace", 0.0),
  Language("Perl", (".pl", ".pm"), "# language: Perl", *_HASH, None, 0.0),
  Language("Haskell", (".hs",), "-- language: Haskell", "--", ("{-", "-}"), None, 0.0),
  Language("Julia", (".jl",), "# language: Julia", *_HASH, None, 0.0),
)

# The paper's 23 training languages (the rest are tagged by the release only).
PAPER_LANGUAGES: tuple[str, ...] = tuple(l.name for l in LANGUAGES[:23])

_BY_KEY: dict[str, Language] = {}
for _lang in LANGUAGES:
  for _key in {_lang.name.lower(), _lang.slug, *(_a.lower() for _a in _lang.aliases)}:
    _BY_KEY.setdefault(_key, _lang)
  if _lang.humaneval:
    _BY_KEY.setdefault(_lang.humaneval, _lang)

_BY_EXTENSION: dict[str, Language] = {}
for _lang in LANGUAGES:
  for _ext in _lang.extensions:
    # ".h" is claimed by C first; C++ headers use .hpp/.hh.
    _BY_EXTENSION.setdefault(_ext, _lang)


def get(name: str) -> Language:
  """Looks a language up by name, slug, alias or HumanEval-X key (case-insensitive)."""
  try:
    return _BY_KEY[name.strip().lower()]
  except KeyError:
    known = ", ".join(l.name for l in LANGUAGES)
    raise UnknownLanguageError(f"unknown language {name!r}; known: {known}") from None


def from_path(path: str) -> Optional[Language]:
  """The language of a source file, by its suffix; None when not a known source file."""
  dot = path.rfind(".")
  if dot < 0:
    return None
  return _BY_EXTENSION.get(path[dot:].lower())


def humaneval_languages() -> tuple[Language, ...]:
  """The six HumanEval-X languages, in the dataset's order."""
  order = ("python", "cpp", "java", "js", "go", "rust")
  return tuple(get(k) for k in order)
