"""Sampling throughput: the geex-jax sampler vs a plain PyTorch KV-cache greedy loop.

CPU (the default): for each preset, random weights made by the PyTorch reference and converted
with the conversion table (the same weights on both sides), greedy decoding of `--new_tokens`
tokens after a `--prompt_len`-token prompt, end to end (prefill included), at each batch size:

  python bench/sample.py --presets tiny 350m --batch 1 32

  JAX fp32 and JAX int8 (weight-only) tokens/s, and the ratio to PyTorch fp32 measured in the
  same run (torch.no_grad, `geex_jax.conversion.torch_reference.greedy_generate`).

GPU (`--gpu`): random weights generated ON the device (no host copy), bf16 or int8:

  python bench/sample.py --gpu --preset 13b --dtype bf16 int8 --peak_bw 3.35e12

  python bench/sample.py --gpu --dtype bf16 int8 --matmul xla pallas \\
      --tilings tilings.json --trace /tmp/traces

  batch 1: ms per decoded token (the while loop alone, prefill excluded), and the fraction of
  the card's memory bandwidth it implies: bytes read per token (every weight once, embeddings
  included, except the two position tables of which one row is read; plus the KV cache) / time /
  `--peak_bw` (bytes/s: H100 SXM 3.35e12, H200 4.8e12, A100-80GB 2.04e12). Batch `--gpu_batch`
  (64): decode tokens/s. Rows per `--matmul` implementation of the blocks' linears (XLA, or the
  Pallas kernel; its tilings from `bench/decode_matmul.py --out`, `--tilings`; the kernel on bf16
  weights at batch 1 only); `--xla_options` adds bf16 batch-1 rows compiled
  with extra XLA options; `--trace` writes a profile (perfetto) of each batch-1 decode. Prints
  Markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from geex_jax.model import codegeex as M
from geex_jax.inference import quantization as Q
from geex_jax.inference import decoding as D
from geex_jax.inference.stop_automata import NO_RULE


def _best_of(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def cpu_preset(name: str, batches, prompt_len: int, new_tokens: int, repeats: int) -> list[dict]:
  import torch
  from geex_jax.conversion import table
  from geex_jax.conversion.torch_reference import CodeGeeXTorch, greedy_generate

  torch.manual_seed(0)
  cfg = M.CodeGeeXConfig.preset(name, scan_layers=False)
  ref = CodeGeeXTorch(cfg).eval()
  flat = {k: v.detach().numpy() for k, v in ref.released_state_dict().items()}
  params = table.released_to_params(flat, cfg)
  del flat
  # Unrolled layers, as the Sampler decodes (a scanned stack slices every layer's weights out
  # of the stacked arrays each step: 350m batch 1 on 2 CPUs ran at 7.6 instead of 12.0 tok/s).
  params = jax.tree.map(jnp.asarray, params)
  qparams = jax.jit(Q.quantize_params)(params)
  rows = []
  rng = np.random.RandomState(0)
  for b in batches:
    prompt = rng.randint(0, 50000, size=(b, prompt_len))
    ids = prompt.tolist()

    def jax_run(p):
      return D.generate_ids(cfg, p, ids, max_new_tokens=new_tokens, eos_id=-1)

    def torch_run():
      with torch.no_grad():
        return greedy_generate(ref, torch.from_numpy(prompt), new_tokens)

    jax_run(params), jax_run(qparams)  # compile
    out = {}

    def keep(key, fn):
      return lambda: out.__setitem__(key, fn())

    t_jax = _best_of(keep("jax", lambda: jax_run(params)), repeats)
    t_int8 = _best_of(lambda: jax_run(qparams), repeats)
    t_torch = _best_of(keep("torch", torch_run), repeats)
    same = out["jax"].tokens == out["torch"].tolist()
    n = b * new_tokens
    rows.append(
      dict(
        preset=name,
        batch=b,
        prompt=prompt_len,
        new=new_tokens,
        jax_fp32=n / t_jax,
        jax_int8=n / t_int8,
        torch_fp32=n / t_torch,
        ratio_fp32=t_torch / t_jax,
        ratio_int8=t_torch / t_int8,
        greedy_equal=same,
      )
    )
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  return rows


def weight_bytes_per_token(params) -> int:
  """Bytes of weights one decode step reads: all but the position tables (one row each)."""
  total = Q.params_bytes(params)
  for key in ("position_embeddings", "top_query_embeddings"):
    total -= Q.params_bytes(params[key])
  return total


def _decode_fn(spec, params, cache, carry, args, options):
  """D.decode_chunk, compiled with extra XLA options when given (same process, same weights)."""
  if not options:
    return lambda *xs: D.decode_chunk(spec, *xs)
  return D.decode_chunk.lower(spec, params, cache, carry, *args).compile(compiler_options=options)


def gpu_variants(
  name: str,
  dtype: str,
  peak_bw: float,
  batches,
  prompt_len: int,
  new_tokens: int,
  scan: bool = False,
  impls=("auto",),
  option_sets=(),
  trace_dir=None,
  loop_steps=(1,),
) -> list[dict]:
  """Rows for one weight set: every matmul implementation at every batch size (bf16: the kernel
  at batch 1 only). option_sets: (label, {xla option: value}) extra bf16 batch-1 variants.
  loop_steps: DecodeSpec.steps_per_loop values; those > 1 add batch-1 rows of the first impl."""
  quantize = dtype == "int8"
  compute = "bfloat16"
  cfg = M.CodeGeeXConfig.preset(name, dtype=compute, param_dtype=compute, scan_layers=scan)

  @jax.jit
  def make(key):  # random weights made on the device; the bf16 copy is freed inside the jit
    p = M.init_params(cfg, key)
    return Q.quantize_params(p) if quantize else p

  params = jax.block_until_ready(make(jax.random.key(0)))
  wbytes = weight_bytes_per_token(params)
  # bf16 "auto" is XLA unless --tilings lists the kernel for bf16 shapes: time it once.
  impls = [i for i in impls if quantize or not (i == "auto" and "xla" in impls)]
  variants = [
    (impl, {}, batches if quantize or impl == "xla" else batches[:1], 1) for impl in impls
  ]
  variants += [(impls[0], {}, (1,), k) for k in loop_steps if k > 1]
  if not quantize:
    variants += [(label, opts, (1,), 1) for label, opts in option_sets]
  rows = []
  for impl, options, bs, loop in variants:
    for b in bs:
      t_start = time.perf_counter()
      ids = np.random.RandomState(0).randint(0, 50000, size=(b, prompt_len))
      prompt, segments = D.pad_prompts(ids.tolist(), new_tokens + loop - 1, cfg.max_position, 0)
      spec = D.DecodeSpec(
        config=cfg,
        num_samples=1,
        max_new_tokens=new_tokens,
        greedy=True,
        top_k=0,
        use_top_p=False,
        eos_id=-1,
        vocab_limit=cfg.vocab_size,
        rule=NO_RULE.kind,
        quantized=quantize,
        matmul=impl if not options else "xla",
        steps_per_loop=loop,
      )
      table = jnp.asarray(NO_RULE.table)
      args = (
        jnp.asarray(prompt),
        jnp.asarray(segments),
        jnp.arange(b, dtype=jnp.int32),
        0,
        jnp.zeros((b,), jnp.int32),
        jnp.float32(1.0),
        jnp.float32(1.0),
        table,
      )
      rest = (
        jnp.int32(new_tokens),
        jnp.zeros((b,), bool),
        jnp.float32(1.0),
        jnp.float32(1.0),
        table,
      )
      try:
        cache, carry = D.prefill(spec, params, *args)
        decode = _decode_fn(spec, params, cache, carry, rest, options)
        del cache, carry
      except Exception as e:
        print(
          f"{dtype} {impl} batch {b}: FAILED {type(e).__name__}: {str(e)[:400]}",
          file=sys.stderr,
          flush=True,
        )
        continue

      def run():
        t0 = time.perf_counter()
        cache, carry = jax.block_until_ready(D.prefill(spec, params, *args))
        t1 = time.perf_counter()
        cache, carry = jax.block_until_ready(decode(params, cache, carry, *rest))
        t2 = time.perf_counter()
        assert new_tokens <= int(carry.step) < new_tokens + loop
        del cache
        return t1 - t0, t2 - t1, carry.tokens

      _, _, first = run()  # compile
      compile_s = time.perf_counter() - t_start
      timed = [run() for _ in range(3)]
      prefill_s, decode_s, tokens = min(timed, key=lambda x: x[1])
      if trace_dir is not None and b == 1 and not options and loop == 1:
        label = f"{dtype}_{impl}"
        try:
          with jax.profiler.trace(f"{trace_dir}/{label}", create_perfetto_trace=True):
            run()
        except Exception as e:
          print(f"trace {label}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
      steps = new_tokens - 1  # the first token comes from the prefill
      cache_len = prompt.shape[1] + new_tokens
      cache_bytes = 2 * (cfg.num_layers + 1) * b * cache_len * cfg.hidden_size * 2
      row = dict(
        preset=name,
        dtype=dtype,
        impl=impl if loop == 1 else f"{impl}, {loop} steps/loop",
        options=options,
        scan=scan,
        batch=b,
        prompt=prompt_len,
        new=new_tokens,
        compile_s=compile_s,
        prefill_ms=prefill_s * 1e3,
        ms_per_step=decode_s / steps * 1e3,
        tok_s=b * steps / decode_s,
        weight_gb=wbytes / 1e9,
        bw_fraction_weights=wbytes / (decode_s / steps) / peak_bw,
        bw_fraction_with_cache=(wbytes + cache_bytes) / (decode_s / steps) / peak_bw,
        tokens_head=np.asarray(tokens)[0, :8].tolist(),
        device=jax.devices()[0].device_kind,
      )
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def _option_value(text: str):
  """An XLA option's value from the command line: bool, int, float or string."""
  if text.lower() in ("true", "false"):
    return text.lower() == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.machine()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument("--presets", nargs="+", default=["tiny", "350m"])
  ap.add_argument("--batch", nargs="+", type=int, default=[1, 32])
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=64)
  ap.add_argument(
    "--new_tokens_large",
    type=int,
    default=32,
    help="new tokens for presets other than tiny (CPU time)",
  )
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--gpu", action="store_true", help="the accelerator section (see above)")
  ap.add_argument("--preset", default="13b")
  ap.add_argument("--dtype", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
  ap.add_argument("--peak_bw", type=float, default=3.35e12, help="card's peak HBM bytes/s")
  ap.add_argument("--gpu_batch", type=int, default=64)
  ap.add_argument("--gpu_new_tokens", type=int, default=128)
  ap.add_argument(
    "--scan",
    nargs="+",
    default=["false"],
    choices=["true", "false"],
    help="decode with the layers scanned (one stacked while-loop body) or unrolled",
  )
  ap.add_argument(
    "--matmul",
    nargs="+",
    default=["auto"],
    choices=["auto", "xla", "pallas"],
    help="implementations of the blocks' linears to time (geex_jax/inference/decode_matmul.py)",
  )
  ap.add_argument("--tilings", help="kernel tilings measured by bench/decode_matmul.py --out")
  ap.add_argument(
    "--xla_options",
    nargs="*",
    default=[],
    help="extra bf16 batch-1 variants, each KEY=VALUE[;KEY=VALUE] XLA options",
  )
  ap.add_argument("--trace", help="write a perfetto trace of each batch-1 decode under this dir")
  ap.add_argument(
    "--steps_per_loop",
    type=int,
    nargs="+",
    default=[1],
    help="decode steps per while iteration; values > 1 add batch-1 rows",
  )
  a = ap.parse_args(argv)

  if a.gpu:
    if a.tilings:
      sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
      import decode_matmul as kernel_bench

      kernel_bench.load_tilings(a.tilings)
    option_sets = []
    for text in a.xla_options:
      option_sets.append(
        (text, {k: _option_value(v) for k, v in (kv.split("=", 1) for kv in text.split(";"))})
      )
    rows = []
    for scan in a.scan:
      for dtype in a.dtype:
        rows += gpu_variants(
          a.preset,
          dtype,
          a.peak_bw,
          (1, a.gpu_batch),
          a.prompt_len,
          a.gpu_new_tokens,
          scan=scan == "true",
          impls=a.matmul,
          option_sets=option_sets,
          trace_dir=a.trace,
          loop_steps=a.steps_per_loop,
        )
    print(
      f"\n{rows[0]['device']}, peak {a.peak_bw / 1e12:.2f} TB/s; prompt {a.prompt_len}, "
      f"{a.gpu_new_tokens} new tokens, random weights\n"
    )
    print(
      "| preset | dtype | matmul / XLA options | layers | batch | weights GB | ms/token | "
      "tokens/s | HBM fraction (weights) | (+ KV cache) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
      layers = "scanned" if r["scan"] else "unrolled"
      print(
        f"| {r['preset']} | {r['dtype']} | {r['impl']} | {layers} | {r['batch']} | "
        f"{r['weight_gb']:.1f} | {r['ms_per_step']:.2f} | {r['tok_s']:.0f} | "
        f"{r['bw_fraction_weights']:.0%} | {r['bw_fraction_with_cache']:.0%} |"
      )
    return

  rows = []
  for name in a.presets:
    new = a.new_tokens if name == "tiny" else a.new_tokens_large
    rows += cpu_preset(name, a.batch, a.prompt_len, new, a.repeats)
  print(
    f"\n{_cpu_name()}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
    f"torch {__import__('torch').__version__} ({__import__('torch').get_num_threads()} "
    "threads)\n"
  )
  print(
    "| preset | batch | prompt + new | JAX fp32 tok/s | JAX int8 tok/s | PyTorch fp32 tok/s "
    "| fp32 ratio | int8 ratio | greedy equal |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['preset']} | {r['batch']} | {r['prompt']} + {r['new']} | {r['jax_fp32']:.1f} | "
      f"{r['jax_int8']:.1f} | {r['torch_fp32']:.1f} | {r['ratio_fp32']:.2f}x | "
      f"{r['ratio_int8']:.2f}x | {r['greedy_equal']} |"
    )


if __name__ == "__main__":
  main()
