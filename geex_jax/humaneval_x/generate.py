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
import time
from typing import Callable, Iterable, Optional, Sequence

from tqdm import tqdm

from geex_jax import fileio
from geex_jax.errors import GeexError, InputError
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


@dataclasses.dataclass(frozen=True)
class Batch:
  """`left` more samples of each job in `jobs`, drawn with `seed` (sample j of job i: row id
  i * left + j, as `Sampler.complete` numbers its rows)."""

  jobs: list[Job]
  left: int
  seed: int


def _batch_seed(batch: Sequence[Job], n: int, left: int) -> int:
  # Differs between the first run and a resumed one (n - left samples exist then).
  key = json.dumps([[j.task_id, j.source_language] for j in batch] + [n - left])
  return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def plan(jobs: Sequence[Job], have: collections.Counter, n: int, batch_size: int) -> list[Batch]:
  """The batches still to sample: jobs grouped by how many samples they lack, batch_size at a
  time. The seeds depend only on the batches, so both generation paths draw the same samples."""
  todo: dict[int, list[Job]] = collections.defaultdict(list)
  for job in jobs:
    left = n - have[(job.task_id, job.source_language)]
    if left > 0:
      todo[left].append(job)
  return [
    Batch(group[i : i + batch_size], left, _batch_seed(group[i : i + batch_size], n, left))
    for left, group in sorted(todo.items())
    for i in range(0, len(group), batch_size)
  ]


def _lines(batch: Batch, outs: Sequence[Sequence[str]]) -> list[str]:
  lines = []
  for job, gens in zip(batch.jobs, outs):
    for g in gens:
      row = {"task_id": job.task_id, "generation": g}
      if job.source_language:
        row["source_language"] = job.source_language
      lines.append(json.dumps(row, ensure_ascii=False) + "\n")
  return lines


def _start(out_path, jobs, n: int, batch_size: int) -> tuple[pathlib.Path, list[Batch]]:
  if n < 1 or batch_size < 1:
    raise InputError("n and batch size must be >= 1")
  out_path = pathlib.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  return out_path, plan(jobs, _existing_counts(out_path), n, batch_size)


def _append(f, lines: list[str]) -> None:
  f.write("".join(lines))
  f.flush()
  os.fsync(f.fileno())


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
  out_path, batches = _start(out_path, jobs, n, batch_size)
  total = sum(b.left * len(b.jobs) for b in batches)
  try:
    accepts = set(inspect.signature(complete).parameters)
  except (TypeError, ValueError):
    accepts = set()
  written = 0
  with (
    open(out_path, "a", encoding="utf-8") as f,
    tqdm(total=total, desc="sampling", unit="sample", disable=not progress) as bar,
  ):
    for b in batches:
      extra = {}
      if "language" in accepts:
        extra["language"] = [j.language for j in b.jobs]
      if "seed" in accepts:
        extra["seed"] = b.seed
      outs = complete(
        [j.prompt for j in b.jobs], b.left, temperature, top_p, max_new_tokens, **extra
      )
      if len(outs) != len(b.jobs) or any(len(o) != b.left for o in outs):
        raise RuntimeError(
          f"the sampler returned {[len(o) for o in outs]} completions for "
          f"{len(b.jobs)} prompts x {b.left}"
        )
      lines = _lines(b, outs)
      _append(f, lines)
      written += len(lines)
      bar.update(len(lines))
  return written


