"""A training process for the multi-process and kill/resume tests:

  python -m tests.train.worker WORKDIR STEPS '{"mesh": [["data", 2]], ...}'

Runs `tiny_config` (with the JSON changes) through `vljax.train.distributed.initialize` and
`train_and_evaluate`, as experiments/main.py does.
"""
import json
import sys

from tests.train.helpers import tiny_config, small_evals
from vljax.train import distributed
from vljax.train.reporting import setup_logging
from vljax.train.loop import train_and_evaluate


def main():
  workdir, steps, changes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
  config = tiny_config(total_steps=steps, log_every=1)
  config.evals = small_evals(retrieval=16)
  for key, value in changes.items():
    target = config
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  setup_logging()
  distributed.initialize(config)
  train_and_evaluate(config, workdir)


if __name__ == "__main__":
  main()
