"""Vicuna-7B (v1.5: Llama-2-7B fine-tuned; LLaVA-1.5's language model) as the "lm" family: the
LLaMA recipe at 6.74B parameters, 32k vocabulary, 4,096 positions, in bfloat16 with scanned,
fully rematerialised layers, FSDP over a v5p-32 slice and the chunked cross-entropy. For TPU
pods: set a real text source and its tokenizer first (Vicuna's sentencepiece model), or import
the released weights (`vljax.convert`) and fine-tune.

  python experiments/main.py --config=lm_vicuna7b.py --dry_run
  python experiments/main.py --config=lm_vicuna7b.py --workdir=gs://BUCKET/lm_vicuna7b \\
      --config.data.source=... --config.data.tokenizer=PATH/tokenizer.model
"""
from vljax.train.config import base_config


def get_config():
  c = base_config()
  c.family = "lm"
  c.total_steps = 10_000
  c.batch_size = 256  # 256 x 2,048 tokens = 0.5M tokens per step
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.compute_dtype = "bfloat16"
  # The released vocabulary and context: explicit, as the tokenizer only sets lower bounds.
  c.model = dict(variant="vicuna-7b", vocab_size=32_000, max_len=4096, scan=True, remat="full")
  c.data = dict(view="text", max_text_len=2048, text_bos=True)
  c.loss.ce_chunk_len = 256  # never the [256, 2047, 32000] logits
  c.optim.lr = 2e-5
  c.optim.warmup_steps = 300
  c.optim.weight_decay = 0.0
  c.tpu.topology = "v5p-32"  # 16 chips of 95 GiB
  c.mesh = [("data", -1), ("fsdp", 16), ("tensor", 1)]
  c.microbatches = 4
  c.evals = dict(lm=dict(type="perplexity", view="text", examples=1000, batch_size=64))
  return c
