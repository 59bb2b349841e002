"""`geex-sample`: complete code with a geex-jax checkpoint (a thin wrapper over the Sampler).

  geex-sample --checkpoint DIR --tokenizer DIR (--prompt TEXT | --prompt_file F | --tasks JSONL)
      [--language NAME] [--greedy | --temperature T --top_k K --top_p P | --beam N]
      [--max_new_tokens N] [--num_samples N] [--seed S] [--dtype fp32|bf16] [--int8]
      [--output JSONL]

Without --output the completion text alone goes to stdout (streamed for a single prompt and
sample); several completions are separated by a line `<|endoftext|>`. With --output one JSON
object per completion: task_id, prompt_index, sample_index, completion, finish_reason, num_tokens
(+ score for beam search). Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

from geex_jax import fileio
from geex_jax.errors import InputError, cli_errors

PROG = "geex-sample"
SEPARATOR = "<|endoftext|>"


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line, exit 2 (argparse's default also prints the usage)
    print(f"{self.prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description="Sample code completions from a geex-jax checkpoint.")
  p.add_argument(
    "--checkpoint",
    required=True,
    help="geex-jax checkpoint: converted (config.json + params/) or a training run",
  )
  p.add_argument(
    "--tokenizer",
    required=True,
    help="directory of the released tokenizer files ('bytes': byte-level fallback)",
  )
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="one prompt")
  src.add_argument(
    "--prompt_file",
    help="a text file of prompts, separated by lines "
    f"'{SEPARATOR}' (a file without one is a single prompt)",
  )
  src.add_argument(
    "--tasks",
    help="JSONL (or .jsonl.gz) of tasks with 'prompt' (+ 'task_id', "
    "'language'), e.g. a HumanEval-X file",
  )
  p.add_argument("--language", help="prepend this language's tag line and apply its stop rule")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
  mode.add_argument("--beam", type=int, metavar="N", help="beam search with N beams")
  p.add_argument("--temperature", type=float, help="sampling temperature (> 0; 0 = greedy)")
  p.add_argument("--top_k", type=int, default=0, help="keep the K most likely tokens (0: off)")
  p.add_argument("--top_p", type=float, default=1.0, help="nucleus mass in (0, 1] (1: off)")
  p.add_argument(
    "--length_penalty", type=float, default=1.0, help="beam search: score = log p / length ** alpha"
  )
  p.add_argument("--max_new_tokens", type=int, default=256)
  p.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
  p.add_argument("--int8", action="store_true", help="INT8 weight-only quantization")
  p.add_argument(
    "--model_parallel",
    type=int,
    default=1,
    help="shard the weights over this many devices (tensor parallel)",
  )
  p.add_argument("--max_batch", type=int, default=32, help="decode rows per batch")
  p.add_argument("--no_tag", action="store_true", help="do not prepend the language tag line")
  p.add_argument("--output", help="write JSONL records here instead of text to stdout")
  return p


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read {path}: {e.strerror}") from None
  except UnicodeDecodeError:
    raise InputError(f"{path} is not UTF-8 text") from None


def read_tasks(path: str, language: Optional[str]) -> list[dict]:
  """Tasks of a JSONL file: dicts with prompt, task_id, language (from the line, --language, or
  the task id's prefix such as 'CPP/3')."""
  from geex_jax import languages

  tasks = []
  for n, obj in fileio.iter_jsonl(path):
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
      raise InputError(f"{path}:{n}: expected an object with a string 'prompt'")
    task_id = str(obj.get("task_id", len(tasks)))
    lang = obj.get("language") or language
    if lang is None and "/" in task_id:
      try:
        lang = languages.get(task_id.split("/", 1)[0]).name
      except languages.UnknownLanguageError:
        lang = None
    tasks.append({"task_id": task_id, "prompt": obj["prompt"], "language": lang})
  if not tasks:
    raise InputError(f"{path} holds no tasks")
  return tasks


def _check_args(a) -> None:
  from geex_jax import languages
  from geex_jax.inference import token_choice

  if a.beam is not None and (a.temperature is not None or a.top_k or a.top_p != 1.0):
    raise InputError("--beam cannot be combined with --temperature/--top_k/--top_p")
  if a.greedy and (a.temperature is not None or a.top_k or a.top_p != 1.0):
    raise InputError("--greedy cannot be combined with --temperature/--top_k/--top_p")
  token_choice.validate_sampling(
    1.0 if a.temperature is None else a.temperature,
    a.top_k,
    a.top_p,
    beam=a.beam,
    max_new_tokens=a.max_new_tokens,
    num_samples=a.num_samples,
  )
  if a.beam is not None and a.num_samples > a.beam:
    raise InputError(f"--num_samples {a.num_samples} exceeds --beam {a.beam}")
  if a.language is not None:
    try:
      languages.get(a.language)
    except languages.UnknownLanguageError as e:
      raise InputError(str(e)) from None
  if a.model_parallel < 1 or a.max_batch < 1:
    raise InputError("--model_parallel and --max_batch must be >= 1")
  token_choice.seed_value(a.seed)
  from geex_jax import fileio

  if not fileio.as_path(a.checkpoint).exists():  # a local path or gs://
    raise InputError(f"checkpoint not found: {a.checkpoint}")
  if a.tokenizer != "bytes" and not fileio.as_path(a.tokenizer).is_dir():
    raise InputError(f"tokenizer directory not found: {a.tokenizer}")
  if a.output:  # fail before sampling, not after it
    parent = os.path.dirname(os.path.abspath(a.output))
    if not os.path.isdir(parent):
      raise InputError(f"output directory does not exist: {parent}")
    if os.path.isdir(a.output):
      raise InputError(f"--output is a directory: {a.output}")


def run(argv=None) -> int:
  a = build_parser().parse_args(argv)
  _check_args(a)
  if a.tasks:
    tasks = read_tasks(a.tasks, a.language)
  else:
    text = a.prompt if a.prompt is not None else _read_text(a.prompt_file)
    prompts = [text] if a.prompt is not None else [p for p in text.split(f"\n{SEPARATOR}\n")]
    tasks = [
      {"task_id": str(i), "prompt": p, "language": a.language} for i, p in enumerate(prompts)
    ]

  from geex_jax.inference import sampler as sampler_lib

  from geex_jax.model import partitioning

  mesh = partitioning.model_parallel_mesh(a.model_parallel)
  sampler = sampler_lib.Sampler.load(
    a.checkpoint,
    None if a.tokenizer == "bytes" else a.tokenizer,
    dtype=a.dtype,
    int8=a.int8,
    mesh=mesh,
    max_batch=a.max_batch,
  )
  temperature = 0.0 if a.temperature is None else a.temperature
  kw = dict(max_new_tokens=a.max_new_tokens, stop=a.stop, add_tag=not a.no_tag)
  t0 = time.time()
  stream = a.output is None and len(tasks) == 1 and a.num_samples == 1 and a.beam is None
  if stream:

    def write(piece):
      sys.stdout.write(piece)
      sys.stdout.flush()

    c = sampler.stream(
      tasks[0]["prompt"],
      write,
      temperature=temperature,
      top_p=a.top_p,
      top_k=a.top_k,
      language=tasks[0]["language"],
      seed=a.seed,
      **kw,
    )
    results = [[c]]
  elif a.beam is not None:
    results = [
      sampler.beam(
        [t["prompt"]],
        a.beam,
        n=a.num_samples,
        length_penalty=a.length_penalty,
        language=t["language"],
        **kw,
      )[0]
      for t in tasks
    ]
  else:
    results = sampler.complete_detailed(
      [t["prompt"] for t in tasks],
      a.num_samples,
      temperature=temperature,
      top_p=a.top_p,
      top_k=a.top_k,
      language=[t["language"] for t in tasks],
      seed=a.seed,
      **kw,
    )
  elapsed = time.time() - t0
  new_tokens = sum(len(c.tokens) for row in results for c in row)

  if a.output:
    with fileio.atomic_write(a.output) as f:  # in place when complete: no half-written output
      for i, (task, row) in enumerate(zip(tasks, results)):
        for j, c in enumerate(row):
          rec = {
            "task_id": task["task_id"],
            "prompt_index": i,
            "sample_index": j,
            "language": task["language"],
            "completion": c.text,
            "finish_reason": c.finish_reason,
            "num_tokens": len(c.tokens),
          }
          if c.score is not None:
            rec["score"] = c.score
          f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  elif not stream:
    texts = [c.text for row in results for c in row]
    sys.stdout.write(f"\n{SEPARATOR}\n".join(texts))
    sys.stdout.flush()
  print(
    f"{PROG}: {sum(len(r) for r in results)} completions, {new_tokens} new tokens in "
    f"{elapsed:.1f} s ({new_tokens / max(elapsed, 1e-9):.1f} tokens/s)",
    file=sys.stderr,
  )
  return 0


def main(argv=None) -> None:
  with cli_errors(PROG):
    sys.exit(run(argv))


if __name__ == "__main__":
  main()
