"""The demo behind `make demo`: the whole loop on a CPU in a few minutes, nothing downloaded.

    python -m geex_jax.demo [--workdir DIR] [--steps N] [--tokenizer_dir DIR] [--humaneval_x DIR]
                            [--prompt TEXT] [--temperature T] [--gin.KEY=VALUE ...]

1. corpus: builds the embedded corpus (a few MB of this machine's own source trees) and a held-out
   set: standard-library Python modules the corpus does not hold;
2. train: a small model on the corpus's Python (gin_configs/demo.gin, byte-level tokens) with
   geex-train's `train()`, then its loss on the held-out set;
3. sample: a completion of a Python prompt from the checkpoint;
4. convert: the checkpoint to the released PyTorch layout and back, verified (`geex-convert`);
5. evaluate: completions of a few HumanEval-X Python problems (the real ones from --humaneval_x
   or $GEEX_SHARED/humaneval_x, else three tiny ones written into the workdir) scored by
   `geex-eval execute` and `geex-eval report` (in a bubblewrap sandbox; skipped, with a note,
   where bwrap is missing);
then prints where every artifact is and the next commands to try.
"""

from __future__ import annotations

if __name__ == "__main__":
  # `python -m geex_jax.demo`: run the module under its import name, which demo.gin's gin
  # configurables belong to (defining them in __main__ as well would make them ambiguous).
  import sys
  from geex_jax import demo

  sys.exit(demo.main())

import os

# Before anything imports TensorFlow or JAX: start-up chatter a user cannot act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import pathlib
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from typing import Any, Optional, Sequence

import gin
import numpy as np

from geex_jax.errors import ConfigError, GeexError, InputError

PROG = "geex-demo"
PROMPT = "def fibonacci(n):\n"
STAGES = 5


class DemoError(GeexError):
  """A stage of the demo failed (a CLI it runs exited with an error)."""


# ---------------------------------------------------------------------------------------------
# Gin: the demo's own knobs (gin_configs/demo.gin) and its batch source.


@gin.configurable("demo")
def demo_settings(
  heldout_bytes: int = 96 << 10, eval_problems: int = 3, eval_max_new_tokens: int = 128
) -> dict:
  """heldout_bytes: size of the held-out set (standard-library modules not in the corpus);
  eval_problems: HumanEval-X problems sampled and scored; eval_max_new_tokens: their budget."""
  return {
    "heldout_bytes": heldout_bytes,
    "eval_problems": eval_problems,
    "eval_max_new_tokens": eval_max_new_tokens,
  }


