r"""Evaluates a checkpoint without training: a vljax workdir or an imported model.

  python experiments/eval.py --checkpoint=/ckpt/clip-vit-base-patch32 --config=clip_tiny.py \
      --config.evals="{'colours': {'type': 'tfds_zeroshot', 'name': 'my_dataset'}}" \
      --config.data.tfds.data_dir=/data/tfds --workdir=/tmp/eval_clip
  python experiments/eval.py --checkpoint=workdirs/clip_tiny --config=clip_tiny.py

The checkpoint is any format `vljax.convert.checkpoints` reads (a vljax workdir / checkpoint;
a Hugging Face CLIP, SigLIP, LLaMA, OPT, GPT-2 or T5 directory). An imported model brings its
family, model fields, image size and normalisation, tokenizer (when the directory has one), text
length and contrastive loss; the config gives the evaluators (config.evals) and their data, and
`--config.a.b=VALUE` overrides anything, the checkpoint's settings included.
`--nomodel_from_checkpoint` keeps the config's model instead (it must match the checkpoint).
Writes WORKDIR/metrics.json (default workdir: workdirs/eval_<config name>); errors are reported
as main.py reports them.
"""
from __future__ import annotations

import functools
import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from vljax.errors import EXIT_USAGE, ConfigError, report
from vljax.train.config import apply_overrides, load_config, split_overrides, validate
from vljax.train.reporting import setup_logging
# pylint: enable=wrong-import-position

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The checkpoint to evaluate: a vljax "
                                  "workdir / checkpoint, or a Hugging Face model directory.")
_CONFIG = flags.DEFINE_string(
    "config", "clip_tiny.py", "Experiment config giving the evaluators: a file, or a name in "
    "experiments/configs/, optionally FILE:ARG. --config.a.b=VALUE sets the field a.b of it.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.json and the log "
                               "(default: workdirs/eval_<config name>).")
_MODEL_FROM_CHECKPOINT = flags.DEFINE_bool(
    "model_from_checkpoint", True, "Take the family, model, data and loss settings of an imported "
    "checkpoint; false: keep the config's.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the full traceback of an error.")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def _workdir() -> str:
  name = os.path.splitext(os.path.basename(_CONFIG.value.split(":", 1)[0]))[0]
  return _WORKDIR.value or os.path.join("workdirs", f"eval_{name}")


def main(argv: list[str], overrides: list[str]) -> None:
  verbose = _VERBOSE.value
  setup_logging(logging.DEBUG if verbose else logging.INFO)
  workdir = _workdir()
  try:
    if len(argv) > 1:
      raise ConfigError(f"unexpected argument(s) {' '.join(argv[1:])}; flags are --name=value")
    if not _CHECKPOINT.value:
      raise ConfigError("--checkpoint is required (a vljax workdir or a model directory)")
    # pylint: disable=import-outside-toplevel
    from vljax.convert import checkpoints
    from vljax.train.eval_checkpoint import config_for, evaluate
    # pylint: enable=import-outside-toplevel
    config = load_config(_CONFIG.value)
    imported = checkpoints.read(_CHECKPOINT.value)
    config = config_for(config, imported, _MODEL_FROM_CHECKPOINT.value)
    apply_overrides(config, overrides)
    validate(config)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    sys.exit(report(e, workdir=workdir, verbose=verbose,
                    status=None if isinstance(e, KeyboardInterrupt) else EXIT_USAGE))
  try:
    evaluate(config, imported, workdir)
  except (Exception, KeyboardInterrupt) as e:  # pylint: disable=broad-except
    sys.exit(report(e, workdir=workdir, verbose=verbose))


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.WARNING)
  flag_args, config_overrides = split_overrides(sys.argv)
  app.run(functools.partial(main, overrides=config_overrides), argv=flag_args,
          flags_parser=_parse_flags)
