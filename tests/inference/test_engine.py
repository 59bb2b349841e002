"""geex_jax/inference/engine.py: continuous batching gives the Sampler's tokens (greedy and
sampled, same seed), runs requests of different lengths side by side, frees cancelled slots,
refuses what does not fit, and compiles nothing per request."""

import threading
import time

import jax
import pytest

from decode_fixtures import char_sampler
from geex_jax.errors import InputError
from geex_jax.inference import engine as E
from geex_jax.inference import slot_programs as P


@pytest.fixture(scope="module")
def sampler():
  return char_sampler(seed=1, max_batch=16)


@pytest.fixture(scope="module")
def engine(sampler):
  eng = E.Engine(sampler, slots=4, max_length=64, chunk=4, max_waiting=8).start()
  assert eng.ready.wait(300) and eng.error is None
  yield eng
  eng.stop()


def _req(prompt, **kw):
  kw.setdefault("add_tag", False)
  return E.CompletionRequest(prompt, **kw)


CASES = [
  dict(greedy=True),
  dict(temperature=1.5),
  dict(temperature=0.9, top_k=3, top_p=0.8),
  dict(temperature=2.0, language="python"),
  dict(temperature=2.0, language="cpp", stop=("a\n",)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_engine_gives_the_samplers_completions(engine, sampler, case):
  """Same prompt and seed: every sample's text and finish reason equal Sampler.complete's."""
  prompt = "a(){\n" if case.get("language") == "cpp" else "a(b)\n"
  greedy = case.get("greedy", False)
  temperature = case.get("temperature", 1.0)
  want = sampler.complete_detailed(
    [prompt],
    n=5,
    greedy=greedy,
    temperature=temperature,
    top_k=case.get("top_k", 0),
    top_p=case.get("top_p", 1.0),
    language=case.get("language"),
    stop=case.get("stop", ()),
    max_new_tokens=24,
    seed=7,
    add_tag=False,
  )[0]
  got = engine.complete(_req(prompt, n=5, max_tokens=24, seed=7, **case), timeout=120)
  assert [g.index for g in got] == list(range(5))
  assert [g.text for g in got] == [w.text for w in want]
  assert [g.reason for g in got] == [w.finish_reason for w in want]
  assert len({g.text for g in got}) > 1 or greedy  # the samples really differ


def test_concurrent_requests_of_different_lengths(engine, sampler):
  """More requests than slots, prompts in two buckets, budgets from 3 to 40 tokens, all at once:
  each equals its own greedy Sampler run (the first m tokens of a 40-token greedy run), and every
  slot is free afterwards."""
  prompts = ["a", "ab(b)\n", "a" * 20 + "\n", "{" * 17, "b(\n", "ab ab\n"]
  budgets = [40, 3, 25, 12, 33, 7]
  handles = [
    engine.submit(_req(p, max_tokens=m, greedy=True, seed=i))
    for i, (p, m) in enumerate(zip(prompts, budgets))
  ]
  runs = sampler.complete_detailed(prompts, greedy=True, max_new_tokens=40, add_tag=False)
  decode = sampler.tokenizer.decode
  for p, m, h, (run,) in zip(prompts, budgets, handles, runs):
    toks = run.tokens
    if len(toks) >= m:
      want = (decode(toks[:m]), "length", m)
    else:
      want = (run.text, run.finish_reason, len(toks))
    got = h.result(timeout=120)[0]
    assert (got.text, got.reason, got.num_tokens) == want
    assert h.prompt_tokens == len(p) and h.ttft is not None
  assert engine.slots_in_use() == 0 and engine.queue_depth() == 0


def test_streamed_deltas_add_up_to_the_final_text(engine):
  h = engine.submit(_req("a(b)\n", n=2, max_tokens=30, temperature=2.0, seed=3, language="python"))
  pieces, finals = {0: [], 1: []}, {}
  for ev in h.events(timeout=120):
    if isinstance(ev, E.Delta):
      pieces[ev.index].append(ev.text)
    else:
      finals[ev.index] = ev
  for j in (0, 1):
    assert "".join(pieces[j]) == finals[j].text


def test_cancel_frees_the_slot(sampler):
  """slots=1: a long request is cancelled while running; the next one then gets the slot. A
  queued request that is cancelled never starts."""
  eng = E.Engine(sampler, slots=1, max_length=64, chunk=1).start()
  try:
    assert eng.ready.wait(300)
    long = eng.submit(_req("a", max_tokens=60, temperature=0.5, seed=1))
    queued = eng.submit(_req("b", max_tokens=60, temperature=0.5, seed=2))
    deadline = time.monotonic() + 60
    while long.first_token_at is None and time.monotonic() < deadline:
      time.sleep(0.01)
    assert eng.slots_in_use() == 1 and eng.queue_depth() == 1
    queued.cancel()
    long.cancel()
    assert long.result(60)[0].reason == "cancelled"
    assert queued.result(60)[0] == E.Finished(0, "", "cancelled", 0)
    after = eng.complete(_req("ab", max_tokens=5, greedy=True), timeout=60)[0]
    assert after.reason == "length" and after.num_tokens == 5
    assert eng.slots_in_use() == 0 and eng.stats["cancelled"] == 2
  finally:
    eng.stop()


def test_no_recompile_per_request(engine):
  """Once each bucket has run, requests with any parameters compile nothing new."""
  engine.complete(_req("a" * 20, max_tokens=2, greedy=True), timeout=60)  # bucket 32
  engine.complete(_req("a", max_tokens=2, greedy=True), timeout=60)  # bucket 16
  # P.TRACES counts the traces of every engine this process has built (other test modules build
  # some too), so only its change is asserted: none from here on.
  before = dict(P.TRACES)
  variants = [
    dict(greedy=True, max_tokens=5),
    dict(temperature=0.3, top_k=2, max_tokens=9, seed=11, n=3),
    dict(temperature=1.7, top_p=0.5, max_tokens=17, language="python", stop=("b",)),
    dict(temperature=1.0, language="java", max_tokens=4, n=2),
  ]
  threads = []
  for i, kw in enumerate(variants):
    prompt = "ab(" * (1 + 3 * i)  # 3..30 characters: both buckets
    t = threading.Thread(target=engine.complete, args=(_req(prompt, **kw), 120))
    t.start()
    threads.append(t)
  for t in threads:
    t.join(120)
  assert dict(P.TRACES) == before


def test_refusals(sampler):
  eng = E.Engine(sampler, slots=1, max_length=32, max_waiting=1)
  with pytest.raises(InputError, match="at most 31"):
    eng.submit(_req("a" * 40))
  with pytest.raises(InputError, match="top_p"):
    eng.submit(_req("a", top_p=0.0))
  with pytest.raises(InputError, match="unknown language|not.*known|language"):
    eng.submit(_req("a", language="klingon"))
  eng.submit(_req("a"))  # not started: it waits
  with pytest.raises(E.QueueFullError, match="full"):
    eng.submit(_req("b"))
  with pytest.raises(InputError, match="max_length"):
    E.Engine(sampler, max_length=65)
  eng.stop(drain=False)
  with pytest.raises(E.ShuttingDownError):
    eng.submit(_req("a"))


def test_bucket_length():
  assert [E.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65, 99)] == [
    16,
    16,
    32,
    64,
    64,
    100,
    100,
  ]


@pytest.mark.parametrize("scale", [1.0, 0.05])  # peaked (top-256 path) and flat (full sort)
def test_per_row_filters_equal_token_choice(scale):
  """Rows with their own top-k / top-p keep exactly the tokens filter_logits keeps for them."""
  import jax.numpy as jnp
  import numpy as np

  from geex_jax.inference.token_choice import filter_logits

  settings = [(0, 1.0), (5, 1.0), (0, 0.9), (40, 0.7), (300, 0.95), (0, 0.3)]
  logits = jax.random.normal(jax.random.key(0), (len(settings), 2000)) * 4.0 * scale
  top_k = jnp.array([k for k, _ in settings], jnp.int32)
  top_p = jnp.array([p for _, p in settings], jnp.float32)
  got = np.asarray(P._filter_rows(logits, top_k, top_p, jnp.ones(len(settings), bool)))
  for i, (k, p) in enumerate(settings):
    want = np.asarray(filter_logits(logits[i : i + 1], k, p, use_top_p=p < 1.0))[0]
    np.testing.assert_array_equal(np.isfinite(got[i]), np.isfinite(want))


@pytest.mark.parametrize("case", [dict(greedy=True), dict(temperature=2.0, seed=5)])
def test_logprobs_are_the_models_log_softmax(engine, sampler, case):
  """logprobs=3: each completion token's log-probability and the top 3 equal the log-softmax of
  a teacher-forced forward pass over prompt + completion (the model's own distribution, whatever
  the sampling temperature); token strings add up to the text; the streamed pieces add up to
  the final object."""
  import jax.numpy as jnp
  import numpy as np

  from geex_jax.model import codegeex as M

  prompt = "a(b)\n"
  h = engine.submit(_req(prompt, max_tokens=12, logprobs=3, **case))
  streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
  final = None
  for ev in h.events(timeout=120):
    if isinstance(ev, E.Delta) and ev.logprobs:
      for k in streamed:
        streamed[k] += ev.logprobs[k]
    elif isinstance(ev, E.Finished):
      final = ev
  lp = final.logprobs
  assert lp is not None and streamed == lp
  assert "".join(lp["tokens"]) == final.text and len(lp["tokens"]) == final.num_tokens > 0
  assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
  tok = sampler.tokenizer
  ids = tok.encode(prompt) + tok.encode(final.text)
  logits = M.CodeGeeX(sampler.config).apply({"params": sampler.params}, jnp.asarray([ids]))
  ref = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))[len(tok.encode(prompt)) - 1 : -1]
  np.testing.assert_allclose(
    lp["token_logprobs"], ref[np.arange(len(ref)), ids[len(ids) - len(ref) :]], atol=1e-4
  )
  for row, top in zip(ref, lp["top_logprobs"]):
    best = np.argsort(-row)[:3]
    assert list(top) == [tok.decode([i]) for i in best]
    np.testing.assert_allclose(list(top.values()), row[best], atol=1e-4)
  if case.get("greedy"):  # greedy picks the most likely token
    assert all(t == next(iter(top)) for t, top in zip(lp["tokens"], lp["top_logprobs"]))