def generate_with_engine(
  engine,
  jobs: Sequence[Job],
  out_path,
  n: int,
  temperature: float,
  top_p: float,
  max_new_tokens: int,
  batch_size: int = 8,
  progress: bool = True,
  poll_s: float = 0.005,
) -> int:
  """`generate` on a started `inference.engine.Engine`: every (job, sample) is a slot's work, so
  the slots stay busy instead of each static batch waiting for its longest sample.

  Same batches, seeds and row ids as `generate` with the default Sampler, so the same samples (up
  to float rounding between batch shapes), written in the same order a batch at a time: a batch is
  appended once all its samples and the batches before it have finished. New requests are
  submitted while fewer than 2 x slots samples are unfinished, so the slots never run dry and the
  engine's queue stays short. Budgets are per prompt (max_new_tokens, lowered where the prompt
  leaves less room in the engine's max_length); the static path lowers a whole Sampler batch to
  its longest prompt's room, so the two differ only for prompts that long."""
  from geex_jax.inference import engine as E

  out_path, batches = _start(out_path, jobs, n, batch_size)
  total = sum(b.left * len(b.jobs) for b in batches)
  todo = collections.deque(
    (
      k,
      i,
      E.CompletionRequest(
        job.prompt,
        n=b.left,
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=b.seed,
        language=job.language,
        add_tag=False,  # the prompts carry their tag line (generation) or none (translation)
        first_row=i * b.left,
      ),
    )
    for k, b in enumerate(batches)
    for i, job in enumerate(b.jobs)
  )
  handles: dict[int, list] = {k: [None] * len(b.jobs) for k, b in enumerate(batches)}
  submitted: list = []  # handles not yet written
  window = 2 * engine.slots
  written, head = 0, 0
  with (
    open(out_path, "a", encoding="utf-8") as f,
    tqdm(total=total, desc="sampling", unit="sample", disable=not progress) as bar,
  ):
    while head < len(batches):
      if engine.error is not None:
        raise GeexError(f"the engine failed: {engine.error}")
      submitted = [h for h in submitted if not h.done]
      unfinished = sum(h.open_samples for h in submitted)
      while todo and unfinished < window:
        k, i, req = todo[0]
        try:
          h = engine.submit(req)
        except E.QueueFullError:
          break
        todo.popleft()
        handles[k][i] = h
        submitted.append(h)
        unfinished += req.n
      progressed = False
      while head < len(batches) and all(h is not None and h.done for h in handles[head]):
        outs = []
        for h in handles.pop(head):
          done = h.result()
          bad = [e.reason for e in done if e.reason in ("error", "cancelled")]
          if bad:
            raise GeexError(f"the engine failed: {engine.error or bad[0]}")
          outs.append([e.text for e in done])
        lines = _lines(batches[head], outs)
        _append(f, lines)
        written += len(lines)
        bar.update(len(lines))
        head += 1
        progressed = True
      if not progressed:
        time.sleep(poll_s)
  return written


def start_engine(sampler, jobs: Sequence[Job], max_new_tokens: int, *, slots=16, chunk=8):
  """A started Engine over `sampler`, its max_length just long enough for the longest prompt plus
  max_new_tokens (at most the model's positions: the cache is slots x max_length)."""
  from geex_jax.inference import engine as E

  longest = max(len(sampler.tokenizer.encode(j.prompt)) for j in jobs)
  max_length = min(sampler.config.max_position, longest + max_new_tokens)
  engine = E.Engine(sampler, slots=slots, max_length=max_length, chunk=chunk, max_waiting=4 * slots)
  engine.start()
  engine.ready.wait()
  if engine.error is not None:
    raise GeexError(f"the engine failed to start: {engine.error}")
  return engine


def load_engine(
  checkpoint: str, tokenizer, jobs, max_new_tokens: int, *, slots=16, chunk=8, **options
):
  """`start_engine` over the default Sampler loaded from a checkpoint (options: dtype, int8)."""
  from geex_jax.inference.sampler import Sampler

  sampler = Sampler.load(checkpoint, tokenizer, **options)
  return start_engine(sampler, jobs, max_new_tokens, slots=slots, chunk=chunk)


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
  return sampler_complete(fn.load(checkpoint, tokenizer, **options))


def sampler_complete(sampler) -> Complete:
  """The `complete` callable of a loaded Sampler (prompts already carry their tag line)."""

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
