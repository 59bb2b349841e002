"""Journey: released weights -> `geex-convert` -> `geex-serve`, called as a user would.

A tiny model in the released PyTorch layout (the project's reference, full 52224-row vocabulary)
is converted and served on a free port with the released tokenizer; the official `openai` client
then asks for completions (greedy = the PyTorch reference's greedy text, streamed = plain, n > 1,
stop strings), the CodeGeeX API route, /health, /metrics; a suffix is a 400; a client that hangs
up frees its slot; SIGTERM finishes the request in flight and exits 0.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import httpx
import openai
import pytest
import torch

from geex_jax.conversion import table
from geex_jax.conversion.torch_reference import CodeGeeXTorch, greedy_generate
from geex_jax.model.codegeex import CodeGeeXConfig
from geex_jax.tokenizer import CodeGeeXTokenizer

from journey_tools import run_ok, script

pytestmark = pytest.mark.slow

CONFIG = CodeGeeXConfig.preset("tiny", max_position=256, scan_layers=False)
PROMPT = "def fibonacci(n):\n    "
EOS = 50256
NEW = 24


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  ref = CodeGeeXTorch(CONFIG).eval()
  with torch.no_grad():  # larger weights and random biases: varied tokens
    for name, p in ref.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
      else:
        p.mul_(5.0)
  return ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference):
  root = tmp_path_factory.mktemp("serve")
  flat = {k: v.detach().clone() for k, v in reference.released_state_dict().items()}
  torch.save(table.nest_released(flat), root / "codegeex_tiny.pt")
  run_ok(
    "geex-convert", "torch-to-jax", root / "codegeex_tiny.pt", root / "ckpt", "--dtype", "fp32"
  )
  return root / "ckpt"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoint, tokenizer_dir, tmp_path_factory):
  port = _free_port()
  log = open(tmp_path_factory.mktemp("log") / "serve.log", "w+")
  proc = subprocess.Popen(
    [
      script("geex-serve"),
      "--checkpoint",
      str(checkpoint),
      "--tokenizer",
      str(tokenizer_dir),
      "--port",
      str(port),
      "--slots",
      "4",
      "--max_length",
      "256",
      "--chunk",
      "4",
      "--model_name",
      "codegeex-tiny",
    ],
    stdout=log,
    stderr=subprocess.STDOUT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  base = f"http://127.0.0.1:{port}"
  statuses = []
  deadline = time.monotonic() + 180
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      log.seek(0)
      raise AssertionError(f"geex-serve exited {proc.returncode}:\n{log.read()[-3000:]}")
    try:
      statuses.append(httpx.get(f"{base}/health", timeout=5).status_code)
      if statuses[-1] == 200:
        break
    except httpx.TransportError:
      pass
    time.sleep(0.2)
  assert statuses and statuses[-1] == 200, statuses[-5:]
  yield {"base": base, "proc": proc, "log": log, "statuses": statuses}
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0)


def _greedy_text(reference, tokenizer_dir):
  tok = CodeGeeXTokenizer.from_dir(str(tokenizer_dir))
  ids = tok.encode(PROMPT)
  out = greedy_generate(
    reference, torch.tensor([ids]), NEW, eos_id=EOS, vocab_limit=tok.vocab_size
  )[0].tolist()
  return tok.decode(out[: out.index(EOS)] if EOS in out else out)


def test_openai_client_completions(server, client, reference, tokenizer_dir):
  want = _greedy_text(reference, tokenizer_dir)
  assert want.strip(), "the reference continuation is empty: the test would prove nothing"
  assert client.models.list().data[0].id == "codegeex-tiny"
  r = client.completions.create(model="codegeex-tiny", prompt=PROMPT, max_tokens=NEW, temperature=0)
  assert r.choices[0].text == want
  assert r.usage.completion_tokens <= NEW and r.usage.prompt_tokens > 0

  streamed = client.completions.create(
    model="codegeex-tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, stream=True
  )
  pieces = [c.choices[0].text for c in streamed if c.choices]
  assert "".join(pieces) == want and len(pieces) > 1

  several = client.completions.create(
    model="codegeex-tiny", prompt=PROMPT, max_tokens=8, temperature=0.8, n=3, seed=1
  )
  assert sorted(c.index for c in several.choices) == [0, 1, 2]
  assert len({c.text for c in several.choices}) > 1

  stop = want[len(want) // 2 :][:3]
  cut = client.completions.create(
    model="codegeex-tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, stop=[stop]
  )
  assert cut.choices[0].text == want[: want.index(stop)]
  assert cut.choices[0].finish_reason == "stop"

  scored = client.completions.create(
    model="codegeex-tiny", prompt=PROMPT, max_tokens=NEW, temperature=0, logprobs=3
  )
  lp = scored.choices[0].logprobs
  assert scored.choices[0].text == want and "".join(lp.tokens) == want
  assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
  assert all(len(top) == 3 and t in top for t, top in zip(lp.tokens, lp.top_logprobs))

  with pytest.raises(openai.BadRequestError, match="infilling"):
    client.completions.create(model="codegeex-tiny", prompt=PROMPT, suffix="\n", max_tokens=4)


def test_codegeex_api_route(server):
  r = httpx.post(
    server["base"] + "/api/v2/multilingual_code_generate",
    json={"prompt": PROMPT, "n": 2, "lang": "Python", "apikey": "x", "apisecret": "y"},
    timeout=60,
  )
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["status"] == 0 and len(body["result"]["output"]["code"]) == 2


def _metric(base: str, name: str) -> float:
  text = httpx.get(base + "/metrics", timeout=5).text
  m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
  assert m, f"{name} not in /metrics"
  return float(m.group(1))


def test_disconnect_frees_the_slot_and_metrics(server):
  base = server["base"]
  body = {"prompt": PROMPT, "max_tokens": 220, "temperature": 0, "stream": True}
  with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
    assert r.status_code == 200
    next(r.iter_lines())  # the first event: the request is running; then hang up
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and _metric(base, "geex_cancelled_total") < 1:
    time.sleep(0.1)
  assert _metric(base, "geex_cancelled_total") >= 1
  while time.monotonic() < deadline and _metric(base, "geex_slots_in_use") > 0:
    time.sleep(0.1)
  assert _metric(base, "geex_slots_in_use") == 0
  assert _metric(base, "geex_time_to_first_token_seconds_count") >= 1
  assert _metric(base, "geex_completion_tokens_total") > 0
  assert _metric(base, "geex_queue_depth") == 0


def test_sigterm_drains_then_exits_zero(server):
  """Last in the module: the request in flight when SIGTERM arrives still gets its answer."""
  base, proc = server["base"], server["proc"]
  result = {}

  def ask():
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 0}
    result["r"] = httpx.post(base + "/v1/completions", json=body, timeout=120)

  t = threading.Thread(target=ask)
  t.start()
  deadline = time.monotonic() + 30
  while time.monotonic() < deadline and _metric(base, "geex_slots_in_use") == 0:
    if not t.is_alive():
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  t.join(120)
  assert proc.wait(60) == 0
  r = result["r"]
  assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
