"""geex_jax/humaneval_x/sandbox.py: hostile programs end failed / timed out, the host unchanged."""

import os
import pathlib
import socket
import tempfile
import time
import uuid

import pytest

from geex_jax.humaneval_x import sandbox
import humaneval_testing as testing
from geex_jax.humaneval_x.assembly import Assembled
from geex_jax.humaneval_x.executor import Executor

RUN_TIMEOUT = 3.0


def _leftovers(ex: Executor) -> list[int]:
  """Processes a sandbox left behind: our run uids (root mode) or our Python runs' argv."""
  found = []
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      uid = entry.stat().st_uid
      cmd = pathlib.Path(f"/proc/{entry.name}/cmdline").read_bytes()
    except OSError:
      continue
    if ex.root and (uid == 61000 or uid >= 100000):
      found.append(int(entry.name))
    elif not ex.root and b"-B\0-s\0main.py" in cmd:
      found.append(int(entry.name))
  return found


@pytest.fixture(scope="module")
def ex():
  e = Executor(workers=2, run_timeout_s=RUN_TIMEOUT, memory_bytes=256 << 20)
  testing.require(e, ["python"])
  return e


@pytest.fixture()
def visible_dir():
  """A world-writable host directory the sandbox can see (not under /tmp, which it cannot)."""
  d = pathlib.Path(tempfile.mkdtemp(prefix="geex-sandbox-test-", dir="/var/tmp"))
  os.chmod(d, 0o777)
  (d / "keep").write_text("keep")
  (d / "secret").write_text("secret")
  os.chmod(d / "secret", 0o600)
  yield d
  for f in d.iterdir():
    f.unlink()
  d.rmdir()


def test_hostile_programs_are_contained(ex, visible_dir):
  server = socket.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(5)
  server.setblocking(False)
  port = server.getsockname()[1]
  marker = f"/tmp/geex-escape-{uuid.uuid4().hex}"
  me = os.getpid()
  hostile = {
    "infinite loop": ("while True: pass", "timed out"),
    "fork bomb": ("import os\nwhile True:\n  try: os.fork()\n  except OSError: pass", "timed out"),
    "escaping child": (
      "import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(600)\nwhile True: pass",
      "timed out",
    ),
    "huge allocation": ("x = bytearray(50 * 2**30)", "failed: MemoryError"),
    "growing allocation": ("l = []\nwhile True: l.append(bytearray(10**7))", "failed: MemoryError"),
    "write outside tmp": (
      f"open('{visible_dir}/new', 'w').write('x')",
      "failed: OSError: [Errno 30] Read-only file system",
    ),
    "delete files": (
      f"import os, shutil\nos.remove('{visible_dir}/keep')",
      "failed: OSError: [Errno 30] Read-only file system",
    ),
    "private tmp only": (f"open('{marker}', 'w').write('x')\nraise SystemExit(1)", "failed"),
    "fill tmp": ("open('/tmp/big', 'wb').write(b'x' * (100 << 20))", "failed"),
    "fill shared memory": (
      "for i in range(50):\n  open(f'/dev/shm/{i}', 'wb').write(b'x' * (8 << 20))",
      "failed",
    ),
    "network": (
      f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
      "failed: ConnectionRefusedError",
    ),
    "read other users' files": (
      f"print(open('{visible_dir}/secret' if {ex.root} else '/etc/shadow').read())",
      "failed: PermissionError",
    ),
    "print gigabytes": (
      "import sys\nwhile True: sys.stdout.write('x' * (1 << 20))",
      "failed: output limit exceeded",
    ),
    "kill the parent": (
      f"import os\nfor pid in (os.getppid(), {me}, 1):\n"
      "  try: os.kill(pid, 9)\n  except OSError: pass\n"
      "try: os.kill(-1, 9)\nexcept OSError: pass\nraise SystemExit(3)",
      "failed",
    ),
  }
  good = Assembled("python", "good", "assert sum(range(4)) == 6\n", "")
  programs = [Assembled("python", name, src, "") for name, (src, _) in hostile.items()]
  start = time.monotonic()
  verdicts = ex.execute(programs + [good], progress=False)
  wall = time.monotonic() - start
  for prog, v in zip(programs, verdicts):
    expected = hostile[prog.task_id][1]
    assert v.text.startswith(expected), (prog.task_id, v.text)
    assert v.run_s < RUN_TIMEOUT + 2, (prog.task_id, v.run_s)
  assert verdicts[-1].passed  # the run goes on
  assert wall < 60
  # The host is unchanged.
  assert sorted(p.name for p in visible_dir.iterdir()) == ["keep", "secret"]
  assert (visible_dir / "keep").read_text() == "keep"
  assert not os.path.exists(marker)
  with pytest.raises(BlockingIOError):
    server.accept()
  server.close()
  time.sleep(0.2)
  assert _leftovers(ex) == []


def test_sandbox_runs_unprivileged_without_network(ex):  # ex: skips / fails without bwrap
  with tempfile.TemporaryDirectory() as d:
    os.chmod(d, 0o755)
    out = sandbox.Sandbox().run(
      ["/bin/sh", "-c", "id -u; cat /proc/net/dev | tail -n +3 | cut -d: -f1; touch /x"],
      workdir=d,
      limits=sandbox.Limits(timeout_s=10),
      uid=61999 if sandbox.is_root() else None,
    )
  uid, *ifaces = out.stdout.split()
  assert uid != "0" or not sandbox.is_root()
  assert ifaces == ["lo"]  # a fresh network namespace
  assert out.returncode != 0 and "Read-only" in out.stderr


def test_hidden_ancestor():
  assert sandbox.hidden_ancestor("/usr/bin") is None
  if sandbox.is_root() and os.path.isdir("/root") and not os.stat("/root").st_mode & 0o001:
    assert sandbox.hidden_ancestor("/root/.cache/x") == "/root"
