"""Throughput and peak memory of geex-convert, both ways, against a plain file copy.

  python bench/convert.py                       # 2.7b shape, ~5.3 GB fp16, under /tmp
  python bench/convert.py --preset 350m --workdir /scratch --repeat 5 --cold

Writes a synthetic checkpoint of the preset's shape in the released single-file layout (random
fp16, streamed to disk so the script itself stays small), then times `--repeat` rounds of these
steps, each in its own process:
  copy          shutil.copyfile of that file (the I/O floor for reading + writing those bytes),
                once as is and once with an fsync at the end (the converter syncs its output
                before renaming it into place)
  cast-only     with --floor: one jitted fp16 -> bf16 cast over the file's bytes, written and
                synced: the least work of any conversion to bf16 (no transposes, no torch,
                serial; its RSS counts the mapped input, which it never drops)
  torch-to-jax  geex-convert torch-to-jax SRC DST            (bf16, the default)
  jax-to-torch  geex-convert jax-to-torch DST OUT.pt         (fp16, the default)
and reports each step's median: on a shared VM a plain copy of the same 5.3 GB has taken
anywhere from 1.6 to 8.3 s. With --cold every step's input is dropped from the page cache
first (posix_fadvise DONTNEED), so each reads it from disk, as the conversion of a freshly
downloaded checkpoint does; without it the inputs are mostly cached (just written or read).
Peak RSS is the child's VmHWM and CPU s its user + system time (imports included; the
kernel's writeback threads are not counted). All files are removed at the end unless
--keep. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from geex_jax.conversion import table, torch_io  # noqa: E402
from geex_jax.conversion.convert import torch_shapes  # noqa: E402
from geex_jax.model.codegeex import CodeGeeXConfig  # noqa: E402

_CHILD = """
import os, resource, shutil, sys, time
t = time.perf_counter()
if sys.argv[1] in ("copy", "copy+fsync"):
  shutil.copyfile(sys.argv[2], sys.argv[3])
  if sys.argv[1] == "copy+fsync":
    with open(sys.argv[3], "rb") as f:
      os.fsync(f.fileno())
elif sys.argv[1] == "cast-only":
  # The least work any fp16 -> bf16 conversion does: one jitted cast over the file's bytes, in
  # 50 MB chunks of the memory-mapped input, plain writes, one after the other; no transposes,
  # no torch, no checkpoint structure, no overlap of reading, casting and writing.
  import jax, jax.numpy as jnp, numpy as np
  n = os.path.getsize(sys.argv[2]) // 2
  src = np.memmap(sys.argv[2], np.float16, "r", shape=(n,))
  cast = jax.jit(lambda x: x.astype(jnp.bfloat16))
  step = 25 << 20
  with open(sys.argv[3], "wb") as f:
    for i in range(0, n - step + 1, step):
      f.write(np.asarray(cast(src[i:i + step])).view(np.uint8))
    f.write(np.asarray(cast(src[n - n % step:])).view(np.uint8))
    f.flush()
    os.fsync(f.fileno())
