"""geex_jax/inference/sampler.py: the Sampler's stop rules and stop strings, streaming, loading a
checkpoint (fp32, bf16 + int8), steps per loop."""

import jax.numpy as jnp
import pytest

import decode_fixtures
from geex_jax.inference import sampler as S


@pytest.fixture(scope="module")
def char_sampler():
  return decode_fixtures.char_sampler(seed=1, max_batch=16)


@pytest.mark.parametrize(
  "language,prompt", [("python", "a(b)\n"), ("cpp", "a(){\n"), ("python", "ab ")]
)
def test_sampler_stops_exactly_where_the_text_rules_say(char_sampler, language, prompt):
  """Same seed with and without the rule: the ruled completion is the free one, cut."""
  kw = dict(n=16, temperature=2.0, max_new_tokens=40, seed=3, add_tag=False)
  free = char_sampler.complete_detailed([prompt], **kw)[0]
  ruled = char_sampler.complete_detailed([prompt], language=language, **kw)[0]
  at_start = prompt.endswith("\n")
  fired = 0
  for f, r in zip(free, ruled):
    assert r.text == S.cut_text(f.text, language, (), at_start, finished=True)
    if r.finish_reason == "stop_rule":
      fired += 1
      assert len(r.tokens) <= len(f.tokens) and r.tokens == f.tokens[: len(r.tokens)]
  assert fired >= 1  # the rule really fired on the device
  stopped = char_sampler.complete_detailed([prompt], stop=["a\n", ")("], **kw)[0]
  for f, s in zip(free, stopped):
    assert s.text == S.cut_text(f.text, None, ["a\n", ")("])


def test_streaming_writes_the_final_text(char_sampler):
  pieces = []
  c = char_sampler.stream(
    "a(b)\n",
    pieces.append,
    temperature=1.0,
    max_new_tokens=40,
    seed=3,
    language="python",
    add_tag=False,
    stop=["(b"],
    chunk_size=2,
  )
  assert "".join(pieces) == c.text
  assert len(pieces) >= 1
  batch = char_sampler.complete_detailed(
    ["a(b)\n"],
    n=1,
    temperature=1.0,
    max_new_tokens=40,
    seed=3,
    language="python",
    add_tag=False,
    stop=["(b"],
  )
  assert batch[0][0].text == c.text


def test_sampler_passes_steps_per_loop(char_sampler):
  kw = dict(
    n=4, temperature=1.0, max_new_tokens=30, seed=3, language="python", add_tag=False, stop=["(b"]
  )
  base = char_sampler.complete_detailed(["a(b)\n"], **kw)[0]
  fast = S.Sampler(
    char_sampler.config, char_sampler.params, char_sampler.tokenizer, steps_per_loop=4
  ).complete_detailed(["a(b)\n"], **kw)[0]
  assert [c.text for c in fast] == [c.text for c in base]
  assert [c.finish_reason for c in fast] == [c.finish_reason for c in base]


# --- checkpoints ---------------------------------------------------------------------------------


def test_sampler_load_and_complete(checkpoint):
  s = S.Sampler.load(checkpoint, None)  # byte tokenizer: ids < 257
  out = s.complete(
    ["def f(x):\n", "x = 1\n"],
    n=2,
    temperature=0.8,
    top_p=0.95,
    max_new_tokens=6,
    language="python",
    seed=0,
  )
  assert len(out) == 2 and all(len(r) == 2 for r in out)
  assert all(isinstance(t, str) for r in out for t in r)
  # bf16 + int8 load and run too.
  s8 = S.Sampler.load(checkpoint, None, dtype="bf16", int8=True)
  # Restored with the layers unrolled for decoding (see Sampler.load).
  assert s8.params["layers_0"]["attention"]["query"]["kernel_q"].dtype == jnp.int8
  assert len(s8.complete(["x = "], n=1, max_new_tokens=4)[0]) == 1
