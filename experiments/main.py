"""Trains and evaluates a vljax config.

  python experiments/main.py --config=clip_tiny.py --workdir=/tmp/clip
  python experiments/main.py --config=clip_tiny.py --config.total_steps=100 --workdir=/tmp/clip

A bare config name resolves to experiments/configs/; `--config.a.b=value` overrides a field
(an unknown field fails before anything is built). Rerunning with the same workdir resumes.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
import numpy as np
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vljax.train.config import resolve_config_path  # pylint: disable=wrong-import-position
from vljax.train.logging import setup_logging  # pylint: disable=wrong-import-position

DEFAULT_CONFIG = "coca_tiny.py"


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
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print parameter counts, FLOPs per step and compiled "
                             "per-device memory for the configured mesh and batch, then exit.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "On a CPU host, fake this many devices for --dry_run (default: the "
    "product of the config's fixed mesh axis sizes, at least 8).")


def _fake_cpu_devices(config) -> None:
  """Before jax starts: let a CPU host stand in for the configured mesh in a dry run."""
  count = _DRY_RUN_DEVICES.value
  if not count:
    fixed = [size for _, size in config.mesh if size != -1]
    count = max(8, int(np.prod(fixed)) if fixed else 8)
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def main(argv):
  del argv
  config = _CONFIG.value
  if _DRY_RUN.value:
    _fake_cpu_devices(config)
    from vljax.train.dry_run import dry_run  # pylint: disable=import-outside-toplevel
    dry_run(config)
    return
  from vljax.train import distributed  # pylint: disable=import-outside-toplevel
  from vljax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  distributed.initialize(config)
  workdir = _WORKDIR.value or os.path.join("workdirs", os.path.basename(
      flags.FLAGS["config"].config_filename)[:-3])
  train_and_evaluate(config, workdir)


if __name__ == "__main__":
  setup_logging()
  absl_logging.set_verbosity(absl_logging.WARNING)
  app.run(main, argv=_resolve_config_flag(sys.argv))
