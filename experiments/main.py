r"""Trains and evaluates a vljax config.

  python experiments/main.py --config=clip_tiny.py --workdir=/tmp/clip
  python experiments/main.py --config=clip_tiny.py --config.total_steps=100 --workdir=/tmp/clip
  python experiments/main.py --config=coca_large.py --dry_run            # for its TPU slice
  python experiments/main.py --config=coca_base.py --dry_run --topology=v4-32 \
      --config.mesh="[('data', -1), ('fsdp', 16), ('tensor', 1)]"

A bare config name resolves to experiments/configs/ (`FILE:ARG` passes ARG to its get_config).
`--config.a.b=VALUE` sets any field, also keys of model / data / evals that the config leaves out
and whole lists such as mesh; VALUE is a Python literal, or plain text for a text field. The
config is validated before anything is built. Rerunning with the same workdir resumes.

The log goes to stdout and WORKDIR/logs/train.log. An error stops the run with one `error:` line
on stderr and the name of the file holding its traceback (`--verbose` prints the traceback);
the exit status is 1, or 2 for a bad config or command line, or 130 after Ctrl-C.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from vljax.data.pipeline import data_config, require_source
from vljax.errors import EXIT_USAGE, ConfigError, report
from vljax.train.config import apply_overrides, load_config, split_overrides, validate
from vljax.train.reporting import setup_logging
# pylint: enable=wrong-import-position

DEFAULT_CONFIG = "coca_tiny.py"

_CONFIG = flags.DEFINE_string(
    "config", DEFAULT_CONFIG, "Experiment config: a file, or a name in experiments/configs/, "
    "optionally FILE:ARG. --config.a.b=VALUE sets the field a.b of it.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, pictures and "
                               "logs (default: workdirs/<config name>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print parameter counts, FLOPs per step and compiled "
                             "per-device memory for the configured mesh and batch, then exit.")
_DRY_RUN_DEVICES = flags.DEFINE_integer(
    "dry_run_devices", 0, "On a CPU host, fake this many devices for --dry_run (default: the "
    "product of the config's fixed mesh axis sizes, at least 8).")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --dry_run: compile the step for this Cloud TPU slice (v4-N, v5e-N / "
    "v5litepod-N, v5p-N, v6e-N) with libtpu's compile-only client and report per-chip HBM; "
    "default: the config's config.tpu.topology; 'none': compile for the CPU.")
_MFU = flags.DEFINE_float("mfu", 0.4, "With a TPU dry run: the model FLOPs utilisation the "
                          "reported step time assumes.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the full traceback of an error, and debug "
                             "lines of the vljax log.")

def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag reported as a one-line usage error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _fake_cpu_devices(config) -> None:
  """Before jax starts: let a CPU host stand in for the configured mesh in a dry run."""
  count = _DRY_RUN_DEVICES.value
  if not count:
    fixed = [size for _, size in config.mesh if size != -1]
    count = max(8, int(np.prod(fixed)) if fixed else 8)
  flag = f"--xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _log_to_workdir(workdir: str) -> None:
  """Adds WORKDIR/logs/train.log (train-<i>.log on process i > 0) to the vljax logger."""
  if "://" in workdir:  # a bucket: the log stays on stdout
    return
  import jax  # pylint: disable=import-outside-toplevel
  logs = os.path.join(workdir, "logs")
  os.makedirs(logs, exist_ok=True)
  index = jax.process_index()
  handler = logging.FileHandler(os.path.join(logs, "train.log" if index == 0 else f"train-{index}.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
  logging.getLogger("vljax").addHandler(handler)


def _workdir() -> str:
  name = os.path.splitext(os.path.basename(_CONFIG.value.split(":", 1)[0]))[0]
  return _WORKDIR.value or os.path.join("workdirs", name)


def load(argv: list[str], overrides: list[str]):
  """The config of the command line: loaded, overridden ("PATH=VALUE" strings, in order) and
  validated; a training run also needs a data source."""
  config = load_config(_CONFIG.value)
  apply_overrides(config, overrides)
  if len(argv) > 1:
    raise ConfigError(f"unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value")
  validate(config)
  if not _DRY_RUN.value:
    require_source(data_config(config.data), os.path.basename(_CONFIG.value))
  return config


def run(config, workdir: str) -> None:
  """Dry-runs or trains a validated config."""
  if _DRY_RUN.value:
    _fake_cpu_devices(config)
    from vljax.train.dry_run import dry_run  # pylint: disable=import-outside-toplevel
    topology = config.tpu.topology if _TOPOLOGY.value is None else _TOPOLOGY.value
    dry_run(config, topology=None if topology.lower() in ("", "none") else topology,
            mfu=_MFU.value)
    return
  from vljax.train import distributed  # pylint: disable=import-outside-toplevel
  from vljax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  distributed.initialize(config)
  _log_to_workdir(workdir)
  train_and_evaluate(config, workdir)


def main(argv: list[str], overrides: list[str]) -> None:
  verbose = _VERBOSE.value
  setup_logging(logging.DEBUG if verbose else logging.INFO)
  workdir = _workdir()
  try:
    config = load(argv, overrides)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    # Anything failing here is in the config file or the command line.
    sys.exit(report(e, workdir=workdir, verbose=verbose,
                    status=None if isinstance(e, KeyboardInterrupt) else EXIT_USAGE))
  try:
    run(config, workdir)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    sys.exit(report(e, workdir=workdir, verbose=verbose))


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.WARNING)
  flag_args, config_overrides = split_overrides(sys.argv)
  app.run(functools.partial(main, overrides=config_overrides), argv=flag_args,
          flags_parser=_parse_flags)
