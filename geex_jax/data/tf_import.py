"""The one way this package imports TensorFlow: quiet, and kept off every GPU (JAX owns them)."""

from __future__ import annotations

import os


def import_tf():
  """Returns the `tensorflow` module with GPUs hidden from it."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TF warns about CUDA it must not use
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TF already initialised its devices (someone imported it first); nothing to undo
  return tf
