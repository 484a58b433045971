"""LiT (locked-image tuning): the image tower is loaded from a clip_tiny checkpoint and locked
(no gradients, no optimizer state); only the text tower and temperature train.

  python experiments/main.py --config=clip_tiny.py --workdir=workdirs/clip_tiny
  python experiments/main.py --config=lit_tiny.py --workdir=workdirs/lit_tiny

`--config.init="[{'checkpoint': PATH, 'params': 'img/.*'}]"` points at another clip_tiny workdir.
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  # Copy the whole image tower from a clip_tiny workdir (or its checkpoints dir) ...
  c.init = [dict(checkpoint="workdirs/clip_tiny", params="img/.*")]
  c.optim.freeze = "img/.*"  # ... and lock it
  return c
