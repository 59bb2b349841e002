"""Typed user-facing errors and the one way CLIs report them."""

from __future__ import annotations

import contextlib
import sys


class GeexError(Exception):
  """An error the user can act on: the message is printed as one line, exit code 2."""


class ConfigError(GeexError):
  """A bad configuration value or gin binding."""


class CheckpointError(GeexError):
  """A missing, unreadable or inconsistent checkpoint."""


class InputError(GeexError):
  """Bad user input: a file, a flag value, a prompt."""


@contextlib.contextmanager
def cli_errors(prog: str):
  """Turns GeexError (and KeyboardInterrupt) into one line on stderr and exit code 2 / 130."""
  try:
    yield
  except GeexError as e:
    print(f"{prog}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    sys.exit(130)
