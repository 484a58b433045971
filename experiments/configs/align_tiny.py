"""ALIGN (softmax loss, BERT-style bidirectional text tower pooled at a leading CLS token) on
the shapes world, sized for a laptop CPU.

  python experiments/main.py --config=align_tiny.py --workdir=workdirs/align_tiny
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.model.text.causal = False
  c.model.text.pool = "cls"
  c.data.text_bos = True  # BOS is the CLS token the text tower pools
  c.data.max_text_len = 33  # room for BOS in front of the longest caption
  return c
