"""CoCa-Giant as in Yu et al. (2022), Table 1; the recipe of coca_base.py with the giant sizes and
a wider FSDP axis. For TPU pods: set a real data source first.

  python experiments/main.py --config=coca_giant.py --dry_run
  python experiments/main.py --config=coca_giant.py --workdir=gs://BUCKET/coca_giant \
      --config.data.source=... --config.data.tokenizer=PATH.model
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("coca_base.py")
  c.model.variant = "giant"
  c.tpu.topology = "v5p-128"  # 64 chips of 95 GiB
  c.mesh = [("data", -1), ("fsdp", 64), ("tensor", 1)]
  c.microbatches = 16  # 4,096 examples (64 per chip) at a time
  return c
