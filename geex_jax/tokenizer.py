"""The CodeGeeX tokenizer (GPT-2 byte-level BPE + whitespace tokens) and a byte-level fallback.

Plain Python, no TensorFlow: the sampler, the evaluator and the data pipeline all use this module;
`geex_jax.data.vocabulary` wraps it as a `seqio.Vocabulary` for TF graphs.

CodeGeeX replaces every run of n spaces, 2 <= n <= 10, by `<|extratoken_{n+8}|>` (id 50264 + n)
before BPE, longest runs first (13 spaces -> the 10-space token, then the 3-space token). We split
the text at those runs instead of substituting marker strings, so a source file that happens to
contain the literal text `<|extratoken_12|>` or `<|endoftext|>` still round-trips exactly.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Iterable, Optional, Protocol, Sequence

from geex_jax.errors import InputError

EOS_ID = 50256  # <|endoftext|>: end of document, also the padding id
VOCAB_SIZE = 50400  # 50257 GPT-2 ids + <|extratoken_1..143|>
_WS_MIN, _WS_MAX = 2, 10  # space runs that get their own token
_WS_BASE = 50264  # id of a run of n spaces = _WS_BASE + n
_REQUIRED_FILES = ("vocab.json", "merges.txt")
_SPACE_RUN = re.compile(r" {2,}")


class Tokenizer(Protocol):
  """What the rest of the project needs from a tokenizer."""

  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Iterable[int]) -> str: ...


def _whitespace_ids(n: int) -> list[int]:
  """Ids for a run of n >= 2 spaces: full 10-space tokens first, then the rest."""
  ids = [_WS_BASE + _WS_MAX] * (n // _WS_MAX)
  rest = n % _WS_MAX
  if rest == 1:
    ids.append(None)  # a single trailing space is ordinary text; marked for the caller
  elif rest:
    ids.append(_WS_BASE + rest)
  return ids


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
  """GPT-2's printable-character alias of each byte, inverted (char -> byte value)."""
  # Bytes that are printable Latin-1 stand for themselves; the other 68 are shifted to 256+.
  keep = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + extra)] = b
      extra += 1
  return chars


