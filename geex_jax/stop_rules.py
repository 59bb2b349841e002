"""Where a code completion ends: the reference stop rules, shared by the sampler and the evaluator.

The rule of each language is the registry's `Language.stop_rule`:
  "top_level" (Python): the completion ends before its first non-empty line that does not start
    with a space or tab, i.e. the first new top-level statement (`def`, `class`, `if`, `#`,
    `print`, ... the reference's stop words are all such lines).
  "brace" (C++, Java, JavaScript, Go, Rust, ...): the prompt ends inside an open function body, so
    the completion ends right after the `}` that makes the count of `}` exceed the count of `{` by
    one. Braces are counted naively (also inside strings and comments), as the reference does.
  None: the completion is kept whole.

`truncate` is idempotent: truncating an already truncated completion returns it unchanged.
"""
from __future__ import annotations

from typing import Optional, Union

from geex_jax import languages
from geex_jax.languages import Language


def _as_language(language: Union[str, Language]) -> Language:
  return language if isinstance(language, Language) else languages.get(language)


def top_level_end(completion: str, at_line_start: bool = True) -> Optional[int]:
  """Index where the first new top-level line starts, or None when there is none.

  Args:
    completion: text generated after the prompt.
    at_line_start: whether the completion starts at the beginning of a line (HumanEval prompts end
      with a newline). When False the first line continues the prompt's last line and is kept.
  """
  pos = 0
  first = True
  while pos <= len(completion):
    nl = completion.find("\n", pos)
    line = completion[pos:] if nl < 0 else completion[pos:nl]
    if (at_line_start or not first) and line.strip() and line[0] not in " \t":
      return pos
    if nl < 0:
      return None
    pos = nl + 1
    first = False
  return None


def brace_end(completion: str) -> Optional[int]:
  """Index just after the `}` that closes the enclosing block, or None when it is never closed."""
  depth = 0
  for i, ch in enumerate(completion):
    if ch == "{":
      depth += 1
    elif ch == "}":
      depth -= 1
      if depth < 0:
        return i + 1
  return None


def is_complete(language: Union[str, Language], completion: str) -> bool:
  """Whether the stop rule already fires inside `completion` (the sampler may stop generating)."""
  rule = _as_language(language).stop_rule
  if rule == "top_level":
    return top_level_end(completion) is not None
  if rule == "brace":
    return brace_end(completion) is not None
  return False


def truncate(language: Union[str, Language], completion: str) -> str:
  """Cuts a completion where the language's stop rule ends it.

  Args:
    language: a registry name/alias/HumanEval-X key ("python", "cpp", "C++") or a Language.
    completion: the generated text that follows the prompt (prompt not included).
  Returns:
    The completion up to (excluding) the first new top-level line for Python, up to and including
    the closing `}` for brace languages, or unchanged when the rule never fires / there is no rule.
  """
  rule = _as_language(language).stop_rule
  if rule == "top_level":
    end = top_level_end(completion)
  elif rule == "brace":
    end = brace_end(completion)
  else:
    end = None
  return completion if end is None else completion[:end]
