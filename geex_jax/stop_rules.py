"""Where a code completion ends: the reference stop rules, shared by the sampler and the evaluator.

The rule of each language is the registry's `Language.stop_rule`:
  "top_level" (Python): the completion ends before its first non-empty line that does not start
    with a space or tab, i.e. the first new top-level statement (`def`, `class`, `if`, `#`,
    `print`, ... the reference's stop words are all such lines).
  "brace" (C++, Java, JavaScript, Go, Rust, ...): the prompt ends inside an open function body,
    and the function ends at the `}` that makes the count of `}` exceed the count of `{` by one
    (`brace_end`; braces counted naively, also inside strings and comments, as the reference
    does). After it the completion may go on with further complete top-level definitions, which
    are kept (helpers that the function calls: some HumanEval-X tests call them too, e.g. Rust/38
    `encode_cyclic`, Go/72 `isPalindrome`); it ends before the first top-level item that is not
    one (see "The brace rule after the function" below).
  None: the completion is kept whole.

The brace rule after the function. Between items blank space and `//` / `/* */` comments are
skipped (they stay undecided until a definition after them completes). An item is kept when it is
a definition with a body: its header (the text up to its first `{`) starts with a letter, `_` or
`$` (or a Rust `#[...]` attribute) and is either a declaration `WORDS NAME(...) ... {` with at
least one word before the name (`fn f(`, `func f(`, `function f(`, `bool f(`,
`public static int f(`, `const f = (...) => {`, `vector<int> f(`; or `func (r T) f(` with a Go
receiver), or a type definition `WORD WORD ... {` without parentheses (`struct P {`,
`pub enum E<T> {`, `type S struct {`, `impl X for Y {`), followed by its brace-balanced body and
an optional `;` right after the closing brace. It is NOT kept, and the completion ends before it,
when a word before its parameter list is `main`, a test name (`test`, `tests`, or `test`/`Test`
followed by an upper-case letter, digit or `_`: `TestX` in Go, `testX` in JavaScript,
`test_x`/`mod tests` in Rust), an attribute names one (`#[test]`, `#[cfg(test)]`), or the second
word is `if` (`else if (...) {`). Anything else ends the completion at once: a call or statement
(`console.log(f(1));`, `if (...)`, `fmt.Println(...)`), a preprocessor line (`#include`), a `}`
closing the enclosing class (Java's `class Solution`), a `;` in a header, a `{` inside its
parentheses, and so on. The cut is then right after the last kept item (or the function).

The rule is the same for every brace language: the sampler batches prompts by rule and steps one
device automaton per rule (`inference.stop_automata`), built from `_BRACE_DFA` and `brace_step`
below, so the host rule and the device rule agree exactly by construction.

`truncate(language, completion)` cuts only where the rule has decided: text after the function
that may still become a kept definition stays (like an unclosed function, it may be a completion
cut by max tokens); `truncate(..., finished=True)` is for a completion that is over (the
evaluator): it also drops that undecided tail. Both are idempotent, and `is_complete` is exactly
`truncate(...) != completion`: once the rule has fired, no continuation changes the cut, so a
sampler may stop generating there.
"""

from __future__ import annotations

import re
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
  """Index just after the `}` that closes the enclosing block (the function the prompt opens), or
  None when it is never closed. The completion may go on after it: see `brace_cut`."""
  depth = 0
  for m in _BRACES.finditer(completion):
    if m.group() == "{":
      depth += 1
    else:
      depth -= 1
      if depth < 0:
        return m.end()
  return None


# --- the brace rule after the function: a DFA over characters ------------------------------------
#
# Characters are classified by code: 0..127 as themselves, every non-ASCII character as one class
# NON_ASCII (the device automaton sees UTF-8 bytes, each >= 0x80 byte is that class; every state
# maps a run of NON_ASCII to the same state as one, so both see the same automaton).

NON_ASCII = 128
_OPEN = -1  # not a state: the header is complete and its body opens (brace depth 1)


