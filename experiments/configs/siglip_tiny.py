"""SigLIP (sigmoid loss with learnable temperature and bias, t' = log 10, b = -10) on the shapes
world, sized for a laptop CPU. Same towers as clip_tiny; the text tower is bidirectional and
pooled at its last token, as SigLIP's.

  python experiments/main.py --config=siglip_tiny.py --workdir=workdirs/siglip_tiny
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.model.loss = "sigmoid"
  c.model.temperature_init = None  # log 10 for the sigmoid loss
  c.model.bias_init = -10.0
  c.model.max_scale = None  # SigLIP does not clamp the scale
  c.model.text.causal = False
  c.model.text.pool = "eot"  # the last real token (EOS); padding is masked out
  c.optim.lr = 6e-4  # the sigmoid loss learned best at a lower rate than the softmax here
  return c
