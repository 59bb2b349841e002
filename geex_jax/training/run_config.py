"""The operative gin config of a run, kept as MODEL_DIR/config.gin (as t5x does).

A run that starts writes its bindings there. A resume compares its own with them: bindings that
change what is learned (the model, the data, the optimizer, the schedule, the seed) must be the
same, or the resume stops and names them, unless `allow_config_change` is set; then they are
reported and config.gin is rewritten. The bindings in RESUME_SAFE (how long to run, how often to
checkpoint or evaluate, what to print) may change freely.
"""

from __future__ import annotations

from typing import Optional

import gin

from geex_jax import fileio
from geex_jax.errors import ConfigError

CONFIG_GIN = "config.gin"

# Bindings a resume may change without changing what the run learns.
RESUME_SAFE = frozenset(
  {
    "MODEL_DIR",
    "TRAIN_STEPS",
    "train.model_dir",
    "train.num_steps",
    "train.stop_at_step",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.async_checkpointing",
    "train.progress",
    "train.tensorboard",
    "train.init_from",
    "train.allow_config_change",
    "train.peak_flops_per_device",
    "train.eval_every",
    "train.eval_batches",
    "train.eval_source",  # what is scored, not what is learned
    "heldout_batches.corpus_dir",
    "heldout_batches.tokenizer_dir",
    "heldout_batches.languages",
    "train.profile_start_step",
    "train.profile_steps",
    "synthetic_batches.delay_s",  # pacing of the test source, not its data
  }
)


def parse_bindings(text: str) -> dict[str, str]:
  """{binding: value text} of a config in gin.config_str()'s format (a value may continue on
  indented lines; comments and blank lines are skipped)."""
  out: dict[str, str] = {}
  key = None
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith("#"):
      continue
    if line[0].isspace() and key is not None:
      out[key] += " " + line.strip()
      continue
    name, sep, value = line.partition("=")
    if not sep or name.strip().startswith(("import ", "include ", "from ")):
      key = None
      continue
    key = name.strip()
    out[key] = value.strip()
  return out


def differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
  """'KEY: OLD -> NEW' for each binding that differs, outside RESUME_SAFE."""
  diff = []
  for key in sorted(set(old) | set(new)):
    if key in RESUME_SAFE or old.get(key) == new.get(key):
      continue
    diff.append(f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
  return diff


def record(model_dir, *, resuming: bool, allow_change: bool, write: bool) -> Optional[str]:
  """Checks (on resume) and writes MODEL_DIR/config.gin; returns a message to show, if any.

  model_dir: an epath.Path (fileio.as_path). write: this process writes (process 0)."""
  text = gin.config_str()
  path = model_dir / CONFIG_GIN
  message = None
  if resuming and path.exists():
    diff = differences(parse_bindings(path.read_text()), parse_bindings(text))
    if diff and not allow_change:
      raise ConfigError(
        f"this resume changes the run's config ({path}): "
        + "; ".join(diff)
        + ". Resume with the same bindings, or pass --allow_config_change to "
        "continue with the new ones on purpose"
      )
    if diff:
      message = "config changed on resume (--allow_config_change): " + "; ".join(diff)
  if write:
    fileio.write_atomic(path, text)
  return message
