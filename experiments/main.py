"""Trains and evaluates a vljax config.

  python experiments/main.py --config=clip_tiny.py --workdir=/tmp/clip
  python experiments/main.py --config=clip_tiny.py --config.total_steps=100 --workdir=/tmp/clip

A bare config name resolves to experiments/configs/; `--config.a.b=value` overrides a field
(an unknown field fails before anything is built). Rerunning with the same workdir resumes.
"""
from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vljax.train.config import resolve_config_path  # pylint: disable=wrong-import-position

DEFAULT_CONFIG = "clip_tiny.py"


def _resolve_config_flag(argv: list[str]) -> list[str]:
  """Rewrites --config=NAME to the resolved file path so bare names work from anywhere."""
  out, seen = [], False
  for arg in argv:
    if arg.startswith("--config="):
      name = arg.split("=", 1)[1]
      path, _, extra = name.partition(":")
      arg = "--config=" + resolve_config_path(path) + (":" + extra if extra else "")
      seen = True
    out.append(arg)
  if not seen:
    out.append("--config=" + resolve_config_path(DEFAULT_CONFIG))
  return out


_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and pictures.")


def main(argv):
  del argv
  from vljax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdirs", os.path.basename(
      flags.FLAGS["config"].config_filename)[:-3])
  train_and_evaluate(config, workdir)


if __name__ == "__main__":
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  vljax_log = logging.getLogger("vljax")
  vljax_log.addHandler(handler)
  vljax_log.setLevel(logging.INFO)
  vljax_log.propagate = False
  absl_logging.set_verbosity(absl_logging.WARNING)
  app.run(main, argv=_resolve_config_flag(sys.argv))
