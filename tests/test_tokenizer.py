"""geex_jax/tokenizer.py: the CodeGeeX tokenizer against the released files, and the fallback."""

import json
import os
import subprocess
import sys
import sysconfig
import time

import pytest

from geex_jax.errors import InputError
from geex_jax.tokenizer import ByteTokenizer, CodeGeeXTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
  return CodeGeeXTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def vocab(tokenizer_dir):
  with open(tokenizer_dir / "vocab.json", encoding="utf-8") as f:
    return json.load(f)


def test_whitespace_runs_map_to_released_extratokens(tok):
  assert tok.encode("    ") == [50268]  # issue's example: 4 spaces -> <|extratoken_12|>
  for n in range(2, 11):
    assert tok.encode(" " * n) == [50264 + n]
  assert tok.encode(" " * 13) == [50274, 50267]  # longest first: 10 + 3
  assert tok.encode(" " * 21) == [50274, 50274, tok.encode(" ")[0]]  # 10 + 10 + a plain space
  assert tok.encode("a" + " " * 11 + "b") == [tok.encode("a")[0], 50274, *tok.encode(" b")]


def test_ids_match_the_released_vocabulary(tok, vocab):
  assert tok.encode("def") == [vocab["def"]]
  assert tok.encode("hello world") == [vocab["hello"], vocab["\u0120world"]]  # \u0120 = space alias
  assert tok.encode("\n") == [vocab["\u010a"]]
  assert tok.eos_id == vocab["<|endoftext|>"] == 50256
  assert tok.vocab_size == 50400


@pytest.mark.parametrize(
  "text",
  [
    "",
    " ",
    "  ",
    "\t\t",
    "\n\n\n",
    " \n  \n   \n",
    "x" + " " * 37 + "y",
    "trailing   ",
    "   leading",
    "\t  mixed \t  tabs",
    "\r\n  crlf\r\n",
    "\u00a0 nbsp \u3000 ideographic  space",
    "emoji 🎉  and 中文  注释",
    "<|endoftext|>",
    "literal <|extratoken_12|> text",
    "\x00 control \x1b chars",
    "a" * 5000,
    " " * 1001,
  ],
)
def test_round_trip_edge_cases(tok, text):
  assert tok.decode(tok.encode(text)) == text


def test_decode_special_ids(tok):
  assert tok.decode([50256]) == "<|endoftext|>"
  assert tok.decode([50257]) == "<|extratoken_1|>"
  with pytest.raises(InputError):
    tok.decode([50400])


@pytest.mark.slow
def test_round_trip_over_the_python_standard_library(tok):
  """Every .py file of the running interpreter's stdlib (bounded at 120 s)."""
  root = sysconfig.get_paths()["stdlib"]
  checked, start = 0, time.time()
  for dirpath, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
    for name in sorted(files):
      if not name.endswith(".py"):
        continue
      try:
        with open(os.path.join(dirpath, name), encoding="utf-8") as f:
          text = f.read()
      except (UnicodeDecodeError, OSError):
        continue  # a few test fixtures are deliberately not UTF-8
      assert tok.decode(tok.encode(text)) == text, name
      checked += 1
      assert time.time() - start < 120, f"too slow: {checked} files in 120 s"
  assert checked > 500


def test_byte_fallback_round_trip():
  bt = ByteTokenizer()
  text = "déjà vu  \n\tok 🎉"
  assert bt.decode(bt.encode(text)) == text
  assert bt.eos_id == 256 and bt.vocab_size == 266
  assert bt.decode([104, 105, 256]) == "hi<|endoftext|>"


def test_byte_fallback_whitespace_runs():
  """Runs of 2..10 spaces are one id each (257 + n - 2), split as CodeGeeX splits them."""
  bt = ByteTokenizer()
  assert bt.encode("a b") == [97, 32, 98]  # a single space is a byte
  assert bt.encode("    x") == [259, 120]  # 4 spaces
  assert bt.encode(" " * 13) == [265, 258]  # 10 + 3
  assert bt.encode(" " * 11 + "y") == [265, 32, 121]  # 10 + the single space left over
  assert bt.encode("\t  é") == [9, 257, 0xC3, 0xA9]
  for n in range(0, 40):
    text = "def f():\n" + " " * n + "return 1  # x"
    assert bt.decode(bt.encode(text)) == text
  with pytest.raises(InputError, match=r"0\.\.265"):
    bt.decode([266])


def test_load_tokenizer(tokenizer_dir, tmp_path):
  assert isinstance(load_tokenizer(None), ByteTokenizer)
  assert isinstance(load_tokenizer(tokenizer_dir), CodeGeeXTokenizer)
  with pytest.raises(InputError, match="does not exist"):
    load_tokenizer(tmp_path / "nope")
  with pytest.raises(InputError, match="vocab.json"):
    CodeGeeXTokenizer.from_dir(tmp_path)


def test_plain_api_imports_without_tensorflow():
  code = "import sys, geex_jax.tokenizer; print('tensorflow' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"
