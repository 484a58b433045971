"""CoCa-Large as in Yu et al. (2022), Table 1; the recipe of coca_base.py with the large sizes and
a wider FSDP axis. For TPU pods: set a real data source first.

  python experiments/main.py --config=coca_large.py --dry_run
  python experiments/main.py --config=coca_large.py --workdir=gs://BUCKET/coca_large \
      --config.data.source=... --config.data.tokenizer=PATH.model
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("coca_base.py")
  c.model.variant = "large"
  c.tpu.topology = "v5p-32"  # 16 chips of 95 GiB
  c.mesh = [("data", -1), ("fsdp", 16), ("tensor", 1)]
  c.microbatches = 16  # 4,096 examples (256 per chip) at a time
  return c