def _build_dfa() -> tuple[list[list[int]], dict[str, int]]:
  """The top-level DFA of the brace rule: (next-state table [state][char class], state ids)."""
  names: list[str] = []
  ids: dict[str, int] = {}

  def state(name: str) -> int:
    ids[name] = len(names)
    names.append(name)
    return ids[name]

  for name in (
    "FIRED",
    "BETWEEN",
    "AFTER_ITEM",
    "SLASH",
    "LINE_COMMENT",
    "BLOCK_COMMENT",
    "BLOCK_STAR",
    "HASH",
    "ATTR_SEP",
    "SEP1",
    "SEP1F",
    "SEP2",
    "PP0",
    "PP1",
    "PP2",
    "PP3",
  ):
    state(name)
  # Word contexts: first word of a header (W1), later words before its parameter list (W2), words
  # in a Rust attribute (WA). Each tracks a few words letter by letter; "test" stands for the
  # test-name prefixes test/Test; OTHER: any other word; TNAME: a test name (test/Test + [A-Z0-9_]).
  tracked = {
    "W1": {"main": "reject", "func": "func"},
    "W2": {"main": "reject", "if": "reject"},
    "WA": {},
  }
  for ctx, words in tracked.items():
    prefixes = {w[:k] for w in list(words) + ["tests"] for k in range(1, len(w) + 1)}
    for p in sorted(prefixes, key=lambda p: (len(p), p)):
      state(f"{ctx}:{p}")
    state(f"{ctx}:OTHER")
    state(f"{ctx}:TNAME")

  fired = ids["FIRED"]

  def is_start(c: int) -> bool:
    return c < 128 and (chr(c).isalpha() or c in (0x5F, 0x24))  # letters, _ and $

  def is_word(c: int) -> bool:  # may continue a word (also digits, non-ASCII, `.` and `::`)
    return c == NON_ASCII or is_start(c) or chr(c).isdigit() or c in (0x2E, 0x3A)

  def is_space(c: int) -> bool:
    return c <= 0x20 or c == 0x7F

  def word_kind(ctx: str, name: str) -> str:
    p = name.split(":", 1)[1]
    if p == "TNAME" or p in ("test", "tests"):
      return "reject"
    return tracked[ctx].get(p, "plain")

  def word_start(ctx: str, c: int) -> int:
    if c >= 128:
      return ids[f"{ctx}:OTHER"]
    ch = "t" if chr(c) in "tT" else chr(c)
    return ids.get(f"{ctx}:{ch}", ids[f"{ctx}:OTHER"])

  def word_next(ctx: str, name: str, c: int) -> int:
    p = name.split(":", 1)[1]
    if p in ("OTHER", "TNAME"):
      return ids[name]
    ch = chr(c) if c < 128 else ""
    if ch and f"{ctx}:{p + ch}" in ids:
      return ids[f"{ctx}:{p + ch}"]
    if p == "test" and ch and (ch.isupper() or ch.isdigit() or ch == "_"):
      return ids[f"{ctx}:TNAME"]
    return ids[f"{ctx}:OTHER"]

  def nxt(name: str, c: int) -> int:
    ch = chr(c) if c < 128 else ""
    if name == "FIRED":
      return fired
    if name == "BETWEEN":
      if is_space(c):
        return ids["BETWEEN"]
      if ch == "/":
        return ids["SLASH"]
      if ch == "#":
        return ids["HASH"]
      return word_start("W1", c) if is_start(c) else fired
    if name == "AFTER_ITEM":  # right after a kept item's `}`: a `;` belongs to the item
      return ids["BETWEEN"] if ch == ";" else nxt("BETWEEN", c)
    if name == "SLASH":
      return {"/": ids["LINE_COMMENT"], "*": ids["BLOCK_COMMENT"]}.get(ch, fired)
    if name == "LINE_COMMENT":
      return ids["BETWEEN"] if ch == "\n" else ids["LINE_COMMENT"]
    if name == "BLOCK_COMMENT":
      return ids["BLOCK_STAR"] if ch == "*" else ids["BLOCK_COMMENT"]
    if name == "BLOCK_STAR":
      return {"/": ids["BETWEEN"], "*": ids["BLOCK_STAR"]}.get(ch, ids["BLOCK_COMMENT"])
    if name == "HASH":
      return ids["ATTR_SEP"] if ch == "[" else fired
    if name == "ATTR_SEP":
      if ch == "]":
        return ids["BETWEEN"]
      if ch in ("{", "}", ";"):
        return fired
      return word_start("WA", c) if is_word(c) and ch not in (".", ":") else ids["ATTR_SEP"]
    if name in ("SEP1", "SEP1F", "SEP2"):
      if ch == "(":
        return fired if name == "SEP1" else ids["PP1"]
      if ch == "{":
        return _OPEN if name == "SEP2" else fired
      if ch in ("}", ";", ")"):
        return fired
      if is_word(c) and ch not in (".", ":"):
        return word_start("W2", c)
      return ids[name]
    if name.startswith("PP"):
      depth = int(name[2])
      if ch == "(":
        return ids[f"PP{depth + 1}"] if depth < 3 else fired
      if ch == ")":
        return ids[f"PP{depth - 1}"] if depth > 0 else fired
      if ch == "{":
        return _OPEN if depth == 0 else fired
      if ch in ("}", ";"):
        return fired
      return ids[name]
    ctx = name.split(":", 1)[0]
    if is_word(c):
      return word_next(ctx, name, c)
    kind = word_kind(ctx, name)  # the word ends at c
    if kind == "reject":
      return fired
    if ctx == "WA":
      return nxt("ATTR_SEP", c)
    if ctx == "W1":
      return nxt("SEP1F" if kind == "func" else "SEP1", c)
    return nxt("SEP2", c)

  table = [[nxt(name, c) for c in range(NON_ASCII + 1)] for name in names]
  return table, ids


_BRACE_DFA, BRACE_STATES = _build_dfa()
_BETWEEN, _AFTER_ITEM, _FIRED = BRACE_STATES["BETWEEN"], BRACE_STATES["AFTER_ITEM"], 0
_BRACES = re.compile(r"[{}]")