class RandomWindows:
  """Rows are windows at random offsets of the corpus's token streams (nanoGPT's get_batch).

  The pipeline's iterator (`pipeline_batches`) packs whole documents end to end into rows, in
  order: with the demo's small batches (16 x 128 bytes) one batch is a few kilobytes of a few
  files, and the next hundred batches are the same files, a file averaging 20 KB here. That is
  right at scale (a 3072 x 2048 batch holds thousands of files) but slows a short run down a
  lot. Here each task's documents are tokenized once, exactly as the pipeline does it (the
  pipeline's DocumentStream: tag line, text, EOD), laid end to end, and every row of every batch
  is a window at an independent random offset of the stream of a task drawn at the mixture's
  rates, packed like the pipeline's rows (`batches.pack_stream`: positions restart after each
  EOD, no loss where the input is EOD). Row r of batch k is a function of (seed, k, r) only, so
  the state is the batch counter and any split of the rows over hosts sees the same batch.
  """

  def __init__(
    self,
    *,
    batch_size: int,
    sequence_length: int,
    seed: int,
    shard_index: int,
    num_shards: int,
    corpus_dir: str,
    tokenizer_dir: Optional[str],
    languages: Optional[Sequence[str]],
  ):
    from geex_jax.data import catalog, pipeline
    from geex_jax.data.corpus import load_manifest
    from geex_jax.tokenizer import load_tokenizer

    if batch_size % num_shards:
      raise ConfigError(f"batch size {batch_size} is not divisible by {num_shards} data shards")
    rates = _only(languages, load_manifest(corpus_dir)["languages"]) if languages else None
    spec = catalog.get(
      pipeline.register_corpus_tasks(
        corpus_dir, tokenizer_dir=tokenizer_dir, rates=rates, name="demo", seqio_tasks=False
      )
    )
    tokenizer = load_tokenizer(tokenizer_dir)
    self._eos = tokenizer.eos_id
    self._streams = []
    for task in spec.tasks:
      docs = pipeline.DocumentStream(
        catalog.MixtureSpec(task.name, (task,), (1.0,)), tokenizer, seed=seed, num_epochs=1
      )
      self._streams.append(np.concatenate([ids for _, _, _, ids in docs]))
    self._cum_rates = np.cumsum(np.asarray(spec.rates) / sum(spec.rates))
    rows = batch_size // num_shards
    self._rows = range(shard_index * rows, (shard_index + 1) * rows)
    self._length, self._seed, self._step = sequence_length, seed, 0

  def _row(self, r: int) -> dict:
    from geex_jax.data.batches import pack_stream

    rng = np.random.default_rng([self._seed, self._step, r])
    task = min(
      int(np.searchsorted(self._cum_rates, rng.random(), side="right")), len(self._streams) - 1
    )
    stream = self._streams[task]
    if len(stream) <= self._length:  # a tiny corpus: repeat it
      stream = np.resize(stream, self._length + 1)
    start = int(rng.integers(0, len(stream) - self._length))
    return pack_stream(stream[start : start + self._length + 1], self._eos)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    rows = [self._row(r) for r in self._rows]
    self._step += 1
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])


def _only(languages: Sequence[str], corpus_languages) -> dict:
  """Mixture overrides that keep `languages` (at their paper shares) and drop the others."""
  from geex_jax import languages as langs

  try:
    wanted = {langs.get(n).name for n in languages}
  except langs.UnknownLanguageError as e:
    raise ConfigError(f"random_windows.languages: {e}") from None
  if not wanted & set(corpus_languages):
    raise ConfigError(
      f"the corpus holds none of {sorted(wanted)} (it has {', '.join(sorted(corpus_languages))})"
    )
  return {n: 0.0 for n in corpus_languages if n not in wanted}


@gin.configurable
def random_windows(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  corpus_dir: str = gin.REQUIRED,
  tokenizer_dir: Optional[str] = None,
  languages: Optional[Sequence[str]] = None,
) -> RandomWindows:
  """A batch source for `train.data_source` (see RandomWindows). `languages`: train on these
  corpus languages only (None: every language, at the rates of `language_rates`)."""
  return RandomWindows(
    batch_size=batch_size,
    sequence_length=sequence_length,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    corpus_dir=corpus_dir,
    tokenizer_dir=tokenizer_dir,
    languages=languages,
  )


# ---------------------------------------------------------------------------------------------
# Quiet start-up.