def test_no_logprobs_unless_asked(engine):
  got = engine.complete(_req("a(b)\n", max_tokens=6, greedy=True), timeout=120)[0]
  assert got.logprobs is None
  with pytest.raises(InputError, match=r"logprobs must be an integer in \[0, 5\]"):
    engine.submit(_req("a", logprobs=6))


def test_on_a_mesh_the_same_tokens_and_no_recompiles(engine, sampler):
  """Weights over model=2 (as Sampler.load(mesh=...) places them): the pool's keys and values
  are split by heads, the completions equal the single-device engine's, and requests after the
  warm-up compile nothing."""
  from geex_jax.inference.sampler import Sampler
  from geex_jax.model import codegeex as M
  from geex_jax.model import partitioning

  mesh = partitioning.make_mesh(data=1, fsdp=1, model=2, devices=jax.devices()[:2])
  params = partitioning.shard_params(sampler.params, M.param_logical_specs(sampler.config), mesh)
  sharded = E.Engine(
    Sampler(sampler.config, params, sampler.tokenizer, mesh=mesh),
    slots=4,
    max_length=64,
    chunk=4,
  ).start()
  try:
    assert sharded.ready.wait(300) and sharded.error is None
    leaves = jax.tree_util.tree_leaves_with_path(sharded._cache)
    key = next(x for p, x in leaves if "cached_key" in jax.tree_util.keystr(p))
    assert "model" in str(key.sharding.spec) and len(key.sharding.device_set) == 2
    requests = [
      dict(greedy=True, max_tokens=10),
      dict(temperature=1.5, seed=3, n=3, max_tokens=12, language="python"),
    ]
    for kw in requests:  # the first round also compiles the steady-state shapes
      want = engine.complete(_req("a(b)\n", **kw), timeout=120)
      got = sharded.complete(_req("a(b)\n", **kw), timeout=120)
      assert [g.text for g in got] == [w.text for w in want]
    before = dict(P.TRACES)
    sharded.complete(_req("ab(ab(", temperature=0.7, top_k=3, seed=9, n=2, max_tokens=7), 120)
    assert dict(P.TRACES) == before
  finally:
    sharded.stop()
