"""A T5 v1.1 / Flan-T5-recipe encoder-decoder of the shapes world's captions, sized for a laptop
CPU: the frozen encoder-decoder LM a BLIP-2 (FlanT5) bridge can start from.

  python experiments/main.py --config=t5_tiny.py --workdir=workdirs/t5_tiny

T5 v1.1 (RMSNorm without mean subtraction, relative position buckets shared per stack,
gated-GELU, no biases, untied head), 64 wide, 2 + 2 layers. Trained with the prefix-LM
objective BLIP-2 pretrains its FlanT5 with: each caption is split after a number of words drawn
per caption (text view, prefix_words=-1); the encoder reads the prefix, the decoder predicts
the rest and EOS. The final evaluation writes lm/perplexity of the continuations, and
samples.png the greedy continuations of the first three words of validation captions.
"""
from vljax.train.config import base_config


def get_config():
  c = base_config()
  c.family = "t5"
  c.total_steps = 800
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 0  # only the final evaluation
  c.checkpoint_every = 400
  c.model = dict(variant="mu", width=64, num_heads=4, head_dim=16, mlp_dim=256)
  c.data = dict(view="text", max_text_len=33, text_bos=True,
                view_settings=dict(prefix_words=-1))
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.evals = dict(lm=dict(type="perplexity", view="text", examples=2000))
  return c
