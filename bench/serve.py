"""Serving throughput: the continuous-batching engine vs the static-batch Sampler on the same
requests, measured in the same run.

Workload (--workload humaneval, the default): --requests HumanEval-X generation prompts drawn at
random (seeded) from --languages, each request's token budget = the token count of its task's
canonical solution (capped at --max_new), EOS ignored (as vLLM's benchmarks do): every request
produces exactly its budget, so both modes do the same useful work. --workload random: random
prompts of 4..40 words and budgets uniform in [--min_new, --max_new]. Random weights of a preset,
the CodeGeeX tokenizer from --tokenizer (the byte-level one with --tokenizer bytes). Greedy.

  JAX_PLATFORMS=cpu python bench/serve.py --slots 8 --requests 64

  static: the Sampler over the requests in arrival order, --slots prompts per batch; a batch
    decodes until its longest budget (max_new_tokens = the batch's largest), and only each row's
    own budget counts as tokens (what a static-batch evaluator gets). latency = t0 -> the end of
    the request's batch.
  engine offline: every request submitted at t0, the engine keeps its slots full.
  engine, C clients: a closed loop; each client submits its next request when its last one ends.
    tokens/s = completion tokens / wall time; TTFT = arrival -> first token (mean, p90).
Every mode runs once to compile (all prompt buckets and batch shapes) and is then timed. Prints
one JSON line per row, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geex_jax import tokenizer as tok_lib
from geex_jax.humaneval_x import problems as problems_lib
from geex_jax.inference import engine as E
from geex_jax.inference.sampler import Sampler
from geex_jax.model import codegeex as M

# The data that is not ours to commit: ../shared beside the checkout (as the tests look), or
# $GEEX_SHARED; --data / --tokenizer override.
SHARED = os.environ.get("GEEX_SHARED", "../shared")
DATA = os.path.join(SHARED, "humaneval_x")
TOKENIZER = os.path.join(SHARED, "codegeex_tokenizer")


class NoEos:
  """A tokenizer whose EOS id never matches (-1): completions run to their budget."""

  eos_id = -1

  def __init__(self, inner):
    self.inner = inner
    self.vocab_size = inner.vocab_size

  def encode(self, text):
    return self.inner.encode(text)

  def decode(self, ids):
    return self.inner.decode(ids)


def random_workload(n: int, min_new: int, max_new: int, seed: int):
  rng = np.random.RandomState(seed)
  words = ["def", "return", "x", "for", "in", "range", "(", ")", ":", "\n", "    ", "+", "1"]
  prompts = ["".join(rng.choice(words, size=rng.randint(4, 40))) for _ in range(n)]
  budgets = rng.randint(min_new, max_new + 1, size=n).tolist()
  return prompts, budgets


def humaneval_workload(tokenizer, data, languages, n: int, max_new: int, seed: int):
  """n (prompt, canonical-solution token count) pairs drawn without replacement."""
  probs = problems_lib.load(data, languages)
  tasks = [p for k in probs for p in probs[k].values()]
  pick = np.random.RandomState(seed).permutation(len(tasks))[:n]
  prompts = [problems_lib.generation_prompt(tasks[i]) for i in pick]
  budgets = [max(1, min(max_new, len(tokenizer.encode(tasks[i].canonical_solution)))) for i in pick]
  return prompts, budgets


def run_static(sampler: Sampler, prompts, budgets, batch: int) -> dict:
  t0 = time.perf_counter()
  tokens, decoded, latencies = 0, 0, []
  for i in range(0, len(prompts), batch):
    group, want = prompts[i : i + batch], budgets[i : i + batch]
    out = sampler.complete_detailed(group, greedy=True, max_new_tokens=max(want))
    tokens += sum(min(len(row[0].tokens), m) for row, m in zip(out, want))
    decoded += len(group) * max(want)
    latencies += [time.perf_counter() - t0] * len(group)
  wall = time.perf_counter() - t0
  return {
    "tokens": tokens,
    "decoded": decoded,
    "wall_s": wall,
    "latency_mean_s": float(np.mean(latencies)),
  }


def run_offline(engine: E.Engine, prompts, budgets) -> dict:
  chunks0 = engine.stats["chunks"]
  t0 = time.perf_counter()
  handles = [
    engine.submit(E.CompletionRequest(p, max_tokens=m, greedy=True))
    for p, m in zip(prompts, budgets)
  ]
  done = [h.result(timeout=3600)[0] for h in handles]
  wall = time.perf_counter() - t0
  ttfts = [h.ttft for h in handles if h.ttft is not None]
  steps = (engine.stats["chunks"] - chunks0) * engine.spec.chunk  # an upper bound (early exits)
  return {
    "tokens": sum(f.num_tokens for f in done),
    "decoded": steps * engine.slots,
    "wall_s": wall,
    "ttft_mean_s": float(np.mean(ttfts)),
    "ttft_p90_s": float(np.percentile(ttfts, 90)),
    "latency_mean_s": float(np.mean([h.finished_at - h.submitted for h in handles])),
  }


def run_engine(engine: E.Engine, prompts, budgets, concurrency: int) -> dict:
  work = list(zip(prompts, budgets))
  lock = threading.Lock()
  ttfts, latencies, tokens = [], [], [0]

  def client():
    while True:
      with lock:
        if not work:
          return
        prompt, m = work.pop(0)
      h = engine.submit(E.CompletionRequest(prompt, max_tokens=m, greedy=True))
      (f,) = h.result(timeout=3600)
      with lock:
        tokens[0] += f.num_tokens
        ttfts.append(h.ttft if h.ttft is not None else float("nan"))
        latencies.append(h.finished_at - h.submitted)

  t0 = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(concurrency)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - t0
  return {
    "tokens": tokens[0],
    "wall_s": wall,
    "ttft_mean_s": float(np.nanmean(ttfts)),
    "ttft_p90_s": float(np.nanpercentile(ttfts, 90)),
    "latency_mean_s": float(np.mean(latencies)),
  }


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--preset", default="tiny")
  p.add_argument("--max_position", type=int, default=2048)
  p.add_argument("--workload", choices=["humaneval", "random"], default="humaneval")
  p.add_argument("--data", default=DATA, help="HumanEval-X directory (--workload humaneval)")
  p.add_argument("--languages", default=None, help="comma list (default: all 6)")
  p.add_argument("--tokenizer", default=TOKENIZER, help="tokenizer directory, or 'bytes'")
  p.add_argument("--slots", type=int, default=8, help="engine slots = static batch size")
  p.add_argument("--chunk", type=int, default=8)
  p.add_argument("--concurrency", type=int, nargs="*", default=[])
  p.add_argument("--requests", type=int, default=64)
  p.add_argument("--min_new", type=int, default=16, help="--workload random")
  p.add_argument("--max_new", type=int, default=1024)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)

  tokenizer = NoEos(tok_lib.load_tokenizer(None if a.tokenizer == "bytes" else a.tokenizer))
  if a.workload == "humaneval":
    prompts, budgets = humaneval_workload(
      tokenizer, a.data, a.languages, a.requests, a.max_new, a.seed
    )
  else:
    prompts, budgets = random_workload(a.requests, a.min_new, a.max_new, a.seed)
  cfg = M.CodeGeeXConfig.preset(
    a.preset, max_position=a.max_position, scan_layers=False, vocab_size=52224
  )
  params = M.init_params(cfg, jax.random.key(a.seed))
  sampler = Sampler(cfg, params, tokenizer, max_batch=a.slots)
  lengths = [len(tokenizer.encode(x)) for x in prompts]
  max_length = min(a.max_position, max(lengths) + max(budgets))
  rows = []

  run_static(sampler, prompts, budgets, a.slots)  # compile every batch shape
  s = run_static(sampler, prompts, budgets, a.slots)
  rows.append({"mode": "static", "concurrency": a.slots, **s})

  engine = E.Engine(
    sampler, slots=a.slots, max_length=max_length, chunk=a.chunk, max_waiting=a.requests + 1
  )
  engine.start()
  engine.ready.wait()
  run_offline(engine, prompts, budgets)  # compile every bucket
  rows.append(
    {"mode": "engine offline", "concurrency": a.requests, **run_offline(engine, prompts, budgets)}
  )
  for c in a.concurrency:
    rows.append({"mode": "engine", "concurrency": c, **run_engine(engine, prompts, budgets, c)})
  engine.stop()

  base = rows[0]["tokens"] / rows[0]["wall_s"]
  for r in rows:
    r["tokens_per_s"] = r["tokens"] / r["wall_s"]
    r["speedup"] = r["tokens_per_s"] / base
    print(json.dumps({"preset": a.preset, "slots": a.slots, "backend": jax.default_backend(), **r}))
  print(
    f"\n{a.preset}, {a.slots} slots, chunk {a.chunk}, {a.requests} {a.workload} requests: "
    f"prompts {min(lengths)}..{max(lengths)} tokens (mean {np.mean(lengths):.0f}), budgets "
    f"{min(budgets)}..{max(budgets)} (mean {np.mean(budgets):.0f}), engine max_length "
    f"{max_length}; static decodes {rows[0]['decoded']} tokens for {rows[0]['tokens']} useful"
  )
  print(
    "| mode | clients | tokens/s | vs static | mean TTFT (s) | p90 TTFT (s) | mean latency (s) |"
  )
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    ttft = f"{r['ttft_mean_s']:.3f}" if "ttft_mean_s" in r else "-"
    p90 = f"{r['ttft_p90_s']:.3f}" if "ttft_p90_s" in r else "-"
    print(
      f"| {r['mode']} | {r['concurrency']} | {r['tokens_per_s']:.0f} | {r['speedup']:.2f}x | "
      f"{ttft} | {p90} | {r['latency_mean_s']:.2f} |"
    )


if __name__ == "__main__":
  main()
