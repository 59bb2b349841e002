"""geex_jax/stop_rules.py: the reference stop rules the sampler and evaluator share."""
import pytest

from geex_jax import stop_rules


@pytest.mark.parametrize("completion, expected", [
    ("    return x\n\ndef other():\n    pass\n", "    return x\n\n"),
    ("    return x\n# comment\n", "    return x\n"),
    ("    return x\nprint(f(1))\n", "    return x\n"),
    ("    return x\nif __name__ == '__main__':\n", "    return x\n"),
    ("    if a:\n\treturn 1\n    return 2\n", "    if a:\n\treturn 1\n    return 2\n"),
    ("    return x\n\n\n   \n", "    return x\n\n\n   \n"),   # blank lines never stop
    ("def f():\n", ""),                                        # top level at once: empty body
])
def test_python_cuts_at_first_top_level_line(completion, expected):
  assert stop_rules.truncate("python", completion) == expected
  assert stop_rules.truncate("Python", expected) == expected   # idempotent


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
  assert stop_rules.is_complete("go", "  return 1\n}\n")
  assert not stop_rules.is_complete("go", "  return 1\n")
  assert not stop_rules.is_complete("python", "    return 1\n")
  assert stop_rules.truncate("shell", "echo }\n}\n") == "echo }\n}\n"   # no stop rule
