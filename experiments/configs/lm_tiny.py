"""A LLaMA-recipe language model of the shapes world's captions, sized for a laptop CPU: the
frozen LM that the bridge families (BLIP-2, LLaVA, ...) can start from, speaking the captions'
language with the captioning families' tokenizer.

  python experiments/main.py --config=lm_tiny.py --workdir=workdirs/lm_tiny

LLaMA recipe (RMSNorm, rotary positions, SwiGLU, no biases, untied head), 64 wide, 2 layers,
4 heads, MLP 256 (the "nano" preset narrowed), next-token loss on the caption tokens and EOS of
the text view ([BOS] caption [EOS], causal), 800 steps of 64 captions: ~2.5 minutes on 2 CPU
cores. The final evaluation writes lm/perplexity on the first 2,000 validation captions:
~2.38, against 2.31, the perplexity of the caption generator itself on those captions (its
entropy per scored token, `vljax.data.shapes_text.caption_nll`), which no model can beat. The
training loss ends at the training split's own floor (0.83 nats per token), so the gap is what
validation adds: colour-shape pairs that no training caption holds.
"""
from vljax.train.config import base_config


def get_config():
  c = base_config()
  c.family = "lm"
  c.total_steps = 800
  c.batch_size = 64
  c.log_every = 100
  c.eval_every = 0  # only the final evaluation
  c.checkpoint_every = 400
  c.model = dict(variant="nano", recipe="llama", width=64, depth=2, mlp_dim=256)
  # BOS starts every caption (the first input); 33 = BOS + the longest caption + EOS.
  c.data = dict(view="text", max_text_len=33, text_bos=True)
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 1e-4
  c.evals = dict(lm=dict(type="perplexity", view="text", examples=2000))
  return c
