"""CLIP (softmax loss, causal text tower) on the shapes world, sized for a laptop CPU.

  python experiments/main.py --config=clip_tiny.py --workdir=workdirs/clip_tiny
"""
from vljax.train.config import base_config


def get_config():
  c = base_config()
  c.family = "two_tower"
  c.total_steps = 1050
  c.batch_size = 64
  c.log_every = 50
  c.eval_every = 525
  c.checkpoint_every = 300
  c.model = dict(
      image=dict(width=128, depth=3, mlp_dim=512, num_heads=4, patch_size=8, stem="conv",
                 pool="gap"),
      text=dict(width=128, depth=2, mlp_dim=512, num_heads=4, causal=True, pool="eot"),
      embed_dim=128,
  )
  c.loss.contrastive = "softmax"
  c.data = dict(image_size=48, max_text_len=32, shapes=dict(shape_siblings=1))
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 1e-4
  c.evals = dict(zeroshot=dict(type="zeroshot", images=960),
                 retrieval=dict(type="retrieval", pairs=1000))
  return c
