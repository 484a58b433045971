"""CoCa-Base as in Yu et al. (2022), Table 1: 288px images, patch 18, 64k vocabulary, 256
captioning queries, loss = 1 * contrastive + 2 * captioning, AdamW (lr 8e-4, b2 0.999, wd 0.01),
bf16 compute, scanned and rematerialised layers, the chunked contrastive loss. For TPU pods:
set a real data source first (a run without one stops and names the fields to set).

  python experiments/main.py --config=coca_base.py --dry_run
  python experiments/main.py --config=coca_base.py --workdir=gs://BUCKET/coca_base \
      --config.data.source=... --config.data.tokenizer=PATH.model
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("coca_tiny.py")
  c.total_steps = 500000
  c.batch_size = 65_536  # the paper's
  c.tpu.topology = "v4-32"  # 16 chips of 32 GiB
  c.microbatches = 16  # 4,096 examples (256 per chip) at a time
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 2_000
  c.compute_dtype = "bfloat16"
  c.mesh = [("data", -1), ("fsdp", 16), ("tensor", 1)]
  c.model = dict(variant="base", vocab_size=64_000,
                 image=dict(scan=True, remat="dots_no_batch"), scan=True, remat="dots_no_batch")
  c.data = dict(source="", tokenizer="", image_size=288, max_text_len=64, text_bos=True)
  c.loss.impl = "chunked"
  c.loss.chunk_size = 4096
  c.loss.ce_chunk_len = 16  # the 64k-vocabulary logits 16 positions at a time
  c.optim.lr = 8e-4
  c.optim.b2 = 0.999
  c.optim.weight_decay = 0.01
  c.optim.warmup_steps = 10_000
  c.optim.schedule = "linear"
  return c
