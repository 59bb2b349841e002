"""geex_jax/stop_automata.py: the device stop rules fire on the token where the text rules cut."""
import jax.numpy as jnp
import pytest

from geex_jax import languages, sampling as S, stop_automata as A, stop_rules
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
    ("rust", "    let v: Vec<i32> = vec![];\n    v.iter().map(|x| { x + 1 }).sum()\n}\nfn main(){}\n"),
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
    assert S.cut_text(tok.decode(ids[:k + 1]), lang) == expected
  assert seen == {"python", "cpp", "java", "js", "go", "rust"}
