"""Crafted source files for the data tests (shared by tests/data/)."""

import os
import random


def code_file(lang: str, i: int, size: int = 2000) -> str:
  """A plausible source file of about `size` bytes, unique per (lang, i)."""
  rnd = random.Random(f"{lang}-{i}")
  lines = []
  while sum(len(l) + 1 for l in lines) < size:
    k = rnd.randrange(1000)
    if lang == "py":
      lines += [f"def function_{i}_{k}(value, other):", f"    return value * {k} + other  # note"]
    elif lang == "sh":
      lines += [f"echo \"step {i} {k}\"", f"if [ -f file_{k} ]; then", "  cat file  ", "fi"]
    else:
      lines += [f"int function_{i}_{k}(int value) {{", f"    return value * {k};  // note", "}"]
  return "\n".join(lines) + "\n"


def write_tree(root, files: dict) -> None:
  for rel, content in files.items():
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(content.encode() if isinstance(content, str) else content)


def mixed_tree(root, n_per_lang: int = 20) -> None:
  """A clean 3-language tree: Python, C and Shell files of 1.1-6 KB."""
  files = {}
  for lang, ext in (("py", "py"), ("c", "c"), ("sh", "sh")):
    for i in range(n_per_lang):
      files[f"{lang}/f{i:03d}.{ext}"] = code_file(lang, i, size=1100 + (i * 977) % 5000)
  write_tree(root, files)
