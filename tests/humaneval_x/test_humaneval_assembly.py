"""geex_jax/humaneval_x/assembly.py: programs are built from dataset code + cleaned completion."""

import pytest

from geex_jax.humaneval_x import assembly, problems


@pytest.fixture(scope="module")
def probs(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  return problems.load(humaneval_dir)


def test_python_program_layout(probs):
  p = probs["python"]["Python/2"]
  prog = assembly.assemble_generation(p, "    return number % 1.0\n\ndef junk():\n    pass\n")
  assert prog.completion == "    return number % 1.0\n\n"
  assert prog.source.startswith(assembly.PYTHON_HEADER + p.prompt + prog.completion)
  assert prog.source.rstrip().endswith("check(truncate_number)")
  assert "junk" not in prog.source


def test_python_numpy_only_when_mentioned(probs):
  p = probs["python"]["Python/2"]
  with_np = assembly.assemble_generation(p, "    return float(np.modf(number)[0])\n").source
  without = assembly.assemble_generation(p, "    return number % 1.0\n").source
  assert assembly.PYTHON_NUMPY in with_np and "numpy" not in without


def test_echoed_prompt_is_stripped_and_never_used(probs):
  p = probs["cpp"]["CPP/2"]
  body = "    return number-int(number);\n}\n"
  tagged = problems.generation_prompt(p)
  for echo in (tagged, p.prompt):
    assert assembly.assemble_generation(p, echo + body).completion == body.rstrip("\n")
  # A "prompt" in the sample that differs from the dataset's is not trusted: it stays part of the
  # completion (and the program is built around the dataset's prompt).
  forged = p.prompt.replace("truncate_number", "evil")
  prog = assembly.assemble_generation(p, forged + body)
  assert prog.source.count(p.prompt) == 1


def test_brace_completion_is_cut_and_java_class_closed(probs):
  p = probs["java"]["Java/2"]
  prog = assembly.assemble_generation(p, "        return number % 1.0;\n    }\n\n    junk();\n}")
  assert prog.completion == "        return number % 1.0;\n    }"
  # The class brace the stop rule cut off is restored before the test class.
  src = prog.source
  assert src.index("    }\n}\n") < src.index("public class Main")
  assert src.count("{") == src.count("}")
  # Canonical solutions already close the class: nothing is added.
  canon = assembly.canonical(p).source
  assert canon.count("{") == canon.count("}")


def test_go_imports_only_what_is_used(probs):
  p = probs["go"]["Go/0"]  # the prompt imports "math"; the test does not use it
  uses = assembly.assemble_generation(p, "    return math.Abs(threshold) < 0\n}\n").source
  unused = assembly.assemble_generation(p, "    return false\n}\n").source
  assert uses.startswith(p.field("test_setup"))
  assert '"math"' in uses and '"math"' not in unused  # Go rejects unused imports
  # The prompt's own import block is removed; a package named only in a comment is not imported.
  src = assembly.assemble_generation(
    p, "    // strings.Split is not needed\n    return false\n}\n"
  ).source
  assert '"strings"' not in src
  assert src.count("import (") == 1  # only test_setup's block
  assert "package main" in src and src.index("package main") == 0


def test_rust_program_layout(probs):
  p = probs["rust"]["Rust/2"]
  # A helper after the function is kept (tests may call it); a second `main` is cut.
  prog = assembly.assemble_generation(
    p, "    return number % 1.0;\n}\n\nfn extra() {}\n\nfn main() {}\n"
  )
  assert prog.source.startswith("fn main(){}\n" + p.prompt + p.declaration)
  assert "fn extra() {}" in prog.source
  assert prog.source.count("fn main()") == 1
  assert prog.source.rstrip().endswith(p.test.rstrip())


def test_translation_uses_target_declaration_not_prompt_text(probs):
  src, tgt = probs["python"]["Python/2"], probs["cpp"]["CPP/2"]
  tp = problems.translation_prompt(src, tgt)
  prog = assembly.assemble_translation(src, tgt, tp + "    return number-int(number);\n}\n")
  assert prog.language == "cpp" and prog.task_id == "CPP/2"
  assert "code translation" not in prog.source  # the reference pasted the prompt in
  assert "def truncate_number" not in prog.source
  assert tgt.declaration + "    return number-int(number);\n}" in prog.source


def test_canonical_keeps_helpers_after_the_function(probs):
  p = probs["go"]["Go/72"]  # its canonical solution defines a helper after the function
  assert p.canonical_solution in assembly.canonical(p).source


def test_strip_echo_prefers_longest():
  assert assembly.strip_echo("abcdef", ["ab", "abcd", ""]) == "ef"
  assert assembly.strip_echo("xyz", ["ab"]) == "xyz"
