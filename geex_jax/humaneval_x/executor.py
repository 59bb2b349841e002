"""The executor: compiles and runs assembled programs in the sandbox, in parallel, with a cache.

Each program gets a fresh work directory; the compile step (if any) and the run step are two
sandboxed commands with their own timeouts and limits, so compile time never eats into the run
timeout. Verdicts:
  passed         the program exited 0 (JavaScript: and printed nothing, console.assert only prints)
  failed         with a reason: the assertion / exception / signal, "output limit exceeded", ...
  timed out      the run took longer than the run timeout (the whole sandbox was killed)
  compile error  with the compiler's first error line (or its timeout)
  skipped        the language's toolchain is missing (the reason says what to install)

Results are cached by the SHA-256 of (evaluator version, language, toolchain fingerprint, limits,
program text): a rerun only executes programs that changed. Timeouts and skips are not cached, so
they are retried (a loaded machine can time out a correct program).
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import hashlib
import json
import os
import pathlib
import queue
import re
import shutil
import tempfile
import threading
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from geex_jax import fileio
from geex_jax.humaneval_x import sandbox as sandbox_lib
from geex_jax.humaneval_x import toolchains
from geex_jax.humaneval_x.assembly import Assembled

# Bump when a change to assembly/drivers should invalidate cached verdicts.
EVALUATOR_VERSION = "1"

PASSED, FAILED, TIMED_OUT, COMPILE_ERROR, SKIPPED = (
  "passed",
  "failed",
  "timed out",
  "compile error",
  "skipped",
)

# Root mode: compiles run as this uid (fixed, so the shared Go cache keeps one owner); each worker
# runs programs as its own uid from a per-process block, so a fork bomb only exhausts its own
# process limit and the post-run sweep kills only its own leftovers.
COMPILE_UID = 61000
_RUN_UID_BASE = 100000
_RUN_UID_STRIDE = 256


@dataclasses.dataclass(frozen=True)
class Verdict:
  """The outcome of one program."""

  status: str  # one of PASSED, FAILED, TIMED_OUT, COMPILE_ERROR, SKIPPED
  reason: str = ""
  compile_s: float = 0.0
  run_s: float = 0.0
  cached: bool = False

  @property
  def passed(self) -> bool:
    return self.status == PASSED

  @property
  def text(self) -> str:
    """ "passed", "failed: AssertionError", "timed out", "compile error: ..."."""
    return f"{self.status}: {self.reason}" if self.reason else self.status

  def to_json(self) -> dict:
    return {
      "status": self.status,
      "reason": self.reason,
      "compile_s": round(self.compile_s, 3),
      "run_s": round(self.run_s, 3),
    }


# Lines that say why a program failed, strongest first: a panic / assertion / exception beats a
# generic "error" or "FAIL" line, which beats the last line printed.
_REASONS = [
  re.compile(p)
  for p in (
    r"panicked at|AssertionError|Assertion .*failed|Assertion failed|assertion",
    r"\w+(Error|Exception)\b|terminate called|Segmentation|Abort",
    r"error|Error|--- FAIL|FAIL",
  )
]


def _reason(*texts: str, prefer_last: bool = False) -> str:
  """A one-line reason from compiler / program output (the first text with any output wins).

  A matching line that ends with ':' is joined with the next one (Rust: "panicked at f.rs:3:5:"
  then the assertion message). `prefer_last`: the last match (Python tracebacks end with it).
  """
  for text in texts:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if not lines:
      continue
    for pattern in _REASONS:
      hits = [i for i, l in enumerate(lines) if pattern.search(l)]
      if hits:
        i = hits[-1] if prefer_last else hits[0]
        line = lines[i]
        if line.endswith(":") and i + 1 < len(lines):
          line += " " + lines[i + 1]
        return line[:240]
    return lines[-1][:240]
  return ""


def _signal_reason(sig: int) -> str:
  import signal as signal_mod

  try:
    name = signal_mod.Signals(sig).name
  except ValueError:
    name = f"signal {sig}"
  if name == "SIGXFSZ":
    return "output limit exceeded (SIGXFSZ)"
  if name == "SIGXCPU":
    return "CPU time limit exceeded (SIGXCPU)"
  return f"killed by {name}"


class Executor:
  """Runs programs of any HumanEval-X language.

  Args:
    workers: parallel programs (default: number of cores).
    cache_dir: where verdicts are cached (None: no cache).
    toolchain_dir: shared toolchain state (js-md5, Go build cache, prebuilt Rust crates).
    run_timeout_s / compile_timeout_s: wall-clock limits of each step.
    memory_bytes: RLIMIT_DATA of a program run (default 2 GiB; room for the JVM's 1 GiB heap).
  """

  def __init__(
    self,
    workers: Optional[int] = None,
    cache_dir: Optional[os.PathLike] = None,
    toolchain_dir: Optional[os.PathLike] = None,
    run_timeout_s: float = 10.0,
    compile_timeout_s: float = 60.0,
    memory_bytes: Optional[int] = None,
  ):
    # Each worker owns one uid of a block of _RUN_UID_STRIDE.
    self.workers = min(_RUN_UID_STRIDE, max(1, workers or os.cpu_count() or 1))
    self.toolchain_dir = pathlib.Path(toolchain_dir or toolchains.default_toolchain_dir())
    self.cache_dir = pathlib.Path(cache_dir) if cache_dir else None
    self.drivers = {
      k: toolchains.make_driver(
        k, self.toolchain_dir, run_timeout_s, compile_timeout_s, memory_bytes
      )
      for k in toolchains.DRIVERS
    }
    self._missing: dict[str, Optional[str]] = {}
    self._prepared: set[str] = set()
    self._fingerprints: dict[str, str] = {}
    self._lock = threading.Lock()
    self.root = sandbox_lib.is_root()
    base = _RUN_UID_BASE + (os.getpid() % 10000) * _RUN_UID_STRIDE
    self._slots: "queue.Queue[Optional[int]]" = queue.Queue()
    for i in range(self.workers):
      self._slots.put(base + i if self.root else None)

  # -- toolchains ------------------------------------------------------------------------------

  def missing(self, language: str) -> Optional[str]:
    """None when `language` can run here, else why not (checked once)."""
    with self._lock:
      if language not in self._missing:
        reason = sandbox_lib.probe()
        if reason is None:
          reason = self.drivers[language].missing()
        if reason is None and language not in self._prepared:
          try:
            self.drivers[language].prepare()
            self._prepared.add(language)
          except (toolchains.ToolchainError, OSError) as e:
            reason = str(e)
        self._missing[language] = reason
      return self._missing[language]

  def available(self, languages: Iterable[str]) -> dict[str, Optional[str]]:
    """{language: None if runnable else the reason}."""
    return {k: self.missing(k) for k in languages}

  # -- cache -----------------------------------------------------------------------------------

  def cache_key(self, program: Assembled) -> str:
    d = self.drivers[program.language]
    with self._lock:
      if program.language not in self._fingerprints:  # version commands are slow (JVM)
        self._fingerprints[program.language] = d.fingerprint()
    head = json.dumps(
      [
        EVALUATOR_VERSION,
        program.language,
        self._fingerprints[program.language],
        dataclasses.astuple(d.run_limits),
        dataclasses.astuple(d.compile_limits),
      ]
    )
    return hashlib.sha256((head + "\0" + program.source).encode()).hexdigest()

  def _cache_path(self, key: str) -> Optional[pathlib.Path]:
    return self.cache_dir / key[:2] / f"{key}.json" if self.cache_dir else None

  def _cache_get(self, key: str) -> Optional[Verdict]:
    path = self._cache_path(key)
    if not path or not path.is_file():
      return None
    try:
      d = json.loads(path.read_text())
      return Verdict(
        d["status"], d.get("reason", ""), d.get("compile_s", 0.0), d.get("run_s", 0.0), cached=True
      )
    except (OSError, ValueError, KeyError):
      return None  # a damaged entry is recomputed

  def _cache_put(self, key: str, verdict: Verdict) -> None:
    path = self._cache_path(key)
    if not path or verdict.status in (TIMED_OUT, SKIPPED) or "timed out" in verdict.reason:
      return
    fileio.write_atomic(path, json.dumps(verdict.to_json()))

  # -- running ---------------------------------------------------------------------------------

  def run_one(self, program: Assembled, uid: Optional[int] = None) -> Verdict:
    """Compiles and runs one program (no cache); `uid`: the worker's run uid in root mode."""
    reason = self.missing(program.language)
    if reason:
      return Verdict(SKIPPED, reason)
    d = self.drivers[program.language]
    box = sandbox_lib.Sandbox(ro_paths=[p for p in d.ro_paths() if p and os.path.exists(p)])
    work = tempfile.mkdtemp(prefix=f"geex-{program.language}-")
    try:
      os.chmod(work, 0o755)
      src = pathlib.Path(work) / d.filename
      src.write_text(d.file_text(program.source), encoding="utf-8")
      os.chmod(src, 0o644)
      compile_s = 0.0
      if d.compiled:
        if self.root:
          os.chown(work, COMPILE_UID, COMPILE_UID)
        out = box.run(
          d.compile_argv(program.source),
          workdir=work,
          limits=d.compile_limits,
          uid=COMPILE_UID if self.root else None,
          env=d.compile_env(),
          workdir_writable=True,
          rw_paths=d.compile_rw_paths(),
          umask=0,
        )
        compile_s = out.duration_s
        if out.timed_out:
          return Verdict(
            COMPILE_ERROR,
            f"compilation timed out after {d.compile_limits.timeout_s:g} s",
            compile_s,
          )
        if out.returncode != 0:
          return Verdict(
            COMPILE_ERROR,
            _reason(out.stderr, out.stdout) or f"compiler exit code {out.returncode}",
            compile_s,
          )
      out = box.run(
        d.run_argv(),
        workdir=work,
        limits=d.run_limits,
        uid=uid,
        env=d.run_env(),
        sweep_uid=uid is not None,
      )
      if out.timed_out:
        return Verdict(TIMED_OUT, "", compile_s, out.duration_s)
      if d.passed(out.returncode, out.stdout_bytes, out.stderr_bytes):
        return Verdict(PASSED, "", compile_s, out.duration_s)
      if out.output_limited:
        why = "output limit exceeded"
      elif out.signal and out.signal != 6:  # SIGABRT: the message (assert, terminate) says more
        why = _signal_reason(out.signal)
      else:
        why = (
          _reason(out.stderr, out.stdout, prefer_last=program.language == "python")
          or f"exit code {out.returncode}"
        )
      return Verdict(FAILED, why, compile_s, out.duration_s)
    finally:
      shutil.rmtree(work, ignore_errors=True)

  def _run_cached(self, program: Assembled) -> Verdict:
    reason = self.missing(program.language)
    if reason:
      return Verdict(SKIPPED, reason)
    key = self.cache_key(program)
    hit = self._cache_get(key)
    if hit:
      return hit
    uid = self._slots.get()
    try:
      verdict = self.run_one(program, uid)
    finally:
      self._slots.put(uid)
    self._cache_put(key, verdict)
    return verdict

  def execute(
    self, programs: Sequence[Assembled], progress: bool = True, desc: str = "executing"
  ) -> list[Verdict]:
    """Verdicts for `programs`, in order. Identical programs run once."""
    for lang in sorted({p.language for p in programs}):
      self.missing(lang)  # prepare toolchains before the workers start
    first: dict[tuple[str, str], int] = {}
    for i, p in enumerate(programs):
      first.setdefault((p.language, p.source), i)
    unique = sorted(set(first.values()))
    results: dict[int, Verdict] = {}
    with (
      futures.ThreadPoolExecutor(max_workers=self.workers) as pool,
      tqdm(
        total=len(unique), desc=desc, disable=not progress, unit="prog", dynamic_ncols=True
      ) as bar,
    ):
      todo = {pool.submit(self._run_cached, programs[i]): i for i in unique}
      try:
        for fut in futures.as_completed(todo):
          results[todo[fut]] = fut.result()
          bar.update(1)
      except BaseException:
        for f in todo:
          f.cancel()
        raise
    return [results[first[(p.language, p.source)]] for p in programs]
