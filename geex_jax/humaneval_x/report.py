"""Report files: summary.json, summary.md (Markdown table) and PNG plots (matplotlib, Agg).

pass_at_k.png            bars of pass@k per language (one group per k that is defined)
translation_heatmap.png  pass@1 of every source -> target pair (translation results only)
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from geex_jax.fileio import atomic_path, write_atomic
from geex_jax.humaneval_x import metrics
from geex_jax.humaneval_x import problems as problems_lib


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def _display(key: str) -> str:
  try:
    return problems_lib.language_of(key).name
  except Exception:
    return key


def markdown(summary: dict) -> str:
  """Markdown tables (percent): per language, then translation pairs if any."""
  ks = [f"pass@{k}" for k in metrics.KS]
  lines = [
    "| language | " + " | ".join(ks) + " | problems | samples | passed |",
    "|---|" + "---:|" * (len(ks) + 3),
  ]
  for key, e in summary["languages"].items():
    note = f" (skipped: {e['skipped']})" if e.get("skipped") else ""
    lines.append(
      f"| {_display(key)}{note} | "
      + " | ".join(_pct(e[k]) for k in ks)
      + f" | {e['problems']} | {e['samples']} | {e['passed']} |"
    )
  if len(summary["languages"]) > 1:
    lines.append("| average | " + " | ".join(_pct(summary["average"][k]) for k in ks) + " | | | |")
  pairs = summary.get("pairs")
  if pairs:
    lines += [
      "",
      "| source -> target | " + " | ".join(ks) + " | problems | samples |",
      "|---|" + "---:|" * (len(ks) + 2),
    ]
    for key, e in pairs.items():
      src, tgt = key.split("->")
      lines.append(
        f"| {_display(src)} -> {_display(tgt)} | "
        + " | ".join(_pct(e[k]) for k in ks)
        + f" | {e['problems']} | {e['samples']} |"
      )
  return "\n".join(lines) + "\n"


def plot_pass_at_k(summary: dict, path) -> bool:
  """Grouped bar chart of pass@k per language; False when nothing is defined to plot."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  langs = list(summary["languages"])
  ks = [
    f"pass@{k}"
    for k in metrics.KS
    if any(summary["languages"][l][f"pass@{k}"] is not None for l in langs)
  ]
  if not ks:
    return False
  fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(langs), 4))
  width = 0.8 / len(ks)
  x = np.arange(len(langs))
  for i, k in enumerate(ks):
    vals = [100 * (summary["languages"][l][k] or 0.0) for l in langs]
    bars = ax.bar(x + (i - (len(ks) - 1) / 2) * width, vals, width, label=k)
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
  ax.set_xticks(x, [_display(l) for l in langs])
  ax.set_ylabel("%")
  ax.set_ylim(0, 105)
  ax.set_title("HumanEval-X pass@k")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_translation(summary: dict, path, k: str = "pass@1") -> bool:
  """Heat map of `k` for source (rows) -> target (columns); False without translation results."""
  pairs = summary.get("pairs")
  if not pairs:
    return False
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  order = [l.humaneval for l in problems_lib.languages.humaneval_languages()]
  keys = sorted(
    {p for pair in pairs for p in pair.split("->")},
    key=lambda s: order.index(s) if s in order else 99,
  )
  grid = np.full((len(keys), len(keys)), np.nan)
  for pair, e in pairs.items():
    s, t = pair.split("->")
    if e.get(k) is not None:
      grid[keys.index(s), keys.index(t)] = 100 * e[k]
  fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(keys), 1 + 0.8 * len(keys)))
  im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100)
  names = [_display(s) for s in keys]
  ax.set_xticks(range(len(keys)), names, rotation=45, ha="right")
  ax.set_yticks(range(len(keys)), names)
  ax.set_xlabel("target")
  ax.set_ylabel("source")
  for i in range(len(keys)):
    for j in range(len(keys)):
      if not np.isnan(grid[i, j]):
        ax.text(
          j,
          i,
          f"{grid[i, j]:.1f}",
          ha="center",
          va="center",
          fontsize=8,
          color="white" if grid[i, j] < 60 else "black",
        )
  ax.set_title(f"HumanEval-X translation {k} (%)")
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(out_dir, summary: dict) -> list[pathlib.Path]:
  """Writes summary.json, summary.md and the plots into `out_dir`; returns the paths written."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
  write_atomic(out / "summary.md", markdown(summary))
  written = [out / "summary.json", out / "summary.md"]
  for name, fn in (
    ("pass_at_k.png", plot_pass_at_k),
    ("translation_heatmap.png", plot_translation),
  ):
    with atomic_path(out / name, suffix=".png") as tmp:  # matplotlib goes by the suffix
      drawn = fn(summary, tmp)
    if drawn:
      written.append(out / name)
  return written
