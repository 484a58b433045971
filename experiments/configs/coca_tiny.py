"""CoCa (contrastive captioner) on the shapes world, sized for a laptop CPU: the default main job.

  python experiments/main.py --workdir=workdirs/coca_tiny
  python experiments/main.py --config=coca_tiny.py --workdir=workdirs/coca_tiny

Image ViT 128 wide, 3 layers, conv stem to patch 8 on 48px scenes; attentional poolers (1
contrastive query, 16 captioning queries); unimodal and multimodal text decoders of 1 layer each,
128 wide.
Loss = 1 * contrastive + 2 * captioning, as the paper.
"""
from vljax.train.config import base_config


def get_config():
  c = base_config()
  c.family = "coca"
  c.total_steps = 900
  c.batch_size = 64
  c.log_every = 50
  c.eval_every = 450
  c.checkpoint_every = 300
  c.model = dict(
      image=dict(width=128, depth=3, mlp_dim=512, num_heads=4, patch_size=8, stem="conv"),
      width=128, num_heads=4, mlp_dim=512, unimodal_depth=1, multimodal_depth=1,
      num_caption_queries=16,
  )
  # BOS starts every caption (the decoder's first input); 33 = BOS + the longest caption + EOS.
  c.data = dict(image_size=48, max_text_len=33, text_bos=True, shapes=dict(shape_siblings=1))
  c.loss.contrastive_weight = 1.0
  c.loss.caption_weight = 2.0
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.evals = dict(zeroshot=dict(type="zeroshot", images=960),
                 retrieval=dict(type="retrieval", pairs=1000),
                 captioning=dict(type="captioning", images=200))
  return c
