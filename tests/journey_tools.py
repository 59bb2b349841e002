"""Running the console scripts as a user does, for the journey tests (tests/journeys/)."""

import os
import pathlib
import subprocess
import sys

# The console scripts of the environment the tests run in (the venv's bin/).
BIN = pathlib.Path(sys.executable).parent


def script(name: str) -> str:
  path = BIN / name
  if not path.exists():
    raise FileNotFoundError(
      f"{path}: the package's console scripts are not installed here (make venv installs them)"
    )
  return str(path)


def run(
  name: str,
  *args,
  env: dict | None = None,
  cwd=None,
  timeout: float = 900,
  input: str | None = None,
) -> subprocess.CompletedProcess:
  """`name ARGS...` as a subprocess (name: a console script such as geex-sample)."""
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(
    [script(name), *map(str, args)],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=cwd,
    timeout=timeout,
    input=input,
  )


def run_ok(name: str, *args, **kw) -> subprocess.CompletedProcess:
  """Like `run`, failing the test with the command's stderr when it exits non-zero."""
  r = run(name, *args, **kw)
  if r.returncode != 0:
    raise AssertionError(
      f"{name} {' '.join(map(str, args))} exited {r.returncode}:\n"
      f"{r.stderr[-4000:]}\n--- stdout ---\n{r.stdout[-2000:]}"
    )
  return r
