"""Running one untrusted command in a bubblewrap sandbox with resource limits.

What a sandboxed command sees and may do:
  - the host's root file system read-only (`--ro-bind / /`), a private /tmp (size-capped tmpfs) and
    its work directory at /tmp/w (writable for compilers, read-only while the program runs);
  - no network (a fresh network namespace: only an unconfigured loopback), its own PID, IPC and UTS
    namespaces; it cannot see or signal the evaluator or any other sample;
  - an unprivileged uid: as root the sandbox is set up by bwrap and the command is started through
    `setpriv` as a dedicated uid with no capabilities and no_new_privs (a user namespace mapping
    `nobody` to root would still own root's files); as a normal user, bwrap's user namespace maps
    `nobody` to that user;
  - rlimits set by `prlimit`: CPU seconds, data segment (RLIMIT_DATA counts committed writable
    memory, which the JVM, Go and V8 tolerate, unlike RLIMIT_AS, which is used only where given),
    processes per uid, file size (which also caps what it can print: stdout/stderr are files), no
    core dumps.
Paths the command needs but an unprivileged uid could not reach (toolchains under /root) are
bind-mounted read-only at the same place, over an empty tmpfs that hides the rest of their parent.

On timeout the whole process group is killed; the sandbox's PID namespace dies with bwrap
(`--die-with-parent`), which takes any process that escaped the group (setsid) with it, and in root
mode every leftover process of the dedicated uid is killed as well.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import Mapping, Optional, Sequence

# Inside the sandbox the work directory is here (under the private /tmp).
WORKDIR = "/tmp/w"
_TAIL_BYTES = 8192


@dataclasses.dataclass(frozen=True)
class Limits:
  """Resource limits of one sandboxed command."""

  timeout_s: float  # wall clock; the process group is killed after it
  cpu_s: int = 60  # RLIMIT_CPU per process (backstop for the wall clock)
  data_bytes: int = 2 << 30  # RLIMIT_DATA
  as_bytes: Optional[int] = None  # RLIMIT_AS (not for JVM / Go / node, which reserve lots)
  nproc: int = 256  # RLIMIT_NPROC (processes + threads of the uid)
  fsize_bytes: int = 16 << 20  # RLIMIT_FSIZE: any file written, stdout/stderr included
  tmpfs_bytes: int = 64 << 20  # size of the private /tmp
  nofile: int = 1024


@dataclasses.dataclass
class Outcome:
  """What happened to one sandboxed command."""

  returncode: Optional[int]  # None when killed on timeout; negative: killed by that signal
  timed_out: bool
  stdout: str  # the last _TAIL_BYTES of each stream
  stderr: str
  stdout_bytes: int
  stderr_bytes: int
  duration_s: float
  output_limited: bool  # a stream reached the file-size limit

  @property
  def signal(self) -> Optional[int]:
    if self.returncode is None:
      return None
    if self.returncode < 0:
      return -self.returncode
    # bwrap reports a child killed by a signal as 128 + signal.
    if 128 < self.returncode < 128 + 65:
      return self.returncode - 128
    return None


def is_root() -> bool:
  return os.geteuid() == 0


def bwrap_path() -> Optional[str]:
  return shutil.which("bwrap")


def _others_can_reach(path: pathlib.Path) -> bool:
  try:
    mode = path.stat().st_mode
  except OSError:
    return False
  need = stat.S_IXOTH | (stat.S_IROTH if path.is_dir() else 0)
  return (mode & need) == need


def hidden_ancestor(path: str) -> Optional[str]:
  """The topmost directory on `path` that an unprivileged uid cannot enter, or None."""
  p = pathlib.Path(path)
  for anc in list(reversed(p.parents)) + [p]:
    if anc != pathlib.Path("/") and not _others_can_reach(anc):
      return str(anc)
  return None


@dataclasses.dataclass
class Sandbox:
  """Runs commands in bubblewrap.

  Attributes:
    ro_paths: host paths the commands need (interpreters, toolchains, prebuilt crates), made
      visible read-only at the same path.
  """

  ro_paths: Sequence[str] = ()

  def _argv(
    self,
    argv: Sequence[str],
    workdir: str,
    workdir_writable: bool,
    uid: Optional[int],
    env: Mapping[str, str],
    limits: Limits,
    rw_paths: Sequence[str],
  ) -> list[str]:
    lim = [
      f"--cpu={limits.cpu_s}",
      f"--data={limits.data_bytes}",
      f"--nproc={limits.nproc}",
      f"--fsize={limits.fsize_bytes}",
      "--core=0",
      f"--nofile={limits.nofile}",
    ]
    if limits.as_bytes:
      lim.append(f"--as={limits.as_bytes}")
    cmd = [
      "prlimit",
      *lim,
      "--",
      bwrap_path() or "bwrap",
      "--ro-bind",
      "/",
      "/",
      "--dev",
      "/dev",
      "--proc",
      "/proc",
      "--perms",
      "1777",
      "--size",
      str(limits.tmpfs_bytes),
      "--tmpfs",
      "/tmp",
      # /dev/shm would otherwise be an uncapped tmpfs: memory outside RLIMIT_DATA.
      "--perms",
      "1777",
      "--size",
      str(1 << 20),
      "--tmpfs",
      "/dev/shm",
    ]
    root = uid is not None
    paths = [(p, False) for p in self.ro_paths] + [(p, True) for p in rw_paths]
    if root:
      # Hide inaccessible parents (e.g. /root) behind an empty tmpfs, then bind what is needed.
      hidden = sorted({h for p, _ in paths if (h := hidden_ancestor(p))}, key=len)
      for h in hidden:
        if not any(h.startswith(o + "/") for o in hidden if o != h):
          cmd += ["--perms", "0755", "--tmpfs", h]
      made: set[str] = set()
      for p, rw in paths:
        h = hidden_ancestor(p)
        if h:
          # bwrap would create the directories between the tmpfs and the bind point 0700.
          for anc in reversed(pathlib.Path(p).parents):
            if str(anc).startswith(h + "/") and str(anc) not in made:
              made.add(str(anc))
              cmd += ["--perms", "0755", "--dir", str(anc)]
        if h or rw:
          cmd += ["--bind" if rw else "--ro-bind", p, p]
    else:
      for p, rw in paths:
        if rw:
          cmd += ["--bind", p, p]
    cmd += [
      "--bind" if workdir_writable else "--ro-bind",
      workdir,
      WORKDIR,
      "--chdir",
      WORKDIR,
      "--die-with-parent",
      "--new-session",
      "--clearenv",
    ]
    base_env = {
      "PATH": "/usr/local/bin:/usr/bin:/bin",
      "HOME": "/tmp",
      "TMPDIR": "/tmp",
      "LANG": "C.UTF-8",
      "LC_ALL": "C.UTF-8",
    }
    for k, v in {**base_env, **env}.items():
      cmd += ["--setenv", k, v]
    if root:
      # bwrap (as root) sets up the mounts; setpriv then drops to the dedicated uid, which can
      # neither read root's files nor keep any capability.
      cmd += [
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--cap-add",
        "CAP_SETUID",
        "--cap-add",
        "CAP_SETGID",
        "--",
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--no-new-privs",
        "--",
      ]
    else:
      cmd += ["--unshare-all", "--uid", "65534", "--gid", "65534", "--"]
    return cmd + list(argv)

  def run(
    self,
    argv: Sequence[str],
    *,
    workdir: str,
    limits: Limits,
    uid: Optional[int] = None,
    env: Optional[Mapping[str, str]] = None,
    workdir_writable: bool = False,
    rw_paths: Sequence[str] = (),
    umask: int = 0o022,
    sweep_uid: bool = False,
  ) -> Outcome:
    """Runs `argv` (paths as seen inside: the work dir is WORKDIR) and waits for it.

    Args:
      uid: in root mode, the dedicated unprivileged uid (also the gid) to run as; None when the
        evaluator is not root (bwrap's user namespace then maps `nobody` to the caller).
      rw_paths: host paths visible writable at the same place (compile caches).
      umask: of the command (0 for compile steps that share a cache across uids).
      sweep_uid: kill every process of `uid` afterwards (only for a uid dedicated to this call).
    """
    cmd = self._argv(argv, workdir, workdir_writable, uid, env or {}, limits, rw_paths)
    with tempfile.TemporaryDirectory(prefix="geex-out-") as outdir:
      out_path, err_path = os.path.join(outdir, "stdout"), os.path.join(outdir, "stderr")
      start = time.monotonic()
      timed_out = False
      with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
          cmd,
          stdin=subprocess.DEVNULL,
          stdout=out,
          stderr=err,
          start_new_session=True,
          close_fds=True,
          umask=umask,
        )
        try:
          rc: Optional[int] = proc.wait(timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
          timed_out = True
          rc = None
          kill_group(proc)
        finally:
          if proc.poll() is None:  # interrupted (KeyboardInterrupt): leave nothing behind
            kill_group(proc)
      duration = time.monotonic() - start
      if uid is not None and sweep_uid:
        kill_uid(uid)
      o_bytes, e_bytes = os.path.getsize(out_path), os.path.getsize(err_path)
      return Outcome(
        returncode=rc,
        timed_out=timed_out,
        stdout=_tail(out_path),
        stderr=_tail(err_path),
        stdout_bytes=o_bytes,
        stderr_bytes=e_bytes,
        duration_s=duration,
        output_limited=max(o_bytes, e_bytes) >= limits.fsize_bytes,
      )


def kill_group(proc: subprocess.Popen) -> None:
  """SIGKILLs the process group of `proc` (it leads its own session) and reaps it."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  try:
    proc.wait(timeout=10)
  except subprocess.TimeoutExpired:
    pass


def kill_uid(uid: int) -> None:
  """SIGKILLs every process owned by `uid` (a uid dedicated to one worker of this evaluator)."""
  for entry in os.scandir("/proc"):
    if not entry.name.isdigit():
      continue
    try:
      if entry.stat().st_uid == uid:
        os.kill(int(entry.name), signal.SIGKILL)
    except (OSError, ProcessLookupError):
      pass


def _tail(path: str) -> str:
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    f.seek(max(0, size - _TAIL_BYTES))
    return f.read().decode("utf-8", "replace")


_PROBED: dict[str, Optional[str]] = {}


def probe() -> Optional[str]:
  """None when the sandbox works here, else the reason it does not (checked once per process)."""
  if "reason" in _PROBED:
    return _PROBED["reason"]
  reason = None
  if not bwrap_path():
    reason = "bubblewrap (bwrap) is not installed (scripts/install_toolchains.sh)"
  elif not shutil.which("prlimit") or (is_root() and not shutil.which("setpriv")):
    reason = "prlimit/setpriv (util-linux) not found"
  else:
    with tempfile.TemporaryDirectory() as d:
      os.chmod(d, 0o755)
      out = Sandbox().run(
        ["/bin/true"], workdir=d, limits=Limits(timeout_s=20), uid=61999 if is_root() else None
      )
      if out.returncode != 0:
        reason = f"bubblewrap cannot start a sandbox here: {out.stderr.strip()[:200]}"
  _PROBED["reason"] = reason
  return reason
