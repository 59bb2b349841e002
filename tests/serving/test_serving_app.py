"""geex_jax/serving: the HTTP routes over a tiny engine (FastAPI's TestClient, no sockets):
OpenAI completions (plain, streamed, n > 1, prompt lists, stop), the CodeGeeX API route, /health,
/metrics, and the refusals (400 with one message, 429 with Retry-After)."""

import json

import pytest
from fastapi.testclient import TestClient

from geex_jax.inference import engine as E
from geex_jax.serving import protocol
from decode_fixtures import char_sampler
from geex_jax.serving.app import create_app


@pytest.fixture(scope="module")
def sampler():
  # The characters include the letters of "# language: Python" (the `lang` field's tag line).
  return char_sampler("ab \t\n{}()#:lnguePytho", seed=2)


@pytest.fixture(scope="module")
def client(sampler):
  engine = E.Engine(sampler, slots=4, max_length=64, chunk=4)
  with TestClient(create_app(engine, "tiny")) as c:  # the lifespan starts the engine
    assert engine.ready.wait(300)
    yield c


def _complete(client, **body):
  r = client.post("/v1/completions", json={"model": "tiny", **body})
  assert r.status_code == 200, r.text
  return r.json()


def test_completion_matches_the_sampler(client, sampler):
  out = _complete(client, prompt="a(b)\n", max_tokens=12, temperature=0, whatever="ignored")
  want = sampler.complete_detailed(["a(b)\n"], greedy=True, max_new_tokens=12)[0][0]
  assert out["object"] == "text_completion" and out["model"] == "tiny"
  (choice,) = out["choices"]
  assert choice["text"] == want.text and choice["index"] == 0
  assert choice["finish_reason"] == ("length" if want.finish_reason == "length" else "stop")
  n = len(want.tokens)
  assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}


def test_lists_of_prompts_and_n(client, sampler):
  out = _complete(client, prompt=["a", "b("], n=3, max_tokens=8, temperature=1.5, seed=4)
  assert [c["index"] for c in out["choices"]] == list(range(6))
  want = sampler.complete(["a"], n=3, temperature=1.5, max_new_tokens=8, seed=4)[0]
  assert [c["text"] for c in out["choices"][:3]] == want


def test_stop_strings_and_language(client, sampler):
  out = _complete(client, prompt="a(b)\n", max_tokens=30, temperature=2.0, seed=1, stop=["b"])
  for c in out["choices"]:
    assert "b" not in c["text"] and c["finish_reason"] in ("stop", "length")
  out = _complete(client, prompt="a(b)\n", max_tokens=30, temperature=2.0, seed=1, lang="python")
  want = sampler.complete(
    ["a(b)\n"], temperature=2.0, max_new_tokens=30, seed=1, language="python"
  )[0]
  assert [c["text"] for c in out["choices"]] == want


def test_streaming_is_sse_ending_with_done(client):
  body = {"prompt": "a(b)\n", "max_tokens": 20, "temperature": 1.0, "seed": 9, "n": 2}
  full = _complete(client, **body)
  with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    lines = [l for l in r.iter_lines() if l]
  assert lines[-1] == "data: [DONE]"
  texts, reasons = {0: "", 1: ""}, {}
  for line in lines[:-1]:
    assert line.startswith("data: ")
    (c,) = json.loads(line[6:])["choices"]
    texts[c["index"]] += c["text"]
    if c["finish_reason"]:
      reasons[c["index"]] = c["finish_reason"]
  assert [texts[0], texts[1]] == [c["text"] for c in full["choices"]]
  assert [reasons[0], reasons[1]] == [c["finish_reason"] for c in full["choices"]]


def test_echo_prepends_the_prompt_plain_and_streamed(client):
  body = {"prompt": ["a(b)\n", "b{"], "max_tokens": 10, "temperature": 1.0, "seed": 4, "n": 2}
  plain = [c["text"] for c in _complete(client, **body)["choices"]]
  echoed = [c["text"] for c in _complete(client, **body, echo=True)["choices"]]
  prompts = ["a(b)\n"] * 2 + ["b{"] * 2
  assert echoed == [p + t for p, t in zip(prompts, plain)]
  with client.stream("POST", "/v1/completions", json={**body, "echo": True, "stream": True}) as r:
    lines = [l for l in r.iter_lines() if l]
  texts = ["", "", "", ""]
  for line in lines[:-1]:
    (c,) = json.loads(line[6:])["choices"]
    texts[c["index"]] += c["text"]
  assert texts == echoed and lines[-1] == "data: [DONE]"


