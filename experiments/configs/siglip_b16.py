"""SigLIP B/16 as in Zhai et al. (2023): 224px, bidirectional text tower of width 768 ("B") with
64 tokens, MAP-pooled image tower, sigmoid loss (t' = log 10, b = -10), batch 32,768, AdamW
(lr 1e-3, wd 1e-4), bf16 compute, the chunked sigmoid loss. For accelerators; set a real data
source before running.

  python experiments/main.py --config=siglip_b16.py --workdir=gs://bucket/siglip_b16
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.total_steps = 100_000
  c.batch_size = 32_768
  c.log_every = 100
  c.eval_every = 5_000
  c.checkpoint_every = 1_000
  c.compute_dtype = "bfloat16"
  c.tpu.topology = "v5e-64"  # 64 chips of 16 GiB
  c.microbatches = 4  # 8,192 examples (128 per chip) at a time
  c.model = dict(
      # big_vision's SigLIP: flax's tanh GELU everywhere (the MAP head's MLP too), no image head
      # (the MAP head's output is the embedding); the released B/16 files have this layout.
      image=dict(variant="B/16", pool="map", act="gelu_tanh", map_act="gelu_tanh", out_dim=None,
                 scan=True, remat="dots_no_batch"),
      text=dict(vocab_size=32000, variant="B", causal=False, pool="last", mask_padding=False, act="gelu_tanh",
                out_bias=True,
                scan=True, remat="dots_no_batch"),
      embed_dim=768,
      max_scale=None,
  )
  c.data = dict(source="", tokenizer="", image_size=224, max_text_len=64)
  c.loss.contrastive = "sigmoid"
  c.loss.impl = "chunked"
  c.loss.chunk_size = 4096
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 5_000
  c.optim.weight_decay = 1e-4
  c.optim.b2 = 0.95
  return c