@contextlib.contextmanager
def _quiet_fd2():
  """Sends file descriptor 2 to /dev/null: TensorFlow's C++ start-up lines (oneDNN, CUDA stubs)
  ignore TF_CPP_MIN_LOG_LEVEL. Python exceptions still surface (they are raised, not printed)."""
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as null:
      os.dup2(null.fileno(), 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def _quiet_logs() -> None:
  import logging
  import warnings
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax: "Metadata file does not exist", ...
  logging.getLogger("absl").setLevel(logging.ERROR)
  for name in ("jax", "orbax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.ERROR)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", category=FutureWarning)
  warnings.filterwarnings("ignore", module=r"(orbax|jax|flax|tensorflow|tensorboardX)\b")


def _subprocess_env() -> dict:
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")


# ---------------------------------------------------------------------------------------------
# Stages.


def _parse(argv):
  parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
  parser.add_argument(
    "--workdir",
    default=os.path.join(tempfile.gettempdir(), "geex-jax-demo"),
    help="every artifact goes here (default: %(default)s)",
  )
  parser.add_argument(
    "--tokenizer_dir",
    default=None,
    help="the CodeGeeX tokenizer files (vocab.json, merges.txt); default bytes",
  )
  parser.add_argument(
    "--steps", type=int, default=None, help="training steps (demo.gin's TRAIN_STEPS by default)"
  )
  parser.add_argument(
    "--resume",
    action="store_true",
    help="continue the run in WORKDIR/run instead of starting afresh",
  )
  parser.add_argument("--prompt", default=PROMPT)
  parser.add_argument(
    "--temperature",
    type=float,
    default=0.0,
    help="sampling temperature of the completion (0: greedy, the default)",
  )
  parser.add_argument("--max_new_tokens", type=int, default=256)
  parser.add_argument(
    "--humaneval_x",
    default=None,
    help="HumanEval-X directory (humaneval_python.jsonl.gz); default "
    "$GEEX_SHARED/humaneval_x when present, else tiny problems of its own",
  )
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    if not arg.startswith("--gin.") or "=" not in arg:
      parser.error(f"unrecognized argument {arg} (extra gin bindings: --gin.KEY=VALUE)")
    key, _, value = arg[len("--gin.") :].partition("=")
    bindings.append(f"{key} = {value}")
  return args, bindings


@dataclasses.dataclass
class DemoResult:
  train: Any  # geex_jax.training.train.TrainResult
  heldout: HeldoutLoss  # the final params on the held-out set
  completion: str  # the sampled completion of --prompt
  paths: dict  # artifact name -> path
  eval_skipped: Optional[str]  # why the programs were not run (no sandbox), or None


def _stage(i: int, text: str) -> None:
  print(f"[{i}/{STAGES}] {text}", flush=True)


def _say(text: str) -> None:
  for line in text.splitlines() or [""]:
    print("      " + line, flush=True)


def _kb(n: int) -> str:
  return f"{n / 1000:.0f} KB" if n < 1e6 else f"{n / 1e6:.1f} MB"


def build_heldout(corpus_dir: pathlib.Path, out: pathlib.Path, max_bytes: int) -> dict:
  """A Python corpus of standard-library modules that `corpus_dir` does not hold.

  The embedded corpus takes the standard library's files in sorted order until its per-language
  budget is spent; this takes top-level modules from the other end of that order (small ones,
  so there are several), skipping any whose text is in the corpus, until `max_bytes`.
  """
  from geex_jax.data.corpus import build_corpus, load_manifest
  from geex_jax.data.tfds_corpus import DocumentReader

  info = load_manifest(str(corpus_dir))["languages"].get("Python")
  seen = set()
  if info:
    reader = DocumentReader([str(corpus_dir / s) for s in info["shards"]])
    seen = {hashlib.sha256(reader[i]).digest() for i in range(len(reader))}
    reader.close()
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = [
    str(p)
    for p in sorted(stdlib.glob("*.py"), reverse=True)
    if p.stat().st_size < 24_000 and hashlib.sha256(p.read_bytes()).digest() not in seen
  ]
  if not files:
    raise DemoError(f"no standard-library modules in {stdlib} for a held-out set")
  build = functools.partial(
    build_corpus,
    files,
    str(out),
    languages=["python"],
    max_bytes_per_language=max_bytes,
    heldout_fraction=0,  # all of it is held out already
    progress=False,
  )
  try:
    return build()
  except InputError:  # built before from other files (another Python, another corpus)
    shutil.rmtree(out)
    return build()


@dataclasses.dataclass(frozen=True)
class HeldoutLoss:
  """The model's loss on the held-out set, per UTF-8 byte (comparable across tokenizers), beside
  what knowing only the set's own byte frequencies gives (a unigram model fitted to it)."""

  nats_per_byte: float
  unigram_nats_per_byte: float
  tokens: int
  bytes: int


def heldout_loss(
  model_dir: pathlib.Path,
  heldout_dir: pathlib.Path,
  tokenizer_dir: Optional[str],
  sequence_length: int,
  batch_size: int,
) -> HeldoutLoss:
  """The latest params' loss over every held-out document (see HeldoutLoss)."""
  import jax
  from geex_jax.model import checkpoints
  from geex_jax.training import step as train_step
  from geex_jax.data import pipeline
  from geex_jax.inference.stop_automata import token_bytes
  from geex_jax.tokenizer import load_tokenizer

  config, params = checkpoints.load_params(model_dir)
  config = config.replace(dropout_rate=0.0)
  name = pipeline.register_corpus_tasks(
    str(heldout_dir),
    tokenizer_dir=tokenizer_dir,
    rates={"python": 1.0},
    name="demo_heldout",
    seqio_tasks=False,
  )
  batches = pipeline.make_batch_iterator(
    mixture_or_task=name,
    sequence_length=sequence_length,
    batch_size=batch_size,
    seed=0,
    num_epochs=1,
  )
  # Bytes of every token id (EOD: none), as counts per byte value, to measure the text scored.
  pieces = token_bytes(load_tokenizer(tokenizer_dir), config.vocab_size)
  byte_counts = np.zeros((len(pieces), 256), np.int64)
  for i, piece in enumerate(pieces):
    np.add.at(byte_counts[i], np.frombuffer(piece, np.uint8), 1)
  loss_sum = jax.jit(lambda p, b: train_step.loss_fn(p, b, config, None, 1.0)[1])
  total, weight = 0.0, 0.0
  histogram = np.zeros(256, np.int64)
  for batch in batches:  # fixed shapes (the last batch is zero-padded): one compile
    total += float(loss_sum(params, batch))
    weight += float(batch["decoder_loss_weights"].sum())
    scored = batch["decoder_target_tokens"][batch["decoder_loss_weights"] > 0]
    histogram += np.bincount(scored, minlength=len(pieces)) @ byte_counts
  n_bytes = int(histogram.sum())
  p = histogram[histogram > 0] / max(n_bytes, 1)
  return HeldoutLoss(
    nats_per_byte=total / max(n_bytes, 1),
    unigram_nats_per_byte=float(-(p * np.log(p)).sum()),
    tokens=int(weight),
    bytes=n_bytes,
  )


# Written when no HumanEval-X data is around: the dataset's Python fields, three easy problems.
OWN_PROBLEMS = [
  (
    "add",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\n    >>> add(2, 3)\n    5\n    \"\"\"\n",
    "    return a + b\n",
    ["candidate(2, 3) == 5", "candidate(-1, 1) == 0", "candidate(10, 32) == 42"],
  ),
  (
    "is_even",
    "def is_even(n):\n    \"\"\"Return True if n is even, else False.\n"
    "    >>> is_even(4)\n    True\n    \"\"\"\n",
    "    return n % 2 == 0\n",
    ["candidate(4) is True", "candidate(7) is False", "candidate(0) is True"],
  ),
  (
    "reverse_words",
    "def reverse_words(text):\n    \"\"\"Return the words of text in reverse "
    "order, joined by single spaces.\n    >>> reverse_words('a b c')\n    'c b a'\n    \"\"\"\n",
    "    return ' '.join(reversed(text.split()))\n",
    ["candidate('a b c') == 'c b a'", "candidate('hello') == 'hello'", "candidate('') == ''"],
  ),
]


def write_own_problems(out: pathlib.Path) -> pathlib.Path:
  """out/humaneval_python.jsonl: OWN_PROBLEMS in HumanEval-X's Python format."""
  out.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, (name, prompt, solution, asserts) in enumerate(OWN_PROBLEMS):
    test = (
      "\n\ndef check(candidate):\n"
      + "".join(f"    assert {a}\n" for a in asserts)
      + f"\n\ncheck({name})\n"
    )
    lines.append(
      json.dumps(
        {
          "task_id": f"Python/{i}",
          "prompt": prompt,
          "canonical_solution": solution,
          "test": test,
          "declaration": prompt.split("\n", 1)[0] + "\n",
          "example_test": "",
          "entry_point": name,
        }
      )
    )
  path = out / "humaneval_python.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return out


def _humaneval_dir(flag: Optional[str]) -> Optional[pathlib.Path]:
  if flag:
    return pathlib.Path(flag).absolute()
  shared = pathlib.Path(os.environ.get("GEEX_SHARED") or pathlib.Path.cwd().parent / "shared")
  d = shared / "humaneval_x"
  return d if any(d.glob("humaneval_python.jsonl*")) else None


def _cli(display: str, module: str, args: Sequence[str]) -> str:
  """Runs a geex CLI as a subprocess (printing it as the user would type it); returns stdout."""
  _say("$ " + display + " " + " ".join(shlex.quote(str(a)) for a in args))
  proc = subprocess.run(
    [sys.executable, "-m", module, *map(str, args)],
    capture_output=True,
    text=True,
    env=_subprocess_env(),
  )
  if proc.returncode != 0:
    tail = "\n".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-8:])
    _say(tail)
    raise DemoError(f"`{display} {args[0]}` exited with status {proc.returncode} (output above)")
  return proc.stdout


