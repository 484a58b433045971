"""Errors a user fixes by changing the config or the command line, and how a command-line run
reports an exception: one `error:` line on stderr, the full traceback in a log file, an exit
status (1 for errors, 2 for config and usage errors, 130 for Ctrl-C).
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile
import traceback
from typing import TextIO

EXIT_ERROR = 1
EXIT_USAGE = 2  # a bad config value, override or command-line flag
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


class ConfigError(ValueError):
  """A config value or command-line override is invalid; the message names the key."""


def one_line(exc: BaseException) -> str:
  """The exception's message on one line; a type name is added where the message needs it."""
  text = str(exc).strip()
  # ValueError / OSError messages are written for the user; a bare KeyError('x') is not.
  if not text or not isinstance(exc, (ValueError, OSError, FloatingPointError)):
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
  lines = text.splitlines()
  return lines[0] + (" [...]" if len(lines) > 1 else "")


def _timestamp() -> str:
  return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_traceback(exc: BaseException, workdir: str | None = None) -> str:
  """Writes the command line and `exc`'s traceback to `workdir/logs/error-<time>.log` when
  `workdir` exists (it is never created here), else to a new file in the system temp dir;
  returns the file's path."""
  text = (f"{datetime.datetime.now().isoformat(timespec='seconds')} "
          f"{' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)))
  if workdir and os.path.isdir(workdir):
    logs = os.path.join(workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    path = os.path.join(logs, f"error-{_timestamp()}.log")
    if os.path.exists(path):  # another process of the same run, or a rerun within the second
      path = os.path.join(logs, f"error-{_timestamp()}-{os.getpid()}.log")
    with open(path, "a") as f:
      f.write(text)
    return path
  fd, path = tempfile.mkstemp(prefix=f"vljax-error-{_timestamp()}-", suffix=".log")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  return path


def exit_status(exc: BaseException) -> int:
  if isinstance(exc, KeyboardInterrupt):
    return EXIT_INTERRUPTED
  return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_ERROR


def report(exc: BaseException, *, workdir: str | None = None, verbose: bool = False,
           status: int | None = None, stream: TextIO | None = None) -> int:
  """Reports `exc` on `stream` (stderr) and returns the exit status (`status`, if given).

  Ctrl-C gives one `stopped:` line. Any other exception gives `error: <message>` and a line
  naming the file that holds its traceback (see `write_traceback`), or with `verbose` the
  traceback itself.
  """
  stream = stream or sys.stderr
  status = exit_status(exc) if status is None else status
  if verbose:
    traceback.print_exception(exc, file=stream)
  if isinstance(exc, KeyboardInterrupt):  # the training loop has saved a checkpoint if it could
    print(f"stopped: {str(exc).strip() or 'interrupted (Ctrl-C)'}", file=stream, flush=True)
    return status
  print(f"error: {one_line(exc)}", file=stream, flush=True)
  if not verbose:
    try:
      path = write_traceback(exc, workdir)
      print(f"the full traceback is in {path} (or rerun with --verbose)", file=stream, flush=True)
    except OSError as e:
      print(f"the traceback could not be written ({e}); rerun with --verbose to see it",
            file=stream, flush=True)
  return status
