"""CLIP ViT-B/16 as in Radford et al. (2021): 224px images, 77-token causal text tower of width
512 ("M"), 512-d embeddings, batch 32,768, AdamW (lr 5e-4, b2 0.98, eps 1e-6, wd 0.2), 2k warm-up
steps, cosine decay, bf16 compute and the chunked softmax loss. For accelerators; set a data
source with real image-text pairs (issue: WebDataset / TFDS sources) before running.

  python experiments/main.py --config=clip_b16.py --workdir=gs://bucket/clip_b16
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
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.tpu.topology = "v4-64"  # 32 chips of 32 GiB
  c.microbatches = 4  # 8,192 examples (256 per chip) at a time
  c.model = dict(
      image=dict(variant="B/16", pool="cls", pre_norm=True, out_bias=False, act="quick_gelu",
                 norm_eps=1e-5, scan=True, remat="dots_no_batch"),
      text=dict(vocab_size=49408, variant="M", causal=True, pool="eot", act="quick_gelu", norm_eps=1e-5,
                scan=True, remat="dots_no_batch"),
      embed_dim=512,
  )
  c.data = dict(source="", tokenizer="", image_size=224, max_text_len=77, image_mean=(0.48145466, 0.4578275, 0.40821073),
                image_std=(0.26862954, 0.26130258, 0.27577711))
  c.loss.contrastive = "softmax"
  c.loss.impl = "chunked"
  c.loss.chunk_size = 4096
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 2_000
  c.optim.weight_decay = 0.2
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  return c