def run(argv: Optional[Sequence[str]] = None) -> DemoResult:
  """The demo; returns what it made (see DemoResult)."""
  args, extra = _parse(argv)
  _quiet_logs()
  from geex_jax.training import cli as train_cli, metrics as metrics_lib, train as train_lib
  from geex_jax.data.corpus import build_embedded_corpus

  work = pathlib.Path(args.workdir).absolute()
  paths = {
    "corpus": work / "corpus",
    "held-out set": work / "heldout",
    "run": work / "run",
    "PyTorch file": work / "torch" / "codegeex_demo.pt",
    "converted back": work / "converted",
    "samples": work / "samples.jsonl",
    "evaluation": work / "eval",
  }
  corpus, heldout, model_dir = paths["corpus"], paths["held-out set"], paths["run"]
  t0 = time.time()

  # 1. Corpus + held-out set.
  _stage(1, f"building the embedded corpus in {corpus} ...")
  with _quiet_fd2():  # writing the shards goes through TensorFlow, whose C++ side is chatty
    try:
      manifest = build_embedded_corpus(str(corpus), progress=False)
    except InputError:  # built by an older geex-jax, or with other options: build it again
      shutil.rmtree(corpus)
      manifest = build_embedded_corpus(str(corpus), progress=False)
  langs = manifest["languages"]
  if model_dir.exists() and not args.resume:
    shutil.rmtree(model_dir)
  bindings = [f"MODEL_DIR = {str(model_dir)!r}", f"CORPUS_DIR = {str(corpus)!r}"]
  if args.tokenizer_dir:
    bindings += [f"TOKENIZER_DIR = {os.path.abspath(args.tokenizer_dir)!r}", "VOCAB_SIZE = 52224"]
  if args.steps:
    bindings.append(f"TRAIN_STEPS = {args.steps}")
  train_cli.parse_gin(["demo.gin"], bindings + extra)
  settings = demo_settings()
  with _quiet_fd2():
    held = build_heldout(corpus, heldout, settings["heldout_bytes"])["languages"]["Python"]
  python = langs.get("Python", {"documents": 0, "bytes": 0})
  _say(
    f"{sum(v['documents'] for v in langs.values())} files in {len(langs)} languages "
    f"({_kb(sum(v['bytes'] for v in langs.values()))}), Python {python['documents']} files "
    f"({_kb(python['bytes'])})"
  )
  _say(
    f"held-out set: {held['documents']} standard-library modules the corpus does not hold "
    f"({_kb(held['bytes'])}) in {heldout} ({time.time() - t0:.0f}s)"
  )

  # 2. Training + held-out loss.
  config = gin.get_configurable("CodeGeeXConfig")()  # what train() will build
  seq, batch = gin.query_parameter("%SEQUENCE_LENGTH"), gin.query_parameter("%BATCH_SIZE")
  _stage(
    2,
    f"training a {config.num_params() / 1e6:.1f}M-parameter model (hidden "
    f"{config.hidden_size}, {config.num_layers}+1 layers, "
    f"{'CodeGeeX BPE' if args.tokenizer_dir else 'byte'} tokens) in {model_dir} ...",
  )
  t1 = time.time()
  result = train_lib.train()
  if result.losses:
    first, last = result.losses[min(result.losses)], _mean_last(result.losses, 20)
    _say(
      f"{result.step} steps of {batch}x{seq} tokens in {time.time() - t1:.0f}s: training "
      f"loss {first:.2f} -> {last:.2f}; checkpoint saved"
    )
  else:
    _say(f"nothing to train: {model_dir} is already at step {result.step}")
  evals = [
    (step, rec)
    for step, rec in sorted(metrics_lib.read_metrics(model_dir).items())
    if "eval_loss" in rec
  ]
  if evals:
    per_language = ", ".join(
      f"{key.split('/', 1)[1]} {value:.2f}"
      for key, value in evals[-1][1].items()
      if key.startswith("eval_loss/")
    )
    _say(
      "eval loss on the corpus's validation split (per token): "
      + ", ".join(f"step {step} {rec['eval_loss']:.2f}" for step, rec in evals)
      + (f" (last, by language: {per_language})" if per_language else "")
    )
  t2 = time.time()
  tokens_seen = result.step * batch * seq
  held_loss = heldout_loss(model_dir, heldout, args.tokenizer_dir, seq, batch)
  _say(
    f"held-out loss {held_loss.nats_per_byte:.2f} nats/byte "
    f"({held_loss.nats_per_byte / math.log(2):.2f} bits) on {_kb(held_loss.bytes)} the training "
    f"never saw; the set's own byte frequencies alone give "
    f"{held_loss.unigram_nats_per_byte:.2f}, a uniform guess {math.log(256):.2f} "
    f"({time.time() - t2:.0f}s)"
  )

  # 3. A completion.
  mode = "greedy" if args.temperature <= 0 else f"temperature {args.temperature}"
  _stage(3, f"sampling a completion ({mode}) from the checkpoint ...")
  from geex_jax.inference.sampler import Sampler

  t3 = time.time()
  sampler = Sampler.load(str(model_dir), args.tokenizer_dir)
  sampling = (
    {"greedy": True} if args.temperature <= 0 else {"temperature": args.temperature, "top_p": 0.95}
  )
  completion = sampler.complete_detailed(
    [args.prompt], max_new_tokens=args.max_new_tokens, language="Python", seed=0, **sampling
  )[0][0]
  print("----- prompt + completion " + "-" * 40)
  print(args.prompt + completion.text)
  print("-" * 66)
  _say(f"ended by: {completion.finish_reason} ({time.time() - t3:.0f}s)")
  _say(
    f"expect text shaped like code, not programs: a {config.num_params() / 1e6:.1f}M-parameter "
    f"model that has read {tokens_seen / 1e6:.1f}M tokens scores "
    f"{held_loss.nats_per_byte:.2f} nats/byte where byte frequencies score "
    f"{held_loss.unigram_nats_per_byte:.2f}; working completions need the released 13B weights "
    "(README: Converting the released weights) or a long run (the geex-train command below)"
  )

  # 4. PyTorch and back.
  _stage(4, "converting the checkpoint to the released PyTorch layout and back ...")
  t4 = time.time()
  torch_file, back = paths["PyTorch file"], paths["converted back"]
  torch_file.parent.mkdir(parents=True, exist_ok=True)
  out = _cli(
    "geex-convert",
    "geex_jax.conversion.cli",
    ["jax-to-torch", model_dir, torch_file, "--overwrite", "--no-progress"],
  )
  _say(out.strip())
  out = _cli(
    "geex-convert",
    "geex_jax.conversion.cli",
    [
      "torch-to-jax",
      torch_file,
      back,
      "--dtype",
      "fp32",
      "--num-heads",
      config.num_heads,
      "--verify",
      "--overwrite",
      "--no-progress",
    ],
  )
  _say(out.strip() + f"\n({time.time() - t4:.0f}s)")

  # 5. HumanEval-X-style evaluation of its own samples.
  _stage(5, "scoring its own completions of HumanEval-X Python problems ...")
  t5 = time.time()
  skipped = _evaluate(args, sampler, settings, paths)
  _say(f"({time.time() - t5:.0f}s)")

  print(f"done in {time.time() - t0:.0f}s.")
  print("artifacts:")
  width = max(map(len, paths))
  for name, path in paths.items():
    print(f"  {name + ':':<{width + 1}} {path}")
  _next_steps(args, paths, config)
  return DemoResult(result, held_loss, completion.text, paths, skipped)


