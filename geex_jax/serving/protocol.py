"""Request bodies of `geex-serve` -> engine requests, with one clear message per mistake.

Two shapes: OpenAI's `/v1/completions` (unknown fields are ignored, as OpenAI-compatible servers
do; `suffix` is refused: CodeGeeX has no infilling) and the CodeGeeX API's
`/api/v2/multilingual_code_generate` (prompt, n, lang; apikey / apisecret ignored).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from geex_jax import languages
from geex_jax.errors import InputError
from geex_jax.inference.engine import CompletionRequest
from geex_jax.inference.slot_programs import LOGPROBS

MAX_N = 64  # samples per prompt
MAX_STOP = 4  # stop strings, as OpenAI allows


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _int(body: dict, name: str, default, low: int, high: Optional[int] = None):
  x = body.get(name)
  if x is None:
    return default
  if not _is_int(x) or x < low or (high is not None and x > high):
    top = f"..{high}" if high is not None else " or more"
    raise InputError(f"'{name}' must be an integer in {low}{top}, got {x!r}")
  return x


def _float(body: dict, name: str, default: float, low: float, high: float, open_low=False):
  x = body.get(name)
  if x is None:
    return default
  ok = isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
  if not ok or x > high or x < low or (open_low and x == low):
    interval = f"{'(' if open_low else '['}{low}, {high}]"
    raise InputError(f"'{name}' must be a number in {interval}, got {x!r}")
  return float(x)


def _language(body: dict, name: str) -> Optional[str]:
  x = body.get(name)
  if x is None or x == "":
    return None
  if not isinstance(x, str):
    raise InputError(f"'{name}' must be a language name such as 'python', got {x!r}")
  try:
    return languages.get(x).name
  except languages.UnknownLanguageError as e:
    raise InputError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class CompletionCall:
  """A parsed /v1/completions body: one engine request per prompt."""

  requests: list[CompletionRequest]
  stream: bool
  include_usage: bool
  model: Optional[str]
  echo: bool = False  # each choice's text starts with its prompt (as sent, no tag line)


def parse_completion(body: Any) -> CompletionCall:
  """The OpenAI completions body -> engine requests. InputError names the bad field."""
  if not isinstance(body, dict):
    raise InputError("the request body must be a JSON object")
  if body.get("suffix") not in (None, ""):
    raise InputError("'suffix' is not supported: CodeGeeX has no infilling (fill-in-the-middle)")
  echo = body.get("echo", False)
  if not isinstance(echo, bool):
    raise InputError("'echo' must be true or false")
  logprobs = _int(body, "logprobs", None, 0, LOGPROBS)
  if logprobs is not None and echo:
    raise InputError("'logprobs' with 'echo' is not supported: prompt tokens are not scored")
  prompt = body.get("prompt")
  if isinstance(prompt, str):
    prompts = [prompt]
  elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
    prompts = prompt
  else:
    raise InputError("'prompt' must be a string or a non-empty list of strings")
  n = _int(body, "n", 1, 1, MAX_N)
  best_of = body.get("best_of")
  if best_of is not None and best_of != n:
    raise InputError("'best_of' other than n is not supported")
  stop = body.get("stop")
  if stop is None:
    stops: tuple[str, ...] = ()
  elif isinstance(stop, str):
    stops = (stop,)
  elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
    stops = tuple(stop)
  else:
    raise InputError(f"'stop' must be a string or a list of at most {MAX_STOP} strings")
  temperature = _float(body, "temperature", 1.0, 0.0, 100.0)
  options = body.get("stream_options") or {}
  model = body.get("model")
  common = dict(
    n=n,
    max_tokens=_int(body, "max_tokens", 16, 1),
    temperature=temperature,
    greedy=temperature == 0,
    top_p=_float(body, "top_p", 1.0, 0.0, 1.0, open_low=True),
    top_k=_int(body, "top_k", 0, 0),
    seed=_int(body, "seed", None, 0, 2**32 - 1),
    stop=tuple(s for s in stops if s),
    language=_language(body, "lang"),
    logprobs=logprobs,
  )
  return CompletionCall(
    requests=[CompletionRequest(p, **common) for p in prompts],
    stream=bool(body.get("stream")),
    include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
    model=model if isinstance(model, str) else None,
    echo=echo,
  )


# The CodeGeeX API's sampling defaults (its demo: temperature 0.8, top_p 0.95).
CODEGEEX_DEFAULTS = dict(temperature=0.8, top_p=0.95, top_k=0, max_tokens=128)


def parse_codegeex(body: Any) -> CompletionRequest:
  """The CodeGeeX API body {prompt, n, lang, apikey, apisecret, [temperature, top_p, top_k,
  max_tokens | max_length, seed]} -> one engine request."""
  if not isinstance(body, dict):
    raise InputError("the request body must be a JSON object")
  prompt = body.get("prompt")
  if not isinstance(prompt, str):
    raise InputError("'prompt' must be a string")
  d = CODEGEEX_DEFAULTS
  temperature = _float(body, "temperature", d["temperature"], 0.0, 100.0)
  max_tokens = _int(body, "max_tokens", None, 1)
  if max_tokens is None:
    max_tokens = _int(body, "max_length", d["max_tokens"], 1)
  return CompletionRequest(
    prompt,
    n=_int(body, "n", 1, 1, MAX_N),
    max_tokens=max_tokens,
    temperature=temperature,
    greedy=temperature == 0,
    top_p=_float(body, "top_p", d["top_p"], 0.0, 1.0, open_low=True),
    top_k=_int(body, "top_k", d["top_k"], 0),
    seed=_int(body, "seed", None, 0, 2**32 - 1),
    language=_language(body, "lang"),
  )
