"""The HTTP routes of `geex-serve` (FastAPI) over a continuous-batching `Engine`.

  POST /v1/completions                     OpenAI-compatible completions (SSE when stream)
  POST /api/v2/multilingual_code_generate  the CodeGeeX API shape
  GET  /v1/models                          the one model served
  GET  /health                             503 while loading / compiling, 200 once warm
  GET  /metrics                            Prometheus

Errors: 400 with one message (OpenAI's {"error": {...}} shape), 429 + Retry-After when the
waiting queue is full, 503 while not ready or shutting down. A client that disconnects cancels
its request, which frees its slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from geex_jax.errors import GeexError, InputError
from geex_jax.inference.engine import (
  Delta,
  Engine,
  Finished,
  QueueFullError,
  RequestHandle,
  ShuttingDownError,
)
from geex_jax.serving import protocol
from geex_jax.serving.metrics import ServeMetrics

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
_DISCONNECT_POLL_S = 0.25


class _Refused(Exception):
  def __init__(self, status: int, message: str, kind: str, headers: Optional[dict] = None):
    super().__init__(message)
    self.status, self.message, self.kind, self.headers = status, message, kind, headers


def _error(status: int, message: str, kind: str, headers=None) -> JSONResponse:
  body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
  return JSONResponse(body, status_code=status, headers=headers)


async def _body(request: Request):
  try:
    return json.loads(await request.body())
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise InputError("the request body is not valid JSON") from None


def create_app(engine: Engine, model_name: str, *, start_engine: bool = True) -> FastAPI:
  """The FastAPI app. start_engine: start (and warm up) the engine with the app's lifespan and
  drain it on shutdown."""
  metrics = ServeMetrics(engine)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if start_engine and engine._thread is None:
      engine.start()
    yield
    await asyncio.to_thread(engine.stop, True)

  app = FastAPI(title="geex-serve", lifespan=lifespan)

  def submit_all(requests, loop) -> list[RequestHandle]:
    if not engine.ready.is_set():
      raise _Refused(503, "the model is still loading", "unavailable", {"Retry-After": "5"})
    handles: list[RequestHandle] = []
    try:
      for r in requests:
        handles.append(engine.submit(r, loop=loop))
    except QueueFullError as e:
      for h in handles:
        h.cancel()
      metrics.rejected.inc()
      raise _Refused(429, str(e), "rate_limit", {"Retry-After": str(RETRY_AFTER_S)}) from None
    except ShuttingDownError as e:
      for h in handles:
        h.cancel()
      raise _Refused(503, str(e), "unavailable") from None
    except InputError:
      for h in handles:
        h.cancel()
      raise
    return handles

  async def collect(handles, request: Request) -> list[list[Finished]]:
    """Every sample's Finished event; cancels everything if the client goes away."""

    async def one(h):
      return [ev async for ev in h.aevents() if isinstance(ev, Finished)]

    task = asyncio.gather(*(one(h) for h in handles))
    try:
      while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
          return task.result()
        if await request.is_disconnected():
          raise asyncio.CancelledError
    except BaseException:
      task.cancel()
      _cancel(handles)
      raise

  def _cancel(handles) -> None:
    live = [h for h in handles if not h.done]
    for h in live:
      h.cancel()
    if live:
      metrics.cancelled.inc()

  def usage(handles) -> dict:
    p = sum(h.prompt_tokens for h in handles)
    c = sum(h.completion_tokens for h in handles)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

  def route(name: str):
    """Turns refusals into responses and counts every answer by status."""

    def wrap(fn):
      async def handler(request: Request):
        try:
          resp = await fn(request)
        except InputError as e:
          resp = _error(400, str(e), "invalid_request_error")
        except _Refused as e:
          resp = _error(e.status, e.message, e.kind, e.headers)
        except GeexError as e:
          resp = _error(500, str(e), "server_error")
        metrics.requests.labels(name, str(resp.status_code)).inc()
        return resp

      handler.__name__ = fn.__name__
      return handler

    return wrap

  @app.post("/v1/completions")
  @route("completions")
  async def completions(request: Request):
    call = protocol.parse_completion(await _body(request))
    handles = submit_all(call.requests, asyncio.get_running_loop())
    n = call.requests[0].n
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": model_name}
    if call.stream:
      return StreamingResponse(
        stream(handles, n, head, call.include_usage, call.echo),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
      )
    finals = await collect(handles, request)
    for h in handles:
      metrics.observe(h)
    choices = [
      {
        "index": i * n + f.index,
        "text": (h.request.prompt if call.echo else "") + f.text,
        "logprobs": f.logprobs,
        "finish_reason": f.openai_reason,
      }
      for i, (h, row) in enumerate(zip(handles, finals))
      for f in sorted(row, key=lambda f: f.index)
    ]
    return JSONResponse({**head, "choices": choices, "usage": usage(handles)})

  async def stream(handles, n: int, head: dict, include_usage: bool, echo: bool = False):
    """SSE: (with echo, each choice's prompt first) one event per text delta and per finished
    choice, then `data: [DONE]`."""
    events: asyncio.Queue = asyncio.Queue()
    if echo:
      for i, h in enumerate(handles):
        for j in range(n):
          choice = {"index": i * n + j, "text": h.request.prompt, "logprobs": None}
          yield f"data: {json.dumps({**head, 'choices': [{**choice, 'finish_reason': None}]})}\n\n"

    async def pump(i, h):
      async for ev in h.aevents():
        await events.put((i, ev))
      await events.put((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    open_ = len(handles)
    try:
      while open_:
        i, ev = await events.get()
        if ev is None:
          open_ -= 1
          continue
        index = i * n + ev.index
        if isinstance(ev, Delta):
          choice = {"index": index, "text": ev.text, "logprobs": ev.logprobs, "finish_reason": None}
        else:
          choice = {"index": index, "text": "", "logprobs": None, "finish_reason": ev.openai_reason}
        yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
      for h in handles:
        metrics.observe(h)
      if include_usage:
        yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(handles)})}\n\n"
      yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (the response task is cancelled)
      for t in tasks:
        t.cancel()
      _cancel(handles)

  @app.post("/api/v2/multilingual_code_generate")
  async def codegeex(request: Request):
    try:
      req = protocol.parse_codegeex(await _body(request))
      handles = submit_all([req], asyncio.get_running_loop())
      finals = (await collect(handles, request))[0]
    except InputError as e:
      metrics.requests.labels("codegeex", "400").inc()
      return JSONResponse({"status": 1, "message": str(e)}, status_code=400)
    except _Refused as e:
      metrics.requests.labels("codegeex", str(e.status)).inc()
      return JSONResponse({"status": 1, "message": e.message}, e.status, headers=e.headers)
    metrics.observe(handles[0])
    metrics.requests.labels("codegeex", "200").inc()
    code = [f.text for f in sorted(finals, key=lambda f: f.index)]
    result = {
      "app": "geex-serve",
      "input": {"prompt": req.prompt, "n": req.n, "lang": req.language},
      "output": {"code": code, "finish_reasons": [f.openai_reason for f in finals]},
      "model": model_name,
    }
    return JSONResponse({"status": 0, "message": "success", "result": result})

  @app.get("/v1/models")
  async def models():
    return {
      "object": "list",
      "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "geex-jax"}],
    }

  @app.get("/health")
  async def health():
    if engine.error is not None:
      return JSONResponse({"status": "failed", "error": str(engine.error)}, status_code=503)
    if not engine.ready.is_set():
      return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ok", "slots": engine.slots, "max_length": engine.max_length}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render(), media_type=metrics.content_type)

  app.state.engine = engine
  app.state.metrics = metrics
  return app