def _evaluate(args, sampler, settings: dict, paths: dict) -> Optional[str]:
  from geex_jax.humaneval_x import problems as problems_lib

  data = _humaneval_dir(args.humaneval_x)
  n = settings["eval_problems"]
  if data is None:
    data = write_own_problems(paths["evaluation"].parent / "humaneval_x")
    probs = list(problems_lib.load_language(data, "python").values())
    _say(
      f"no HumanEval-X data here (--humaneval_x DIR or $GEEX_SHARED/humaneval_x): "
      f"{len(probs)} tiny problems of its own in {data}"
    )
  else:
    probs = list(problems_lib.load_language(data, "python").values())
    # The shortest prompts: the model was trained on short rows.
    probs = sorted(probs, key=lambda p: len(p.prompt))[:n]
    _say(f"the {len(probs)} shortest-prompt problems of {data}")
  paths["problems"] = data
  texts = sampler.complete(
    [problems_lib.problem_text(p) for p in probs],
    n=1,
    greedy=True,
    max_new_tokens=settings["eval_max_new_tokens"],
    language="Python",
  )
  samples = paths["samples"]
  samples.write_text(
    "".join(
      json.dumps({"task_id": p.task_id, "generation": t[0]}) + "\n" for p, t in zip(probs, texts)
    )
  )
  ev = paths["evaluation"]
  out = _cli(
    "geex-eval",
    "geex_jax.humaneval_x.cli",
    ["execute", "--samples", samples, "--data", data, "--out", ev, "--quiet", "--no-cache"],
  )
  summary = json.loads((ev / "summary.json").read_text())
  skipped = summary.get("languages", {}).get("python", {}).get("skipped")
  out = _cli("geex-eval", "geex_jax.humaneval_x.cli", ["report", ev])
  _say(out.strip())
  if skipped:
    _say(
      f"note: the programs were not run: {skipped}. Install bubblewrap (Debian: apt-get "
      "install bubblewrap) to run them; the rest of the loop is unaffected."
    )
  return skipped


