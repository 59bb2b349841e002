"""The bounded, in-order produce -> write pipeline that streams a checkpoint tensor by tensor.

Both the Orbax writer of a converted checkpoint (`checkpoints.save_params_streaming`) and the
PyTorch writer of `geex-convert jax-to-torch` run their tensors through `run`: the read of one
tensor, the conversion of the next and the write of the one before overlap, while at most a
budget of converted bytes is held in memory. Both sync what they wrote with `BackgroundSync`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable, Iterable, Optional

from geex_jax import fileio

# Converted data allowed in flight (started, not yet written), though always two items (one being
# produced while the other is written): at 2.7B, 64 MB measured ~20% slower than 128 MB, and
# 256 MB no faster but ~150 MB more at peak (of the 1.33 GB that the 25%-of-the-checkpoint
# memory target allows).
BUDGET_BYTES = 128 << 20

_SKIPPED = object()  # what produce gives once an earlier item failed


def run(
  items: Iterable,
  *,
  produce: Callable[[Any, Any], Any],
  write: Callable[[Any, Any], None],
  nbytes: Callable[[Any], int],
  start: Optional[Callable[[Any], Any]] = None,
  writers: int = 1,
  budget: int = BUDGET_BYTES,
) -> None:
  """For each item, in order: `started = start(item)` on the calling thread when the item enters
  the window (start a read, a prefetch), `produced = produce(item, started)` on the one producer
  thread (items are produced in order; a producer may itself use every core, as XLA does), then
  `write(item, produced)` on one of `writers` threads (in order if `writers` is 1).

  At most `budget` bytes (by `nbytes(item)`) are between start and the end of their write, but
  always two items. The first error stops the work not yet begun and is raised once everything
  in flight has finished (a write landing after the caller removed a partial output would
  recreate it).
  """
  failed = threading.Event()

  def run_produce(item, started):
    if failed.is_set():
      return _SKIPPED
    try:
      return produce(item, started)
    except BaseException:
      failed.set()
      raise

  def run_write(item, produced):
    try:
      data = produced.result()  # raises what produce raised
      if data is not _SKIPPED and not failed.is_set():
        write(item, data)
    except BaseException:
      failed.set()
      raise

  window: collections.deque = collections.deque()  # (write future, nbytes), oldest first
  in_flight = 0
  with (
    concurrent.futures.ThreadPoolExecutor(1, "geex-produce") as producer,
    concurrent.futures.ThreadPoolExecutor(writers, "geex-write") as writer,
  ):
    try:
      for item in items:
        if failed.is_set():
          break
        size = nbytes(item)
        while len(window) >= 2 and in_flight + size > budget:
          done, done_size = window.popleft()
          done.result()
          in_flight -= done_size
        started = start(item) if start is not None else None
        produced = producer.submit(run_produce, item, started)
        window.append((writer.submit(run_write, item, produced), size))
        in_flight += size
      while window:
        window.popleft()[0].result()
    except BaseException:
      failed.set()
      concurrent.futures.wait([f for f, _ in window])
      raise


class BackgroundSync:
  """fsyncs files on a background thread as they are written, so the disk writes them while the
  work goes on and the final sync has little left to wait for (at 2.7B, ~1 s when it was all
  left to the end). Use as a context manager; leaving it waits for the syncs started.

  `sync(path)` makes sure an fsync of `path` starts after the call: a sync of the same path
  still queued covers it, so a file that keeps growing has at most one sync running and one
  queued. Errors surface from `wait()`.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, "geex-sync")
    self._queued: dict[str, concurrent.futures.Future] = {}
    self._futures: list[concurrent.futures.Future] = []

  def sync(self, path) -> None:
    path = str(path)
    queued = self._queued.get(path)
    if queued is not None and not (queued.running() or queued.done()):
      return
    future = self._pool.submit(fileio.fsync_path, path)
    self._queued[path] = future
    self._futures.append(future)

  def wait(self) -> None:
    """Waits for every sync started; raises the first error."""
    self._pool.shutdown(wait=True)
    for future in self._futures:
      future.result()

  def __enter__(self) -> "BackgroundSync":
    return self

  def __exit__(self, *exc) -> None:
    if exc[0] is None:
      self.wait()
    else:
      self._pool.shutdown(wait=True)  # an error is on its way: do not mask it