class CodeGeeXTokenizer:
  """Encodes/decodes text exactly as the released CodeGeeX tokenizer does.

  Use `CodeGeeXTokenizer.from_dir(DIR)` with DIR holding the released `vocab.json`, `merges.txt`
  (and `added_tokens.json`). Ids: 0..50255 BPE, 50256 `<|endoftext|>`, 50257..50399 extratokens.
  """

  eos_id = EOS_ID
  pad_id = EOS_ID

  def __init__(self, bpe, id_bytes: Sequence[bytes], directory: str):
    self._bpe = bpe
    self._id_bytes = id_bytes
    self.directory = directory
    self.vocab_size = len(id_bytes)

  @classmethod
  def from_dir(cls, directory: str | os.PathLike) -> "CodeGeeXTokenizer":
    """Loads the released tokenizer files; InputError when they are missing or unreadable."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    directory = os.fspath(directory)
    missing = [f for f in _REQUIRED_FILES if not os.path.isfile(os.path.join(directory, f))]
    if missing:
      raise InputError(
        f"tokenizer directory {directory!r} lacks {', '.join(missing)} "
        "(expected the released CodeGeeX tokenizer files)"
      )
    vocab_path = os.path.join(directory, "vocab.json")
    try:
      bpe = HFTokenizer(models.BPE.from_file(vocab_path, os.path.join(directory, "merges.txt")))
      with open(vocab_path, encoding="utf-8") as f:
        vocab = json.load(f)
      added = {}
      added_path = os.path.join(directory, "added_tokens.json")
      if os.path.isfile(added_path):
        with open(added_path, encoding="utf-8") as f:
          added = json.load(f)
    except Exception as e:  # tokenizers raises plain Exception, json ValueError, open OSError
      raise InputError(f"cannot read tokenizer files in {directory!r}: {e}") from None
    # No added tokens are registered with the BPE model: special strings in source text must be
    # encoded as ordinary text (whitespace runs are handled by splitting, see module docstring).
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    size = max([*vocab.values(), *added.values()]) + 1
    if size < EOS_ID + 1:
      raise InputError(f"tokenizer in {directory!r} has {size} ids; CodeGeeX needs >= {EOS_ID + 1}")
    # Decoding is a table lookup: every id maps to its bytes; a whitespace id maps to its spaces.
    byte_of = _byte_decoder()
    id_bytes: list[bytes] = [b""] * size
    for token, i in vocab.items():
      id_bytes[i] = bytes(byte_of[c] for c in token) if i != EOS_ID else token.encode()
    for token, i in added.items():
      id_bytes[i] = token.encode()
    for n in range(_WS_MIN, _WS_MAX + 1):
      id_bytes[_WS_BASE + n] = b" " * n
    return cls(bpe, id_bytes, directory)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no EOS appended)."""
    if "  " not in text:
      return self._bpe.encode(text).ids if text else []
    # Split at space runs: BPE the text between them, insert the whitespace ids. A run leaving
    # one space over keeps that space in front of the next piece, as the reference's BPE sees it.
    ids: list[int] = []
    pieces: list[str] = []
    slots: list[tuple[int, int]] = []  # (index in ids where a BPE piece goes, piece number)
    start = 0
    carry = ""
    for m in _SPACE_RUN.finditer(text):
      piece = carry + text[start : m.start()]
      if piece:
        slots.append((len(ids), len(pieces)))
        pieces.append(piece)
      ws = _whitespace_ids(m.end() - m.start())
      carry = " " if ws[-1] is None else ""
      ids.extend(i for i in ws if i is not None)
      start = m.end()
    piece = carry + text[start:]
    if piece:
      slots.append((len(ids), len(pieces)))
      pieces.append(piece)
    encoded = [e.ids for e in self._bpe.encode_batch_fast(pieces)] if pieces else []
    out: list[int] = []
    prev = 0
    for at, k in slots:
      out.extend(ids[prev:at])
      out.extend(encoded[k])
      prev = at
    out.extend(ids[prev:])
    return out

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; EOS decodes to `<|endoftext|>`; invalid UTF-8 becomes U+FFFD."""
    table = self._id_bytes
    try:
      raw = b"".join([table[int(i)] for i in ids])
    except IndexError:
      bad = [int(i) for i in ids if not 0 <= int(i) < len(table)]
      raise InputError(f"token ids out of range 0..{len(table) - 1}: {bad[:5]}") from None
    return raw.decode("utf-8", errors="replace")


class ByteTokenizer:
  """The fallback when no tokenizer files are at hand (embedded demo): one id per UTF-8 byte, plus
  CodeGeeX's whitespace tokens.

  Ids 0..255 are bytes, 256 is EOS (also padding), 257 + (n - 2) is a run of n spaces for
  2 <= n <= 10 (split as CodeGeeX splits: 10-space runs first, a single space left over is the byte
  32); vocab_size 266. Without the runs, a small model spends its capacity counting indentation
  one space at a time (the demo's measured failure: completions of nothing but spaces).
  """

  eos_id = 256
  pad_id = 256
  vocab_size = 257 + (_WS_MAX - _WS_MIN + 1)
  directory = None
  _RUN_BASE = 257 - _WS_MIN  # id of a run of n spaces = _RUN_BASE + n

  def encode(self, text: str) -> list[int]:
    raw = text.encode("utf-8")
    if b"  " not in raw:
      return list(raw)
    ids: list[int] = []
    start = 0
    for m in _SPACE_RUN.finditer(text):
      ids.extend(text[start : m.start()].encode("utf-8"))
      ids.extend(
        32 if i is None else i - _WS_BASE + self._RUN_BASE
        for i in _whitespace_ids(m.end() - m.start())
      )
      start = m.end()
    ids.extend(text[start:].encode("utf-8"))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    out = bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        out.append(i)
      elif i == self.eos_id:
        out += b"<|endoftext|>"
      elif 257 <= i < self.vocab_size:
        out += b" " * (i - self._RUN_BASE)
      else:
        raise InputError(
          f"token id {i} out of range for the byte tokenizer (0..{self.vocab_size - 1})"
        )
    return out.decode("utf-8", errors="replace")


def load_tokenizer(directory: Optional[str | os.PathLike]) -> Tokenizer:
  """CodeGeeXTokenizer from `directory` (local or gs://), or the ByteTokenizer fallback when it is
  None/empty."""
  from geex_jax import fileio

  if directory is None or os.fspath(directory) == "":
    return ByteTokenizer()
  if fileio.is_url(directory):
    return _cached_from_url(os.fspath(directory).rstrip("/"))
  if not os.path.isdir(directory):
    raise InputError(f"tokenizer directory {os.fspath(directory)!r} does not exist")
  return _cached_from_dir(os.path.abspath(os.fspath(directory)))


@functools.lru_cache(maxsize=4)
def _cached_from_url(url: str) -> CodeGeeXTokenizer:
  """A tokenizer directory on remote storage: its files are read through epath into a local
  temporary directory (the `tokenizers` library reads local files only) and loaded from there."""
  import tempfile
  from geex_jax import fileio

  remote = fileio.as_path(url)
  if not remote.is_dir():
    raise InputError(f"tokenizer directory {url!r} does not exist")
  missing = [f for f in _REQUIRED_FILES if not (remote / f).is_file()]
  if missing:
    raise InputError(
      f"tokenizer directory {url!r} lacks {', '.join(missing)} "
      "(expected the released CodeGeeX tokenizer files)"
    )
  with tempfile.TemporaryDirectory(prefix="geex-tokenizer-") as local:
    for name in (*_REQUIRED_FILES, "added_tokens.json"):
      if name in _REQUIRED_FILES or (remote / name).is_file():
        fileio.copy_file(remote / name, os.path.join(local, name))
    try:
      tokenizer = CodeGeeXTokenizer.from_dir(local)
    except InputError as e:  # name the URL, not the temporary copy
      raise InputError(str(e).replace(repr(local), repr(url))) from None
  tokenizer.directory = url
  return tokenizer


def as_tokenizer(tokenizer: Any) -> Tokenizer:
  """A tokenizer object for an argument that may name one.

  A path (str or os.PathLike) or None is a directory of tokenizer files (None / "" = the byte
  fallback), loaded by `load_tokenizer`; anything else must already be a tokenizer. (Duck typing
  on `.encode` is wrong here: `str` has an `encode` method too.)
  """
  if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
    return load_tokenizer(tokenizer)
  missing = [a for a in ("encode", "decode", "vocab_size", "eos_id") if not hasattr(tokenizer, a)]
  if missing:
    raise InputError(
      f"{type(tokenizer).__name__} is neither a tokenizer directory nor a "
      f"tokenizer (it lacks {', '.join(missing)})"
    )
  return tokenizer


@functools.lru_cache(maxsize=4)
def _cached_from_dir(directory: str) -> CodeGeeXTokenizer:
  # Loading parses a 1 MB vocab; tasks, pipeline and sampler share one instance per directory.
  return CodeGeeXTokenizer.from_dir(directory)
