"""Prometheus metrics of `geex-serve` (GET /metrics), in a registry of their own."""

from __future__ import annotations

from prometheus_client import (
  CONTENT_TYPE_LATEST,
  CollectorRegistry,
  Counter,
  Gauge,
  Histogram,
  generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
  """Gauges read from the engine when scraped; histograms and counters fed by the routes."""

  content_type = CONTENT_TYPE_LATEST

  def __init__(self, engine):
    r = self.registry = CollectorRegistry()
    Gauge("geex_queue_depth", "Requests waiting for a slot", registry=r).set_function(
      engine.queue_depth
    )
    Gauge("geex_slots_in_use", "KV-cache slots running a sample", registry=r).set_function(
      engine.slots_in_use
    )
    Gauge("geex_slots", "KV-cache slots in the pool", registry=r).set(engine.slots)
    self.ttft = Histogram(
      "geex_time_to_first_token_seconds",
      "From a request's arrival to its first token",
      buckets=_LATENCY_BUCKETS,
      registry=r,
    )
    self.tpot = Histogram(
      "geex_time_per_output_token_seconds",
      "Decode time per output token after the first, per request",
      buckets=_PER_TOKEN_BUCKETS,
      registry=r,
    )
    self.requests = Counter(
      "geex_requests",
      "Requests answered, by route and HTTP status",
      ["route", "status"],
      registry=r,
    )
    self.prompt_tokens = Counter("geex_prompt_tokens", "Prompt tokens read", registry=r)
    self.completion_tokens = Counter(
      "geex_completion_tokens", "Completion tokens generated", registry=r
    )
    self.rejected = Counter(
      "geex_rejected", "Requests refused with 429 (waiting queue full)", registry=r
    )
    self.cancelled = Counter(
      "geex_cancelled", "Requests cancelled because the client went away", registry=r
    )

  def observe(self, handle) -> None:
    """A finished request's latencies and token counts (RequestHandle)."""
    self.prompt_tokens.inc(handle.prompt_tokens)
    self.completion_tokens.inc(handle.completion_tokens)
    if handle.ttft is not None:
      self.ttft.observe(handle.ttft)
      per_sample = handle.completion_tokens / max(handle.request.n, 1)
      if handle.finished_at is not None and per_sample > 1:
        self.tpot.observe((handle.finished_at - handle.first_token_at) / (per_sample - 1))

  def render(self) -> bytes:
    return generate_latest(self.registry)
