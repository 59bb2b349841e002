"""geex_jax/stop_rules.py: the reference stop rules the sampler and evaluator share."""

import gzip
import json

import pytest

from geex_jax import stop_rules


@pytest.mark.parametrize(
  "completion, expected",
  [
    ("    return x\n\ndef other():\n    pass\n", "    return x\n\n"),
    ("    return x\n# comment\n", "    return x\n"),
    ("    return x\nprint(f(1))\n", "    return x\n"),
    ("    return x\nif __name__ == '__main__':\n", "    return x\n"),
    ("    if a:\n\treturn 1\n    return 2\n", "    if a:\n\treturn 1\n    return 2\n"),
    ("    return x\n\n\n   \n", "    return x\n\n\n   \n"),  # blank lines never stop
    ("def f():\n", ""),  # top level at once: empty body
  ],
)
def test_python_cuts_at_first_top_level_line(completion, expected):
  assert stop_rules.truncate("python", completion) == expected
  assert stop_rules.truncate("Python", expected) == expected  # idempotent


def test_python_first_line_may_continue_the_prompt():
  assert stop_rules.top_level_end("x + 1\ny = 2\n", at_line_start=False) == 6
  assert stop_rules.top_level_end("x + 1\n", at_line_start=False) is None


@pytest.mark.parametrize("lang", ["cpp", "C++", "java", "js", "go", "rust"])
def test_brace_languages_cut_after_the_closing_brace(lang):
  body = "    if (a) {\n        return 1;\n    }\n    return 2;\n}"
  assert stop_rules.truncate(lang, body + "\n\nint main() { return 0; }\n") == body
  assert stop_rules.truncate(lang, body) == body
  # Never closed (cut by max tokens): kept whole.
  assert stop_rules.truncate(lang, "    while (1) {\n") == "    while (1) {\n"


def test_braces_are_counted_naively_like_the_reference():
  # A brace inside a string counts too (documented behaviour of the reference).
  assert stop_rules.truncate("cpp", '    return "}";\n}\n') == '    return "}'


def test_is_complete_and_languages_without_rule():
  # Right after the function's brace a helper may still follow: not complete yet (before issue 13
  # "  return 1\n}\n" counted as complete, which cut off every helper definition).
  assert not stop_rules.is_complete("go", "  return 1\n}\n")
  assert stop_rules.is_complete("go", "  return 1\n}\n\nfunc main() {")
  assert stop_rules.is_complete("go", "  return 1\n}\n}")
  assert not stop_rules.is_complete("go", "  return 1\n")
  assert not stop_rules.is_complete("python", "    return 1\n")
  assert stop_rules.truncate("shell", "echo }\n}\n") == "echo }\n}\n"  # no stop rule


# --- the brace rule after the function: helpers kept, anything else cut -------------------------

FN = "    return helper(x);\n}\n"  # the function the prompt opens, closed

# (language, text after FN): complete definitions only, all kept.
HELPERS = [
  ("rust", "\nfn helper(x: i32) -> i32 {\n    if x > 0 { x } else { -x }\n}\n"),
  ("rust", "\npub fn helper<'a>(s: &'a str) -> &'a str {\n    s\n}\n"),
  (
    "rust",
    "\n#[derive(Debug, PartialEq)]\npub enum E<S> {\n    A(S),\n}\n\nimpl<S> E<S> {\n"
    "    fn f(&self) {}\n}\n",
  ),
  ("go", "\nfunc helper(arr []int) bool {\n\treturn len(arr) > 0\n}\n"),
  (
    "go",
    "\n// helper reports ...\ntype pair struct {\n\ta, b int\n}\n\n"
    "func (p *pair) sum() (int, error) {\n\treturn p.a + p.b, nil\n}\n",
  ),
  ("js", "\nfunction helper(x) {\n  return {a: x};\n}\n"),
  ("js", "\nconst helper = (x) => {\n  return x;\n};\n"),
  ("cpp", "\nbool helper(vector<int> v) {\n    return v.empty();\n}\n"),
  (
    "cpp",
    "\ntemplate <typename T>\nstd::vector<T> helper(const T& x) {\n    return {x};\n}\n"
    "struct P {\n    int a;\n};\n",
  ),
  ("java", "\n    private static boolean helper(int[] a) {\n        return a.length > 0;\n    }\n"),
]


