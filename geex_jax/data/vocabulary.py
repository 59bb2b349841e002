"""The CodeGeeX tokenizer (or the byte fallback) as a `seqio.Vocabulary`, usable in TF graphs.

TF-graph encode/decode call the plain Python tokenizer through `tf.numpy_function`: the BPE runs
in the `tokenizers` library either way, and one implementation means one behaviour.
"""

from __future__ import annotations


from typing import Optional, Sequence

import numpy as np
import seqio

from geex_jax import fileio
from geex_jax.data.tf_import import import_tf
from geex_jax.tokenizer import load_tokenizer

tf = import_tf()


class CodeGeeXVocabulary(seqio.Vocabulary):
  """seqio view of `geex_jax.tokenizer`: EOS = pad = 50256 (256 for the byte fallback).

  Args:
    tokenizer_dir: the released tokenizer files; None = byte-level fallback.
  """

  def __init__(self, tokenizer_dir: Optional[str] = None):
    self.tokenizer_dir = fileio.resolve(tokenizer_dir) if tokenizer_dir else None
    self.tokenizer = load_tokenizer(self.tokenizer_dir)
    super().__init__(extra_ids=0)

  @property
  def eos_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def pad_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def unk_id(self) -> Optional[int]:
    return None  # byte-level BPE has no unknowns

  @property
  def _base_vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  def _encode(self, s: str) -> Sequence[int]:
    return self.tokenizer.encode(s)

  def _decode(self, ids) -> str:
    # seqio's decode() cuts after the first EOS; the text itself excludes it.
    return self.tokenizer.decode(i for i in ids if i != self.eos_id)

  def _encode_np(self, s) -> np.ndarray:
    s = s.item() if isinstance(s, np.ndarray) else s  # eager mode hands over a 0-d array
    return np.asarray(self.tokenizer.encode(s.decode("utf-8")), np.int32)

  def _encode_tf(self, s):
    """Scalar string -> int32 [length]; rank-1 strings -> RaggedTensor [batch, None]."""
    if s.shape.rank == 0:
      ids = tf.numpy_function(self._encode_np, [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids
    return tf.map_fn(self._encode_tf, s, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32))

  def _decode_np(self, ids: np.ndarray) -> np.ndarray:
    if ids.ndim == 1:
      return np.asarray(self._decode(ids.tolist()).encode("utf-8"), dtype=object)
    return np.asarray([self._decode(row.tolist()).encode("utf-8") for row in ids], dtype=object)

  def _decode_tf(self, ids):
    """int [length] -> scalar string; int [batch, length] -> string [batch]."""
    out = tf.numpy_function(self._decode_np, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out

  def __eq__(self, other) -> bool:
    return isinstance(other, CodeGeeXVocabulary) and other.tokenizer_dir == self.tokenizer_dir

  def __hash__(self) -> int:
    return hash((CodeGeeXVocabulary, self.tokenizer_dir))
