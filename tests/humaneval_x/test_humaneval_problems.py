"""geex_jax/humaneval_x/problems.py: loading HumanEval-X and building prompts."""

import gzip
import json

import pytest

from geex_jax import languages
from geex_jax.errors import InputError
from geex_jax.humaneval_x import problems


@pytest.fixture(scope="module")
def probs(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  return problems.load(humaneval_dir)


def test_loads_six_languages_of_164(probs):
  assert list(probs) == ["python", "cpp", "java", "js", "go", "rust"]
  for key, by_id in probs.items():
    assert len(by_id) == 164, key
    assert {p.number for p in by_id.values()} == set(range(164))
  assert "CPP/0" in probs["cpp"] and "JavaScript/163" in probs["js"]
  assert probs["go"]["Go/0"].field("test_setup").startswith("package main")


def test_generation_prompt_has_the_registry_tag(probs):
  for key, by_id in probs.items():
    p = by_id[next(iter(by_id))]
    prompt = problems.generation_prompt(p)
    assert prompt.startswith(languages.get(key).tag + "\n")
    assert prompt.endswith(p.declaration if key == "rust" else p.prompt)


def test_translation_prompt_format(probs):
  src, tgt = probs["python"]["Python/2"], probs["cpp"]["CPP/2"]
  prompt = problems.translation_prompt(src, tgt)
  assert prompt == (
    "code translation\nPython:\n"
    + src.declaration
    + "\n"
    + src.canonical_solution.rstrip()
    + "\nC++:\n"
    + tgt.declaration
  )
  assert "language:" not in prompt  # no tag line


def test_all_thirty_translation_pairs(probs):
  pairs = problems.translation_pairs()
  assert len(pairs) == 30 and len(set(pairs)) == 30
  for s, t in pairs:
    prompt = problems.translation_prompt(
      probs[s][problems.task_id_for(s, 7)], probs[t][problems.task_id_for(t, 7)]
    )
    assert prompt.startswith(f"code translation\n{languages.get(s).name}:\n")
    assert f"\n{languages.get(t).name}:\n" in prompt


def test_translation_of_different_problems_is_refused(probs):
  with pytest.raises(InputError, match="different problems"):
    problems.translation_prompt(probs["python"]["Python/1"], probs["cpp"]["CPP/2"])


def test_task_ids_and_languages():
  assert problems.task_language("CPP/12") == "cpp"
  assert problems.task_language("JavaScript/3") == "js"
  assert problems.task_id_for("cpp", 3) == "CPP/3"
  assert problems.task_id_for("js", 3) == "JavaScript/3"
  assert problems.parse_languages("C++, python") == ["cpp", "python"]
  with pytest.raises(InputError, match="not a HumanEval-X language"):
    problems.parse_languages("shell")
  with pytest.raises(InputError, match="unknown language"):
    problems.parse_languages("cobol")
  with pytest.raises(InputError, match="malformed task_id"):
    problems.task_language("Python")


def test_missing_directory_and_file(tmp_path):
  with pytest.raises(InputError, match="directory not found"):
    problems.load_language(tmp_path / "nope", "python")
  with pytest.raises(InputError, match="no humaneval_python.jsonl.gz"):
    problems.load_language(tmp_path, "python")


def test_malformed_jsonl_names_file_and_line(tmp_path):
  good = {
    "task_id": "Python/0",
    "prompt": "p",
    "declaration": "d",
    "canonical_solution": "c",
    "test": "t",
  }
  with gzip.open(tmp_path / "humaneval_python.jsonl.gz", "wt") as f:
    f.write(json.dumps(good) + "\n{not json\n")
  with pytest.raises(InputError, match=r"humaneval_python.jsonl.gz:2: not JSON"):
    problems.load_language(tmp_path, "python")
  (tmp_path / "humaneval_python.jsonl.gz").unlink()
  (tmp_path / "humaneval_python.jsonl").write_text(json.dumps({"task_id": "Python/0"}) + "\n")
  with pytest.raises(InputError, match=r":1: malformed problem \(KeyError"):
    problems.load_language(tmp_path, "python")