@pytest.mark.parametrize("lang, after", HELPERS)
def test_brace_rule_keeps_helper_definitions_after_the_function(lang, after):
  text = FN + after
  want = text.rstrip()
  assert stop_rules.truncate(lang, text, finished=True) == want
  assert stop_rules.truncate(lang, text) == text  # nothing decided yet: kept whole
  assert not stop_rules.is_complete(lang, text)
  # Whatever comes next that is not a definition ends it right after the last helper.
  for junk in (
    "\nint main() {\n    return 0;\n}\n",
    "\nfn main() {}\n",
    "\nfunc main() {\n}\n",
    "\n}\n",
    "\nconsole.log(helper(1));\n",
    "\n#[cfg(test)]\nmod tests {\n}\n",
  ):
    assert stop_rules.truncate(lang, text + junk) == want, junk
    assert stop_rules.is_complete(lang, text + junk)


@pytest.mark.parametrize(
  "after",
  [
    "\nint main() {\n    assert(f(1) == 2);\n}\n",  # a duplicate main
    "\n    public static void main(String[] args) {\n    }\n",
    "\nfn main() {\n}\n",
    "\nfunc main() {\n}\n",
    "\nfunc TestF(t *testing.T) {\n}\n",  # Go test function
    "\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\n",
    "\n#[test]\nfn test_f() {\n}\n",
    "\nmod tests {\n}\n",
    "\nconst testF = () => {\n  console.assert(f(1) === 2);\n}\ntestF();\n",
    "\nconsole.log(f(1));\n",  # statements, calls
    "\nfmt.Println(f(1))\n",
    "\nif (f(1) != 2) {\n}\n",
    "\nelse if (x) {\n}\n",
    "\nelse {\n}\n",
    "\nf(1);\n",
    "\n#include <cassert>\nint g() { return 1; }\n",  # preprocessor lines
    "\n#undef NDEBUG\n",
    "\n}\n\npublic class Main {\n}\n",  # closes the enclosing class
    "\nint x = 5;\nint g() { return x; }\n",  # a `;` in a header
    "\nfunction g(opts = {}) {\n}\n",  # `{` inside the parameters
    "\n```\n",
    "\n// tests\n123\n",
    "\n\u00e9t\u00e9() {}\n",
  ],
)
def test_brace_rule_cuts_main_tests_and_anything_else_after_the_function(after):
  for lang in ("cpp", "java", "js", "go", "rust"):
    text = FN + after
    assert stop_rules.truncate(lang, text) == FN.rstrip("\n"), (lang, after)
    assert stop_rules.truncate(lang, text, finished=True) == FN.rstrip("\n")
    assert stop_rules.is_complete(lang, text)


def test_brace_rule_cut_after_helper_and_its_semicolon():
  text = FN + "\nstruct P { int a; };\n\nint main() {}\n"
  assert stop_rules.truncate("cpp", text) == FN + "\nstruct P { int a; };"
  # Right after the function itself a `;` is not kept (the reference cuts at the brace).
  assert stop_rules.truncate("js", "  return 1;\n};\nconsole.log(1);\n") == "  return 1;\n}"
  # Comments between definitions are skipped; one right before the cut is not kept.
  text = FN + "\n// helper\n/* { */\nfn h() {}\n// then main\nfn main() {}\n"
  assert stop_rules.truncate("rust", text) == FN + "\n// helper\n/* { */\nfn h() {}"


