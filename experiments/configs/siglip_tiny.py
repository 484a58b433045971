"""SigLIP (sigmoid loss with learnable temperature and bias, t' = log 10, b = -10) on the shapes
world, sized for a laptop CPU. Same towers as clip_tiny; the text tower is bidirectional and
pooled at its last token, as SigLIP's.

Smaller batches, more siblings, more steps than clip_tiny. The sigmoid loss pushes every
negative pair below a fixed logit, so in clip_tiny's batch of 64 (32 scenes and one
shape-changed sibling each) the 62 negatives that position, size or colour tell apart outweigh
the one that only shape does: the text tower learned positions, not shapes, and zero-shot top-1
was 0.65 after 1050 steps. Here each scene brings two siblings, so 2 of every image's 23
negatives differ only in shape, and the smaller batch buys 2.5x the updates in the same time.

  python experiments/main.py --config=siglip_tiny.py --workdir=workdirs/siglip_tiny
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.batch_size = 24  # 8 scenes, each with two shape-changed siblings
  c.data.shapes.shape_siblings = 2
  c.total_steps = 2600
  c.eval_every = 1300
  c.loss.contrastive = "sigmoid"
  c.model.temperature_init = None  # log 10 for the sigmoid loss
  c.model.bias_init = -10.0
  c.model.max_scale = None  # SigLIP does not clamp the scale
  c.model.text.causal = False
  c.model.text.pool = "eot"  # the last real token (EOS); padding is masked out
  c.optim.lr = 6e-4
  return c
