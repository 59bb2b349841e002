"""geex_jax/model/streaming.py: the bounded in-order produce -> write pipeline."""

import threading
import time

import pytest

from geex_jax.model import streaming


def test_items_are_written_in_order_with_what_start_and_produce_gave():
  written = []
  streaming.run(
    range(20),
    start=lambda i: i * 10,
    produce=lambda i, s: (i, s + 1),
    write=lambda i, data: written.append((i, data)),
    nbytes=lambda i: 1,
  )
  assert written == [(i, (i, i * 10 + 1)) for i in range(20)]


@pytest.mark.parametrize("writers", [1, 2])
def test_bytes_in_flight_stay_within_the_budget(writers):
  lock, in_flight, peak = threading.Lock(), [0], [0]

  def start(i):
    with lock:
      in_flight[0] += 10
      peak[0] = max(peak[0], in_flight[0])

  def write(i, data):
    time.sleep(0.002)  # a slow disk: the producer runs ahead as far as it may
    with lock:
      in_flight[0] -= 10

  streaming.run(
    range(30),
    start=start,
    produce=lambda i, s: i,
    write=write,
    nbytes=lambda i: 10,
    budget=35,
    writers=writers,
  )
  assert in_flight[0] == 0
  assert 20 <= peak[0] <= 30  # three items of 10 fit in 35, a fourth does not


def test_an_oversized_item_still_moves_two_at_a_time():
  written = []
  streaming.run(
    range(5),
    produce=lambda i, s: i,
    write=lambda i, d: written.append(d),
    nbytes=lambda i: 1000,
    budget=10,
  )
  assert written == list(range(5))


@pytest.mark.parametrize("stage", ["produce", "write", "start"])
def test_the_first_error_is_raised_and_later_items_are_not_written(stage):
  written, produced = [], []

  def fail_at_3(where):
    def check(i, *rest):
      if where == stage and i == 3:
        raise RuntimeError(f"{where} failed at 3")
      return None

    return check

  def produce(i, s):
    fail_at_3("produce")(i)
    produced.append(i)
    return i

  def write(i, d):
    fail_at_3("write")(i)
    written.append(i)

  with pytest.raises(RuntimeError, match=f"{stage} failed at 3"):
    streaming.run(
      range(100),
      start=fail_at_3("start"),
      produce=produce,
      write=write,
      nbytes=lambda i: 1,
      budget=4,
    )
  # Nothing from the failed item on is written; earlier items may be skipped too once the
  # failure is known (the output is discarded anyway).
  assert written == [0, 1, 2][: len(written)]
  if stage == "write":
    assert written == [0, 1, 2]
  assert max(produced) < 10  # the pipeline stopped soon after the failure


def test_background_sync_queues_at_most_one_more_sync_per_file(monkeypatch, tmp_path):
  release, calls = threading.Event(), []

  def fake_fsync(path):
    calls.append(path)
    release.wait(5)

  monkeypatch.setattr(streaming.fileio, "fsync_path", fake_fsync)
  with streaming.BackgroundSync() as syncs:
    syncs.sync(tmp_path / "a")
    while not calls:  # the first sync is running (blocked)
      time.sleep(0.001)
    for _ in range(5):  # the file grows: one queued sync covers all of these
      syncs.sync(tmp_path / "a")
    syncs.sync(tmp_path / "b")
    release.set()
  assert calls == [str(tmp_path / "a")] * 2 + [str(tmp_path / "b")]


def test_background_sync_reports_a_failed_sync(tmp_path):
  with pytest.raises(FileNotFoundError):
    with streaming.BackgroundSync() as syncs:
      syncs.sync(tmp_path / "missing")