def test_brace_rule_finished_drops_an_unfinished_tail():
  # Cut by max tokens in the middle of a helper: the sampler keeps it (the rule has not decided),
  # the evaluator drops it (it cannot compile).
  text = FN + "\nfn helper(x: i32) -> i32 {\n    if x > 0 {"
  assert stop_rules.truncate("rust", text) == text
  assert stop_rules.truncate("rust", text, finished=True) == FN.rstrip("\n")
  assert stop_rules.truncate("rust", FN, finished=True) == FN.rstrip("\n")
  never_closed = "    let x = {"
  assert stop_rules.truncate("rust", never_closed, finished=True) == never_closed
  assert stop_rules.truncate("python", "    return 1\n\n", finished=True) == "    return 1\n\n"


@pytest.mark.parametrize(
  "text",
  [FN, FN + "\n", FN + "\nfn h() {}\n\nfn main() {}"]
  + [FN + a for _, a in HELPERS]
  + [FN + "\n}\nfn h() {}\n}"],
)
def test_truncate_is_idempotent_and_stable_once_complete(text):
  for lang in ("cpp", "rust", "go"):
    for finished in (False, True):
      once = stop_rules.truncate(lang, text, finished=finished)
      assert stop_rules.truncate(lang, once, finished=finished) == once
    if stop_rules.is_complete(lang, text):
      for more in ("\nfn h() {}", "}", "\n"):
        assert stop_rules.truncate(lang, text + more) == stop_rules.truncate(lang, text)


def test_undecided_from_marks_what_may_still_be_cut():
  assert stop_rules.undecided_from("go", "  return 1\n") is None  # not closed yet
  assert stop_rules.undecided_from("go", FN) == FN.index("}") + 1  # the "\n" after it
  assert stop_rules.undecided_from("go", FN.rstrip("\n")) is None
  assert stop_rules.undecided_from("go", FN + "\nfunc main() {") is None  # decided
  helper = FN + "\nfunc h() {}\n"
  assert stop_rules.undecided_from("go", helper + "\nfu") == len(helper) - 1
  assert stop_rules.undecided_from("python", "    x = 1\n    y") is None
  assert stop_rules.undecided_from("python", "    x = 1\ny") is None  # decided
  assert stop_rules.undecided_from("python", "    x = 1\n\r") == len("    x = 1\n")
  assert stop_rules.undecided_from("python", "y = 2", at_line_start=False) is None


def test_non_ascii_is_one_class_in_every_state():
  # The device automaton sees UTF-8 bytes (and U+FFFD for split characters): a run of non-ASCII
  # characters must act like one.
  for row in stop_rules._BRACE_DFA:
    nxt = row[stop_rules.NON_ASCII]
    if nxt >= 0:
      assert stop_rules._BRACE_DFA[nxt][stop_rules.NON_ASCII] == nxt


# --- the dataset's canonical solutions pass through the rule -----------------------------------

# What the rule may cut off a canonical solution: the `}` closing Java's class Solution (assembly
# puts it back) and CPP/94's trailing "#undef NDEBUG / #include<assert.h>" (its test repeats them).
ALLOWED_CUTS = {"java": {"}"}, "cpp": {"#undef NDEBUG\n#include<assert.h>"}}


def test_canonical_solutions_are_not_cut_by_the_stop_rule(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  cut = {}
  for key in ("python", "cpp", "java", "js", "go", "rust"):
    with gzip.open(humaneval_dir / f"humaneval_{key}.jsonl.gz", "rt") as f:
      rows = [json.loads(line) for line in f]
    assert len(rows) == 164
    for row in rows:
      sol = row["canonical_solution"]
      kept = stop_rules.truncate(key, sol, finished=True)
      assert sol.startswith(kept) and stop_rules.truncate(key, sol).startswith(kept)
      rest = sol[len(kept) :].strip()
      if rest:
        assert rest in ALLOWED_CUTS.get(key, set()), (row["task_id"], rest[:200])
        assert rest.splitlines()[0] in row["test"] or key == "java"
        cut[row["task_id"]] = rest
  assert sum(t.startswith("Java/") for t in cut) == 164 and set(cut) - {
    f"Java/{i}" for i in range(164)
  } == {"CPP/94"}
