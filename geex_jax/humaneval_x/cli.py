"""geex-eval: HumanEval-X generation / translation evaluation.

geex-eval selftest --data DIR [--languages python,cpp] [--workers N]
geex-eval execute  --samples S.jsonl --data DIR [--out DIR] [--workers N]
geex-eval generate --data DIR --out S.jsonl --checkpoint CKPT --tokenizer TOK [--n 200 ...]
geex-eval report   DIR [--budget 10,100]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from geex_jax.errors import InputError, cli_errors

PROG = "geex-eval"


def _executor(args):
  from geex_jax.humaneval_x.executor import Executor
  from geex_jax.humaneval_x.toolchains import default_toolchain_dir

  tool_dir = pathlib.Path(args.toolchain_dir) if args.toolchain_dir else default_toolchain_dir()
  cache = None if args.no_cache else (args.cache_dir or tool_dir / "results")
  if args.workers is not None and args.workers < 1:
    raise InputError("--workers must be >= 1")
  if args.memory_mb < 64:
    raise InputError("--memory-mb must be >= 64")
  return Executor(
    workers=args.workers,
    cache_dir=cache,
    toolchain_dir=tool_dir,
    run_timeout_s=args.timeout,
    compile_timeout_s=args.compile_timeout,
    memory_bytes=args.memory_mb << 20,
  )


def _add_exec_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument(
    "--workers", type=int, default=None, help="programs run in parallel (default: number of cores)"
  )
  p.add_argument(
    "--timeout",
    type=float,
    default=10.0,
    help="wall-clock limit of each program run, seconds (default: 10)",
  )
  p.add_argument(
    "--compile-timeout",
    type=float,
    default=60.0,
    help="wall-clock limit of each compilation, seconds (default: 60)",
  )
  p.add_argument(
    "--memory-mb",
    type=int,
    default=2048,
    help="data-segment limit of each program run, MiB (default: 2048)",
  )
  p.add_argument(
    "--cache-dir", default=None, help="verdict cache (default: <toolchain dir>/results)"
  )
  p.add_argument("--no-cache", action="store_true", help="neither read nor write cached verdicts")
  p.add_argument(
    "--toolchain-dir",
    default=None,
    help="js-md5, Go build cache, prebuilt Rust crates (default: $GEEX_EVAL_CACHE or "
    "~/.cache/geex-jax)",
  )
  p.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_selftest(args) -> int:
  from geex_jax.humaneval_x import evaluate, problems

  langs = problems.parse_languages(args.languages)
  ex = _executor(args)
  start = time.monotonic()
  results = evaluate.selftest(args.data, ex, langs, progress=not args.quiet, task_ids=args.tasks)
  wall = time.monotonic() - start
  status = 0
  for r in results:
    name = problems.language_of(r.language).name
    if r.skipped:
      print(f"{name:<11} skipped: {r.skipped}")
      status = max(status, 1 if args.require_toolchains else 0)
      continue
    print(f"{name:<11} {r.passed}/{r.total} passed")
    for tid, verdict in r.failures.items():
      if tid in evaluate.KNOWN_BAD:
        why = f"known bad: {evaluate.KNOWN_BAD[tid]}"
      elif tid in evaluate.NONDETERMINISTIC:
        why = f"nondeterministic: {evaluate.NONDETERMINISTIC[tid]}"
      else:
        why = "UNEXPECTED"
      print(f"    {tid}: {verdict} ({why})")
    for tid in r.unexpectedly_passing:
      print(f"    {tid}: passed, but listed as known bad")
    if not r.ok:
      status = 1
  total = sum(r.total for r in results if not r.skipped)
  passed = sum(r.passed for r in results if not r.skipped)
  print(
    f"total: {passed}/{total} passed in {wall:.1f} s with {ex.workers} workers"
    + ("" if status == 0 else "  (UNEXPECTED RESULTS)")
  )
  return status


def cmd_execute(args) -> int:
  from geex_jax.humaneval_x import evaluate, report

  out = pathlib.Path(args.out) if args.out else pathlib.Path(args.samples).with_suffix("")
  if args.out is None:
    out = out.parent / (out.name + "_eval")
  records, summary = evaluate.execute_file(
    args.samples, args.data, _executor(args), out, progress=not args.quiet
  )
  print(report.markdown(summary), end="")
  print(f"{len(records)} samples; results in {out}/results.jsonl, summary in {out}/summary.json")
  return 0


def cmd_generate(args) -> int:
  from geex_jax.humaneval_x import generate

  if args.pairs:
    jobs = generate.translation_jobs(args.data, generate.parse_pairs(args.pairs), args.tasks)
  else:
    jobs = generate.generation_jobs(args.data, args.languages, args.tasks)
  if not jobs:
    raise InputError("no problems selected")
  options = {} if args.sampler else {"dtype": args.dtype, "int8": args.int8}
  tokenizer = None if args.tokenizer == "bytes" and not args.sampler else args.tokenizer
  sampling = (args.n, args.temperature, args.top_p, args.max_new_tokens, args.batch_size)
  if args.engine:
    if args.sampler:
      raise InputError("--engine runs the built-in model; it does not take --sampler")
    if args.slots < 1 or args.chunk < 1:
      raise InputError("--slots and --chunk must be >= 1")
    engine = generate.load_engine(
      args.checkpoint,
      tokenizer,
      jobs,
      args.max_new_tokens,
      slots=args.slots,
      chunk=args.chunk,
      **options,
    )
    try:
      n = generate.generate_with_engine(engine, jobs, args.out, *sampling, progress=not args.quiet)
    finally:
      engine.stop(drain=False, timeout=60)
  else:
    complete = generate.load_sampler(args.checkpoint, tokenizer, args.sampler, **options)
    n = generate.generate(complete, jobs, args.out, *sampling, progress=not args.quiet)
  print(f"{n} new samples appended to {args.out} ({len(jobs)} prompts x {args.n})")
  return 0


def cmd_report(args) -> int:
  from geex_jax.humaneval_x import evaluate, metrics, report

  d = pathlib.Path(args.dir)
  records = evaluate.read_results(d / "results.jsonl")
  summary = evaluate.summarize(records)
  if args.budget:
    from geex_jax.humaneval_x.evaluate import _counts

    gen = [{**r, "_group": r["language"]} for r in records if not r.get("source_language")]
    counts = _counts(gen)
    weights = None
    if args.weights:
      weights = {}
      for item in args.weights.split(","):
        k, _, w = item.partition("=")
        from geex_jax.humaneval_x.problems import language_of

        try:
          weights[language_of(k).humaneval] = float(w)
        except ValueError:
          raise InputError(f"bad weight {item!r} (expected LANG=NUMBER)") from None
    alloc = {}
    for b in args.budget.split(","):
      try:
        budget = int(b)
        alloc[str(budget)] = {
          "allocation": metrics.allocate_budget(
            budget, weights or metrics.default_weights(list(counts))
          ),
          "pass_rate": metrics.budget_pass_rate(counts, budget, weights),
        }
      except ValueError as e:
        raise InputError(f"budget {b}: {e}") from None
    summary["budget_allocation"] = alloc
  written = report.write_report(d, summary)
  print(report.markdown(summary), end="")
  for b, e in summary.get("budget_allocation", {}).items():
    split = ", ".join(f"{k} {v}" for k, v in e["allocation"].items() if v)
    print(f"budget {b} ({split}): {100 * e['pass_rate']:.2f}% solved in any language")
  print("wrote " + ", ".join(p.name for p in written))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog=PROG,
    description="HumanEval-X evaluation: run programs in a sandbox and compute "
    "pass@k for Python, C++, Java, JavaScript, Go and Rust.",
  )
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

  p = sub.add_parser(
    "selftest",
    help="run every canonical solution and print pass counts",
    description="Runs every canonical solution; expects all to pass except the "
    "known-bad tasks (JavaScript/112, /155). Exit 1 on anything else.",
  )
  p.add_argument("--data", required=True, help="HumanEval-X directory (humaneval_*.jsonl.gz)")
  p.add_argument("--languages", default=None, help="comma list, e.g. python,cpp (default: all 6)")
  p.add_argument(
    "--tasks",
    default=None,
    type=lambda s: s.split(","),
    help="only these task ids, e.g. Python/0,JavaScript/112",
  )
  p.add_argument(
    "--require-toolchains",
    action="store_true",
    default=os.environ.get("GEEX_REQUIRE_TOOLCHAINS") == "1",
    help="a missing toolchain fails the self-test (default: skip it; on when "
    "GEEX_REQUIRE_TOOLCHAINS=1)",
  )
  _add_exec_flags(p)
  p.set_defaults(fn=cmd_selftest)

  p = sub.add_parser(
    "execute",
    help="score a samples JSONL",
    description="Scores samples: one JSON per line with task_id, generation and, "
    "for translation, source_language. Writes results.jsonl (a verdict per "
    "sample), summary.json, summary.md and PNG plots.",
  )
  p.add_argument("--samples", required=True, help="samples JSONL")
  p.add_argument("--data", required=True, help="HumanEval-X directory")
  p.add_argument("--out", default=None, help="output directory (default: <samples>_eval/)")
  _add_exec_flags(p)
  p.set_defaults(fn=cmd_execute)

  p = sub.add_parser(
    "generate",
    help="sample completions with a model (resumable)",
    description="Samples N completions per problem into a JSONL that `execute` "
    "scores. Rerunning with the same --out resumes.",
  )
  p.add_argument("--data", required=True, help="HumanEval-X directory")
  p.add_argument("--out", required=True, help="samples JSONL to write (appended, resumable)")
  p.add_argument("--checkpoint", required=True, help="model checkpoint directory")
  p.add_argument(
    "--tokenizer",
    required=True,
    help="directory of the released tokenizer files ('bytes': byte-level fallback)",
  )
  p.add_argument(
    "--dtype",
    default="bf16",
    choices=["fp32", "bf16"],
    help="parameter / compute dtype of the model (default: bf16)",
  )
  p.add_argument("--int8", action="store_true", help="int8 weight-only quantized linears")
  p.add_argument(
    "--sampler",
    default=None,
    help="MODULE:FUNCTION building complete(prompts, n, temperature, top_p, "
    "max_new_tokens) from checkpoint= and tokenizer= (default: "
    "geex_jax.inference.sampler.Sampler)",
  )
  p.add_argument("--languages", default=None, help="generation languages (default: all 6)")
  p.add_argument(
    "--pairs",
    default=None,
    help="translation instead of generation: 'all' or SRC:TGT,... e.g. python:cpp",
  )
  p.add_argument(
    "--tasks", default=None, type=lambda s: s.split(","), help="only these task ids (comma list)"
  )
  p.add_argument("--n", type=int, default=1, help="samples per problem (paper: 200)")
  p.add_argument("--temperature", type=float, default=0.2, help="(paper: 0.2 pass@1, 0.8 @100)")
  p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
  p.add_argument("--max-new-tokens", type=int, default=1024)
  p.add_argument(
    "--batch-size",
    type=int,
    default=8,
    help="prompts per sampler call (with --engine: per seed group and per append)",
  )
  p.add_argument(
    "--engine",
    action="store_true",
    help="continuous batching: every (problem, sample) takes a free slot as soon as one "
    "ends, instead of static batches that wait for their longest sample; same samples",
  )
  p.add_argument("--slots", type=int, default=16, help="--engine: samples decoded at once")
  p.add_argument("--chunk", type=int, default=8, help="--engine: decode steps between admissions")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  p.set_defaults(fn=cmd_generate)

  p = sub.add_parser(
    "report",
    help="print and plot a results directory",
    description="Reads DIR/results.jsonl; writes summary.json, summary.md, "
    "pass_at_k.png and (translation) translation_heatmap.png.",
  )
  p.add_argument("dir", help="directory written by `execute`")
  p.add_argument(
    "--budget",
    default=None,
    help="budget-allocation estimate (paper RQ3) for these budgets, e.g. 10,100",
  )
  p.add_argument(
    "--weights", default=None, help="LANG=WEIGHT,... for --budget (default: training-corpus shares)"
  )
  p.set_defaults(fn=cmd_report)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  with cli_errors(PROG):
    return args.fn(args)


if __name__ == "__main__":
  sys.exit(main())