else:
  from geex_jax.conversion import cli
  cli.main(sys.argv[1:] + ["--no-progress"])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec() from the (larger) parent.
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
print("BENCH", time.perf_counter() - t, hwm, ru.ru_utime + ru.ru_stime)
"""


def write_synthetic(path: pathlib.Path, config: CodeGeeXConfig) -> int:
  """The released layout of `config` with random fp16 weights, one tensor in memory at a time."""
  import torch

  shapes = torch_shapes(config)
  nested = table.nest_released(
    {n: torch_io.placeholder(s, torch.float16) for n, s in shapes.items()}
  )
  writer = torch_io.TorchZipWriter(path, nested)
  # A 64 MB pool of N(0, 0.02) values, cut at a different offset per tensor: random-looking
  # weights without spending minutes in the RNG.
  pool = (np.random.default_rng(0).standard_normal(1 << 25, np.float32) * 0.02).astype(np.float16)
  for i, placeholder in enumerate(writer.order):
    n = int(np.prod(placeholder.shape))
    start = (i * 7919) % pool.size
    data = np.resize(np.roll(pool, -start), n) if n > pool.size - start else pool[start : start + n]
    writer.write(np.ascontiguousarray(data).reshape(placeholder.shape))
  writer.close()
  return path.stat().st_size


def run(*argv, cold: bool = False) -> tuple[float, int, float]:
  """Runs one step in a fresh process; returns (seconds, peak RSS bytes, CPU seconds)."""
  if cold:
    evict(pathlib.Path(argv[1]))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, *map(str, argv)], env=env, capture_output=True, text=True
  )
  if proc.returncode:
    raise SystemExit(f"step {argv[0]} failed:\n{proc.stderr[-3000:]}")
  line = next(l for l in proc.stdout.splitlines() if l.startswith("BENCH"))
  _, seconds, rss, cpu = line.split()
  for l in proc.stdout.splitlines():
    if not l.startswith("BENCH"):
      print("  " + l, file=sys.stderr)
  return float(seconds), int(rss), float(cpu)


def evict(path: pathlib.Path) -> None:
  """Drops the cached pages of every file under `path` (written back first: dirty pages stay)."""
  for p in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fdatasync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def du(path: pathlib.Path) -> int:
  if path.is_file():
    return path.stat().st_size
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


STEPS = {
  "copy": "copy (shutil.copyfile)",
  "copy+fsync": "copy+fsync (shutil.copyfile, fsync)",
  "cast-only": "cast-only (one jitted fp16 -> bf16 pass, fsync)",
  "torch-to-jax": "torch-to-jax (fp16 -> bf16)",
  "jax-to-torch": "jax-to-torch (bf16 -> fp16)",
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="2.7b")
  parser.add_argument("--workdir", default=tempfile.gettempdir())
  parser.add_argument("--repeat", type=int, default=3, help="rounds of all steps (default 3)")
  parser.add_argument(
    "--cold", action="store_true", help="drop each step's input from the page cache before it runs"
  )
  parser.add_argument(
    "--floor",
    action="store_true",
    help="also time a bare jitted fp16 -> bf16 cast of the file (cast-only)",
  )
  parser.add_argument("--keep", action="store_true")
  args = parser.parse_args()
  config = CodeGeeXConfig.preset(args.preset)
  work = pathlib.Path(tempfile.mkdtemp(prefix="geex-convert-bench-", dir=args.workdir))
  runs: dict[str, list] = {step: [] for step in STEPS if step != "cast-only" or args.floor}
  try:
    src, jax_dir, out = work / "src.pt", work / "jax", work / "out.pt"
    t = time.perf_counter()
    size = write_synthetic(src, config)
    print(
      f"synthetic {args.preset} checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s",
      file=sys.stderr,
    )
    for round_ in range(args.repeat):
      for kind in ("copy", "copy+fsync") + (("cast-only",) if args.floor else ()):
        runs[kind].append(run(kind, src, work / "copy.pt", cold=args.cold))
        (work / "copy.pt").unlink()
      shutil.rmtree(jax_dir, ignore_errors=True)
      out.unlink(missing_ok=True)
      runs["torch-to-jax"].append(run("torch-to-jax", src, jax_dir, cold=args.cold))
      runs["jax-to-torch"].append(run("jax-to-torch", jax_dir, out, cold=args.cold))
      print(
        f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in runs.items()),
        file=sys.stderr,
      )
    jax_bytes = du(jax_dir)
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)

  median = {step: statistics.median(s for s, _, _ in r) for step, r in runs.items()}
  print(
    f"\n`python bench/convert.py --preset {args.preset} --repeat {args.repeat}"
    f"{' --cold' if args.cold else ''}{' --floor' if args.floor else ''}` "
    f"on {platform.node() or 'host'}: "
    f"{os.cpu_count()} CPUs, {_mem_gb():.0f} GB RAM, {platform.machine()}, checkpoint "
    f"{size / 1e9:.2f} GB ({config.num_params() / 1e9:.2f}B params, fp16)\n"
  )
  print(
    "| step | bytes | median s | rounds s | MB/s | time vs copy | vs copy+fsync | CPU s | "
    "peak RSS | RSS / checkpoint |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for step, r in runs.items():
    nbytes = jax_bytes if step == "jax-to-torch" else size
    seconds, rss = median[step], max(m for _, m, _ in r)
    cpu = statistics.median(c for _, _, c in r)
    print(
      f"| {STEPS[step]} | {nbytes / 1e9:.2f} GB | {seconds:.1f} | "
      f"{' / '.join(f'{s:.1f}' for s, _, _ in r)} | {nbytes / 1e6 / seconds:.0f} | "
      f"{seconds / median['copy']:.2f}x | {seconds / median['copy+fsync']:.2f}x | {cpu:.1f} | "
      f"{rss / 1e6:.0f} MB | {100 * rss / size:.1f}% |"
    )


def _mem_gb() -> float:
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
  except (ValueError, OSError):
    return float("nan")


if __name__ == "__main__":
  main()
