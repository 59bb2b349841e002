"""Running a sampler over HumanEval-X: a resumable samples JSONL.

The sampler is any callable
    complete(prompts: list[str], n: int, temperature: float, top_p: float,
             max_new_tokens: int) -> list[list[str]]
returning n completions (text after the prompt) per prompt. When it also takes the keywords
`language` (one HumanEval-X key per prompt, so it can stop at the language's stop rule) and/or
`seed` (an int: resumed runs must not repeat the samples they already have), they are passed.
`load_sampler` builds one from a checkpoint and tokenizer with `geex_jax.inference.sampler.Sampler`,
imported only when needed; prompts already carry their tag line (generation) or none
(translation), so the sampler adds none.

Output lines: {"task_id": "CPP/3", "generation": "...", "source_language": "python"?}; written a
batch at a time, each line whole and flushed, so an interrupted run loses at most the batch in
flight, and a rerun with the same arguments only generates what is missing (a torn last line is
dropped first).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import pathlib
from typing import Callable, Iterable, Optional, Sequence

from tqdm import tqdm

from geex_jax import fileio
from geex_jax.errors import InputError
from geex_jax.humaneval_x import problems as problems_lib

Complete = Callable[..., list[list[str]]]


@dataclasses.dataclass(frozen=True)
class Job:
  """One prompt to sample."""

  task_id: str
  prompt: str
  source_language: Optional[str] = None

  @property
  def language(self) -> str:
    """The language the completion is in (the target, for translation)."""
    return problems_lib.task_language(self.task_id)


def generation_jobs(data_dir, langs=None, task_ids: Optional[Iterable[str]] = None) -> list[Job]:
  """A job per problem of each language (prompt = tag line + dataset prompt)."""
  wanted = set(task_ids) if task_ids else None
  probs = problems_lib.load(data_dir, langs)
  if wanted:
    unknown = sorted(wanted - {t for k in probs for t in probs[k]})
    if unknown:
      raise InputError(f"unknown task_id(s) for the selected languages: {', '.join(unknown)}")
  return [
    Job(p.task_id, problems_lib.generation_prompt(p))
    for k in probs
    for p in probs[k].values()
    if wanted is None or p.task_id in wanted
  ]


def translation_jobs(
  data_dir, pairs: Sequence[tuple[str, str]], task_ids: Optional[Iterable[str]] = None
) -> list[Job]:
  """A job per problem of each (source, target) pair; task_id names the target problem."""
  try:
    wanted = {int(t.rsplit("/", 1)[1]) for t in task_ids} if task_ids else None
  except (ValueError, IndexError):
    raise InputError(f"bad task ids {task_ids} (expected e.g. Python/3)") from None
  probs = problems_lib.load(data_dir, sorted({k for pair in pairs for k in pair}))
  jobs = []
  for src, tgt in pairs:
    for p in probs[tgt].values():
      if wanted is not None and p.number not in wanted:
        continue
      source = probs[src][problems_lib.task_id_for(src, p.number)]
      jobs.append(Job(p.task_id, problems_lib.translation_prompt(source, p), src))
  return jobs


def parse_pairs(spec: str) -> list[tuple[str, str]]:
  """ "all" -> the 30 pairs; "python:cpp,java:go" -> those pairs."""
  if spec.strip() == "all":
    return problems_lib.translation_pairs()
  out = []
  for item in spec.split(","):
    if item.count(":") != 1:
      raise InputError(f"bad translation pair {item!r} (expected SOURCE:TARGET, e.g. python:cpp)")
    s, t = (problems_lib.language_of(x.strip()).humaneval for x in item.split(":"))
    if s == t:
      raise InputError(f"translation pair {item!r} has the same source and target")
    out.append((s, t))
  return out


def _existing_counts(path: pathlib.Path) -> collections.Counter:
  """Samples already in `path` per (task_id, source_language); drops a torn last line."""
  counts: collections.Counter = collections.Counter()
  if not path.exists():
    return counts
  data = path.read_bytes()
  cut = data.rfind(b"\n") + 1
  if cut != len(data):
    with open(path, "r+b") as f:  # the last line was cut by an interruption
      f.truncate(cut)
  bad = lambda lineno, e=None: InputError(
    f"{path}:{lineno}: not a samples line; refusing to append to it"
  )
  for lineno, row in fileio.iter_jsonl(path, error=bad):  # what is left: whole lines
    try:
      counts[(row["task_id"], row.get("source_language"))] += 1
    except (KeyError, TypeError):
      raise bad(lineno) from None
  return counts


def generate(
  complete: Complete,
  jobs: Sequence[Job],
  out_path,
  n: int,
  temperature: float,
  top_p: float,
  max_new_tokens: int,
  batch_size: int = 8,
  progress: bool = True,
) -> int:
  """Samples `n` completions per job into `out_path` (resuming). Returns the lines written now."""
  if n < 1 or batch_size < 1:
    raise InputError("n and batch size must be >= 1")
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  have = _existing_counts(out_path)
  todo: dict[int, list[Job]] = collections.defaultdict(list)
  for job in jobs:
    left = n - have[(job.task_id, job.source_language)]
    if left > 0:
      todo[left].append(job)
  total = sum(left * len(js) for left, js in todo.items())
  try:
    accepts = set(inspect.signature(complete).parameters)
  except (TypeError, ValueError):
    accepts = set()
  written = 0
  with (
    open(out_path, "a", encoding="utf-8") as f,
    tqdm(total=total, desc="sampling", unit="sample", disable=not progress) as bar,
  ):
    for left, group in sorted(todo.items()):
      for i in range(0, len(group), batch_size):
        batch = group[i : i + batch_size]
        extra = {}
        if "language" in accepts:
          extra["language"] = [j.language for j in batch]
        if "seed" in accepts:
          # Differs between the first run and a resumed one (n - left samples exist then).
          key = json.dumps([[j.task_id, j.source_language] for j in batch] + [n - left])
          extra["seed"] = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        outs = complete(
          [j.prompt for j in batch], left, temperature, top_p, max_new_tokens, **extra
        )
        if len(outs) != len(batch) or any(len(o) != left for o in outs):
          raise RuntimeError(
            f"the sampler returned {[len(o) for o in outs]} completions for "
            f"{len(batch)} prompts x {left}"
          )
        lines = []
        for job, gens in zip(batch, outs):
          for g in gens:
            row = {"task_id": job.task_id, "generation": g}
            if job.source_language:
              row["source_language"] = job.source_language
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())
        written += len(lines)
        bar.update(len(lines))
  return written


def load_sampler(
  checkpoint: str, tokenizer: str, factory: Optional[str] = None, **options
) -> Complete:
  """The `complete` callable of a trained model; raises InputError when it cannot be loaded.

  Args:
    factory: None for geex_jax.inference.sampler.Sampler (options: dtype, int8), or
      "module:function"
      called as function(checkpoint=..., tokenizer=...) that returns a `complete` callable.
  """
  if factory:
    if ":" not in factory:
      raise InputError(f"--sampler must be MODULE:FUNCTION, got {factory!r}")
    mod_name, fn_name = factory.split(":", 1)
  else:
    mod_name, fn_name = "geex_jax.inference.sampler", "Sampler"
  try:
    mod = importlib.import_module(mod_name)
  except ImportError as e:
    raise InputError(f"the sampler module {mod_name} is not available ({e})") from None
  fn = getattr(mod, fn_name, None)
  if fn is None:
    raise InputError(f"{mod_name} has no {fn_name} to build a sampler from")
  if factory:
    return fn(checkpoint=checkpoint, tokenizer=tokenizer)
  sampler = fn.load(checkpoint, tokenizer, **options)

  def complete(prompts, n, temperature, top_p, max_new_tokens, language=None, seed=0):
    return sampler.complete(
      prompts,
      n,
      temperature=temperature,
      top_p=top_p,
      max_new_tokens=max_new_tokens,
      language=language,
      seed=seed,
      add_tag=False,
    )

  return complete