def _next_steps(args, paths: dict, config) -> None:
  q = lambda p: shlex.quote(str(p))
  tok = q(os.path.abspath(args.tokenizer_dir)) if args.tokenizer_dir else "bytes"
  work, run_dir = paths["run"].parent, q(paths["run"])
  real = _humaneval_dir(args.humaneval_x)
  data = q(real) if real else "HUMANEVAL_X_DIR"
  print("next:")
  print(
    f"  geex-sample --checkpoint {run_dir} --tokenizer {tok} --language python "
    "--prompt $'def read_lines(path):\\n' --temperature 0.6 --max_new_tokens 300"
  )
  print(
    f"  geex-train --gin_file=demo.gin --gin.MODEL_DIR=\"'{work}/run-bigger'\" "
    f"--gin.CORPUS_DIR=\"'{paths['corpus']}'\" --gin.HIDDEN_SIZE=256 --gin.NUM_HEADS=4 "
    "--gin.FFN_SIZE=1024 --gin.NUM_LAYERS=6 --gin.TRAIN_STEPS=20000"
  )
  if not real:
    print("  # HUMANEVAL_X_DIR: the humaneval_*.jsonl.gz files of HumanEval-X (THUDM/CodeGeeX)")
  print(
    f"  geex-eval generate --data {data} --checkpoint {run_dir} --tokenizer {tok} "
    f"--languages python --n 1 --max-new-tokens 256 --out {q(work / 'he_samples.jsonl')}"
  )
  print(
    f"  geex-eval execute --samples {q(work / 'he_samples.jsonl')} --data {data} "
    f"--out {q(work / 'he_eval')}"
  )


def _mean_last(losses: dict, n: int) -> float:
  steps = sorted(losses)[-n:]
  return sum(losses[s] for s in steps) / len(steps)


def main(argv: Optional[Sequence[str]] = None) -> int:
  from geex_jax.errors import cli_errors

  with cli_errors(PROG):
    run(argv)
  return 0
