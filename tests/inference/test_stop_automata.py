"""inference/stop_automata.py: the device stop rules fire on the token where the text rules cut."""

import gzip
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax import languages, stop_rules
from geex_jax.inference import sampler as S
from geex_jax.inference import stop_automata as A
from geex_jax.tokenizer import ByteTokenizer

# Crafted completions: (language, completion). Each has text after the point where the reference
# rule cuts; the sampler must stop on exactly the token that contains that point.
CRAFTED = [
  ("python", "    x = {'a': 1}\n\n    return x  \n# done\nprint(f())\n"),
  ("python", "    if a:\n\treturn b\n\n\ndef g():\n    pass\n"),
  ("cpp", "    int s = 0;\n    for (int i : v) { s += i; }\n    return s;\n}\nint main() {}\n"),
  ("java", "        return a.stream().map(x -> { return x; }).count();\n    }\n}\n"),
  ("js", "  const o = {a: {b: 1}};\n  return o.a.b;\n};\nconsole.log(1);\n"),
  ("go", "\tm := map[string]int{}\n\treturn len(m)\n}\n\nfunc main() {}\n"),
  (
    "rust",
    "    let v: Vec<i32> = vec![];\n    v.iter().map(|x| { x + 1 }).sum()\n}\nfn main(){}\n",
  ),
  # Helper definitions after the function are kept; the rule fires on what follows them.
  (
    "go",
    "\treturn isP(q)\n}\n\n// isP ...\nfunc isP(q []int) bool {\n\treturn true\n}\n"
    "\nfunc TestX(t *testing.T) {}\n",
  ),
  (
    "rust",
    "    s.len()\n}\n\n#[derive(Debug)]\npub enum E { A(), B(i32) }\n\n"
    "fn h(a: &dyn Any) -> f64 {\n    0.0\n}\n\n#[cfg(test)]\nmod tests {}\n",
  ),
  (
    "cpp",
    "    return h(v);\n}\nstruct P { int a; };\nbool h(vector<int> v) {\n    return 1;\n}\n"
    "#undef NDEBUG\n",
  ),
  ("js", "  return h(x);\n}\nconst h = (x) => {\n  return x;\n};\nconst testF = () => {}\n"),
  (
    "java",
    "        return h(a);\n    }\n    private int h(int a) {\n        return a;\n    }\n}\n",
  ),
]


def _fire_index(tables, ids, at_line_start=True):
  state = jnp.asarray([A.rule_initial_state(tables.kind, at_line_start)])
  for k, t in enumerate(ids):
    state, fired = A.rule_step(tables.kind, jnp.asarray(tables.table), state, jnp.asarray([t]))
    if bool(fired[0]):
      return k
  return None


@pytest.fixture(scope="module")
def codegeex_tokenizer(tokenizer_dir):
  from geex_jax.tokenizer import load_tokenizer

  if not (tokenizer_dir / "vocab.json").is_file():
    pytest.skip("released tokenizer files not found")
  return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("which", ["bytes", "codegeex"])
def test_device_stop_rules_cut_where_the_reference_does(which, request):
  tok = ByteTokenizer() if which == "bytes" else request.getfixturevalue("codegeex_tokenizer")
  seen = set()
  for lang, completion in CRAFTED:
    language = languages.get(lang)
    seen.add(language.humaneval)
    tables = A.rule_tables(tok, language.stop_rule, tok.vocab_size)
    ids = tok.encode(completion)
    expected = stop_rules.truncate(language, completion)
    assert expected != completion
    k = _fire_index(tables, ids)
    assert k is not None, lang
    # Fires on the token that completes the rule: not before, and the cut lies inside it.
    assert stop_rules.truncate(language, tok.decode(ids[:k])) == tok.decode(ids[:k])
    assert S.cut_text(tok.decode(ids[: k + 1]), lang) == expected
  assert seen == {"python", "cpp", "java", "js", "go", "rust"}


def _first_fired(tables, rows):
  """Per row of token ids: the index of the token on which the device rule fires, or None."""
  width = max(len(r) for r in rows)
  ids = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    ids[i, : len(r)] = r
  table = jnp.asarray(tables.table)

  def body(state, tok):
    state, fired = A.rule_step(tables.kind, table, state, tok)
    return state, fired

  init = jnp.full((len(rows),), A.rule_initial_state(tables.kind, True), jnp.int32)
  _, fired = jax.jit(lambda s, t: jax.lax.scan(body, s, t))(init, jnp.asarray(ids.T))
  fired = np.asarray(fired).T
  out = []
  for i, r in enumerate(rows):
    hits = np.flatnonzero(fired[i, : len(r)])
    out.append(int(hits[0]) if len(hits) else None)
  return out


def _host_first_complete(tok, ids):
  for k in range(len(ids)):
    if stop_rules.is_complete("cpp", tok.decode(ids[: k + 1])):
      return k
  return None


# Pieces random completions are made of: braces, words the rule looks at, comments, attributes,
# non-ASCII text; so that the rule's top level is reached and left in every way.
ATOMS = [
  "{",
  "}",
  "(",
  ")",
  ";",
  " ",
  "\n",
  "\t",
  "fn ",
  "func ",
  "main",
  "test",
  "Test_x",
  "tests",
  "if ",
  "int ",
  "f",
  "x",
  "=>",
  "//",
  "/*",
  "*/",
  "#[",
  "]",
  "cfg(test)",
  "derive(Debug)",
  "#include",
  "struct ",
  "\u00e9",
  "\u4e2d\u6587",
  ".",
  ":",
  ",",
  "<",
  ">",
  "*",
  "=",
  '"',
  "'",
  "0",
  "a",
  "const ",
  "console.log",
  "else ",
  "}\n\nfn h() {",
]


@pytest.mark.parametrize("which", ["bytes", "codegeex"])
def test_brace_automaton_fires_exactly_where_is_complete_first_holds(which, request):
  tok = ByteTokenizer() if which == "bytes" else request.getfixturevalue("codegeex_tokenizer")
  tables = A.rule_tables(tok, "brace", tok.vocab_size)
  rng = random.Random(13)
  texts = [
    rng.choice(["", "x}", "  return 1;\n}\n"])
    + "".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 30)))
    for _ in range(400)
  ]
  rows = [tok.encode(t) for t in texts]
  device = _first_fired(tables, rows)
  host = [_host_first_complete(tok, r) for r in rows]
  assert device == host
  assert sum(k is not None for k in device) > 100  # the rule really fired, often


def test_brace_automaton_on_canonical_solutions(codegeex_tokenizer, humaneval_dir):
  """Real tokens of real code (helpers after the function included): device == host."""
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  tok = codegeex_tokenizer
  tables = A.rule_tables(tok, "brace", tok.vocab_size)
  texts = []
  for key in ("cpp", "java", "js", "go", "rust"):
    with gzip.open(humaneval_dir / f"humaneval_{key}.jsonl.gz", "rt") as f:
      for line in f:
        sol = json.loads(line)["canonical_solution"]
        texts += [sol, sol + "\nint main() {}\n"]
  rows = [tok.encode(t) for t in texts]
  device = _first_fired(tables, rows)
  for text, ids, k in zip(texts, rows, device):
    if k is None:
      assert not stop_rules.is_complete("cpp", text), text[-200:]
    else:
      assert not stop_rules.is_complete("cpp", tok.decode(ids[:k]))
      assert stop_rules.is_complete("cpp", tok.decode(ids[: k + 1]))


def test_brace_table_is_compact():
  tables = A.rule_tables(ByteTokenizer(), "brace", 300)
  assert tables.table.dtype == np.int16 and tables.table.shape[0] == 300