def test_logprobs_plain_and_streamed(client):
  """logprobs=2: per token its string, log-probability, the top 2 and its offset; the greedy
  token is the most likely; streamed pieces add up to the non-streamed object."""
  body = {"prompt": "a(b)\n", "max_tokens": 10, "temperature": 0, "logprobs": 2}
  (choice,) = _complete(client, **body)["choices"]
  lp = choice["logprobs"]
  assert "".join(lp["tokens"]) == choice["text"] and len(lp["tokens"]) > 0
  assert all(len(top) == 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])
  assert all(t == max(top, key=top.get) for t, top in zip(lp["tokens"], lp["top_logprobs"]))
  assert [top[t] for t, top in zip(lp["tokens"], lp["top_logprobs"])] == lp["token_logprobs"]
  with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
    lines = [l for l in r.iter_lines() if l]
  streamed = {k: [] for k in lp}
  for line in lines[:-1]:
    (c,) = json.loads(line[6:])["choices"]
    for k in streamed:
      streamed[k] += (c["logprobs"] or {}).get(k, [])
  assert streamed == lp
  assert _complete(client, prompt="a", max_tokens=3)["choices"][0]["logprobs"] is None


def test_codegeex_route(client, sampler):
  r = client.post(
    "/api/v2/multilingual_code_generate",
    json={"prompt": "a(b)\n", "n": 2, "lang": "Python", "apikey": "k", "apisecret": "s"},
  )
  assert r.status_code == 200, r.text
  out = r.json()
  assert out["status"] == 0 and len(out["result"]["output"]["code"]) == 2
  bad = client.post("/api/v2/multilingual_code_generate", json={"n": 1})
  assert bad.status_code == 400 and "prompt" in bad.json()["message"]


@pytest.mark.parametrize(
  "body,message",
  [
    ({"prompt": "a", "suffix": "b"}, "infilling"),
    ({"prompt": 3}, "'prompt' must be"),
    ({"prompt": "a", "temperature": -1}, "'temperature'"),
    ({"prompt": "a", "top_p": 0}, "'top_p'"),
    ({"prompt": "a", "n": 0}, "'n'"),
    ({"prompt": "a", "max_tokens": "5"}, "'max_tokens'"),
    ({"prompt": "a", "lang": "klingon"}, "klingon"),
    ({"prompt": "a" * 80}, "at most 63"),
    ({"prompt": "", "max_tokens": 2}, "empty prompt"),
    ({"prompt": "a", "echo": "yes"}, "'echo' must be true or false"),
    ({"prompt": "a", "logprobs": 6}, "'logprobs' must be an integer in 0..5"),
    ({"prompt": "a", "logprobs": 2, "echo": True}, "prompt tokens are not scored"),
  ],
)
def test_bad_requests_are_one_clear_400(client, body, message):
  r = client.post("/v1/completions", json=body)
  assert r.status_code == 400
  assert message in r.json()["error"]["message"]


def test_invalid_json_is_400(client):
  r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
  assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_models_health_metrics(client):
  assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
  assert client.get("/health").status_code == 200
  _complete(client, prompt="ab", max_tokens=4)
  text = client.get("/metrics").text
  for name in (
    "geex_queue_depth",
    "geex_slots_in_use 0.0",
    "geex_time_to_first_token_seconds_count",
    "geex_time_per_output_token_seconds_count",
    "geex_completion_tokens_total",
    "geex_rejected_total",
    "geex_cancelled_total",
    'geex_requests_total{route="completions",status="200"}',
  ):
    assert name in text


def test_queue_full_is_429_and_loading_is_503(sampler):
  """An engine that is not running: requests wait, so the queue fills deterministically."""
  engine = E.Engine(sampler, slots=1, max_length=64, max_waiting=1)
  with TestClient(create_app(engine, "tiny", start_engine=False)) as c:
    assert c.get("/health").status_code == 503
    assert c.post("/v1/completions", json={"prompt": "a"}).status_code == 503
    engine.ready.set()
    assert c.get("/health").status_code == 200
    engine.submit(E.CompletionRequest("a"))
    r = c.post("/v1/completions", json={"prompt": "a"})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "full" in r.json()["error"]["message"]
    assert "geex_rejected_total 1.0" in c.get("/metrics").text


def test_protocol_defaults():
  call = protocol.parse_completion({"prompt": "x", "temperature": 0, "stop": "\n\n"})
  (r,) = call.requests
  assert r.greedy and r.max_tokens == 16 and r.stop == ("\n\n",) and not call.stream
  r = protocol.parse_codegeex({"prompt": "x", "lang": "cpp"})
  assert r.language == "C++" and r.temperature == 0.8 and r.top_p == 0.95