# Encoded state of the whole brace rule, one int: >= 0 counts braces, 2 * depth + phase, phase 0
# inside the prompt's function (depth >= 0) and phase 1 inside a kept item's body (depth >= 1);
# < 0 is the top-level DFA state q as -1 - q (BRACE_FIRED = -1: the rule has fired).
BRACE_INITIAL = 0
BRACE_FIRED = -1 - _FIRED
_FUNCTION_CLOSED = -1 - _BETWEEN  # right after the function's `}` a `;` is not kept (reference)
_ITEM_CLOSED = -1 - _AFTER_ITEM
_BODY_OPEN = 3  # phase 1, depth 1


def brace_step(state: int, c: int) -> int:
  """The brace rule's next encoded state after one character of class `c` (`char_class`)."""
  if state >= 0:
    if c == 0x7B:
      return state + 2
    if c == 0x7D:
      if state == 0:
        return _FUNCTION_CLOSED
      if state == _BODY_OPEN:
        return _ITEM_CLOSED
      return state - 2
    return state
  nq = _BRACE_DFA[-1 - state][c]
  return _BODY_OPEN if nq == _OPEN else -1 - nq


def char_class(ch: str) -> int:
  """The class `brace_step` takes for a character: its code if ASCII, else NON_ASCII."""
  o = ord(ch)
  return o if o < NON_ASCII else NON_ASCII


def brace_cut(completion: str) -> tuple[Optional[int], bool]:
  """(cut, fired) of the brace rule on `completion`.

  cut: None when the function is never closed; else the index just after the function's `}` or
  after the last kept item after it (`;` included). fired: whether the rule has decided, i.e. an
  item that is not kept has begun; then no continuation of `completion` changes `cut`.
  """
  end = brace_end(completion)
  if end is None:
    return None, False
  cut, state, i, n = end, _FUNCTION_CLOSED, end, len(completion)
  table = _BRACE_DFA
  while i < n:
    if state > 0:  # inside a kept item's body: only braces matter
      depth = state >> 1
      for m in _BRACES.finditer(completion, i):
        depth += 1 if m.group() == "{" else -1
        if depth == 0:
          i = cut = m.end()
          state = _ITEM_CLOSED
          break
      else:
        return cut, False
      continue
    q = -1 - state
    ch = completion[i]
    o = ord(ch)
    nq = table[q][o if o < NON_ASCII else NON_ASCII]
    if nq == _FIRED:
      return cut, True
    if nq == _OPEN:
      state = _BODY_OPEN
    else:
      if q == _AFTER_ITEM and ch == ";":
        cut = i + 1
      state = -1 - nq
    i += 1
  return cut, False


def is_complete(language: Union[str, Language], completion: str) -> bool:
  """Whether the stop rule already fires inside `completion` (the sampler may stop generating:
  no continuation changes where `truncate` cuts)."""
  rule = _as_language(language).stop_rule
  if rule == "top_level":
    return top_level_end(completion) is not None
  if rule == "brace":
    return brace_cut(completion)[1]
  return False


def truncate(language: Union[str, Language], completion: str, finished: bool = False) -> str:
  """Cuts a completion where the language's stop rule ends it.

  Args:
    language: a registry name/alias/HumanEval-X key ("python", "cpp", "C++") or a Language.
    completion: the generated text that follows the prompt (prompt not included).
    finished: the completion is over (EOS, max tokens; the evaluator): the brace rule also drops
      text after the last complete definition that it has not decided on yet (blank lines,
      comments, an unfinished helper). Without it that text stays, so that `truncate` only cuts
      where no continuation could change the cut (what the sampler checks while generating).
  Returns:
    The completion up to (excluding) the first new top-level line for Python; up to and including
    the closing `}` of the function, or of the last helper definition after it, for brace
    languages; unchanged when the rule never fires / there is no rule.
  """
  rule = _as_language(language).stop_rule
  end = None
  if rule == "top_level":
    end = top_level_end(completion)
  elif rule == "brace":
    cut, fired = brace_cut(completion)
    if fired or finished:
      end = cut
  return completion if end is None else completion[:end]


def undecided_from(
  language: Union[str, Language], completion: str, at_line_start: bool = True
) -> Optional[int]:
  """Index from which `truncate(language, completion)` may still shrink as the completion grows,
  or None when no continuation can cut it shorter (for streaming: text before it is final).

  Brace rule: the undecided text after the last kept item (blank lines, comments, a definition
  still being written). Top-level rule: the last line while it may still become a new top-level
  line (`at_line_start` as in `top_level_end`).
  """
  rule = _as_language(language).stop_rule
  if rule == "brace":
    cut, fired = brace_cut(completion)
    return None if fired or cut is None or cut == len(completion) else cut
  if rule == "top_level":
    if top_level_end(completion, at_line_start) is not None:
      return None
    start = completion.rfind("\n") + 1
    if start == 0 and not at_line_start:
      return None
    line = completion[start:]
    return start if line and line[0] not in " \t" else None
  return None
