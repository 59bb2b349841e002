"""What a run reports: MODEL_DIR/metrics.jsonl (one line per step, rewritten on resume so it
reads like one uninterrupted run, uploaded when on gs://), TensorBoard events, the console progress
bar, and the peak FLOP/s table behind the MFU figure."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Optional

import jax

from geex_jax import fileio

METRICS_FILE = "metrics.jsonl"


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s per device (dense bf16, the usual MFU denominator). Matched as a substring of
# jax.Device.device_kind; `train.peak_flops_per_device` overrides (and is the only way on CPU).
PEAK_FLOPS = (
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5e", 197e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
  ("TPU v3", 61.5e12),  # v3: per core (= JAX device)
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("A10", 125e12),
  ("V100", 125e12),
)


def peak_flops(device: jax.Device, override: Optional[float] = None) -> Optional[float]:
  if override:
    return float(override)
  kind = getattr(device, "device_kind", "")
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


class MetricsLog:
  """MODEL_DIR/metrics.jsonl: one JSON line per step, local or gs://.

  Opening it for a run that starts at step `start` drops the lines of later steps (a killed run
  logged steps past its last checkpoint; this run logs them again) and a line torn by a kill,
  rewriting the file whole, so that the log reads like one uninterrupted run. Locally the lines
  are then appended line-buffered (a killed run keeps every line it wrote). A gs:// object cannot
  be appended to: the lines go to a local copy, and the whole file is uploaded at every checkpoint
  (`sync(force=True)`), otherwise at most every `upload_every_s` seconds, and at the end; a kill
  loses at most the lines since the last upload, steps a resumed run logs again anyway.
  """

  def __init__(self, path, start: int, upload_every_s: float = 60.0):
    self.path, self.remote = path, fileio.is_url(path)
    self.upload_every_s = upload_every_s
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = "".join(line + "\n" for line in _lines_up_to(text, start))
    if kept != text:
      fileio.write_atomic(path, kept)
    if self.remote:
      self._file = tempfile.NamedTemporaryFile(
        "w+", encoding="utf-8", prefix="geex-metrics-", suffix=".jsonl", buffering=1
      )
      self._file.write(kept)
    else:
      self._file = open(path, "a", encoding="utf-8", buffering=1)
    self._dirty, self._uploaded = False, time.monotonic()

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._dirty = True
    self.sync()

  def sync(self, force: bool = False) -> None:
    """Uploads the whole log (gs:// only) if lines were added and `force` or it is time."""
    if not (self.remote and self._dirty):
      return
    if not force and time.monotonic() - self._uploaded < self.upload_every_s:
      return
    self._file.flush()
    self._file.seek(0)
    text = self._file.read()
    fileio.write_atomic(self.path, text)
    self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    try:
      self.sync(force=True)
    finally:
      self._file.close()


def _lines_up_to(text: str, start: int) -> list[str]:
  """The lines of a metrics log that a run resuming at step `start` keeps: no step > start, no
  blank or torn (unparseable) line."""
  kept = []
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # blank, or torn by a kill
      continue
    step = rec.get("step") if isinstance(rec, dict) else None
    if isinstance(step, int) and step > start:
      continue
    kept.append(line)
  return kept


def tensorboard_tag(key: str) -> str:
  """The TensorBoard tag of a metrics key: held-out values under eval/ (`eval_loss/python` ->
  `eval/loss/python`), the rest under train/."""
  if key.startswith("eval_"):
    return "eval/" + key[len("eval_") :]
  return f"train/{key}"


class Reporter:
  """Console progress bar, TensorBoard events and MODEL_DIR/metrics.jsonl (process 0 only)."""

  def __init__(
    self, model_dir, start: int, total: int, enabled: bool, progress: bool, tensorboard: bool
  ):
    self.enabled = enabled
    self.bar = self.tb = self.jsonl = None
    if not enabled:
      return
    self.jsonl = MetricsLog(model_dir / METRICS_FILE, start)
    if tensorboard:
      from tensorboardX import SummaryWriter

      # tensorboardX writes gs:// itself (google-cloud-storage), as MaxText's writer does.
      self.tb = SummaryWriter(os.fspath(model_dir / "tensorboard"))
    if progress:
      from tqdm import tqdm

      # Into a log file (not a terminal) a redraw every 0.1 s is noise: every 30 s there.
      self.bar = tqdm(
        total=total,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
      )

  def step(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.jsonl.write({"step": step, **metrics})
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(tensorboard_tag(k), v, step)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
      if "tokens_per_s" in metrics:
        shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
      if "mfu" in metrics:
        shown["mfu"] = f"{metrics['mfu']:.1%}"
      self.bar.set_postfix(shown, refresh=False)

  def checkpointed(self) -> None:
    """A checkpoint was saved: bring the remote metrics log up to date."""
    if self.jsonl is not None:
      self.jsonl.sync(force=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def read_metrics(model_dir: os.PathLike) -> dict[int, dict]:
  """{step: metrics} from MODEL_DIR/metrics.jsonl; a step logged twice (re-run after a resume)
  keeps its last record."""
  out = {}
  path = fileio.as_path(model_dir) / METRICS_FILE
  if path.exists():
    for _, rec in fileio.iter_jsonl(path, skip_invalid=True):  # skips blank and torn lines
      out[rec["step"]] = rec
  return out
