"""CoCa answering questions about shapes-world scenes (the "vqa" view), sized for a laptop CPU.

The captioning decoder reads "question: {q} answer:" as a bidirectional prefix and is scored on
the answer only (mask_loss); evaluation generates answers to held-out validation questions and
scores them with the VQAv2 metric (`vqa/accuracy`, per question type). The contrastive term is
off: two scenes often share a question and answer, so in-batch negatives would be false ones.

  python experiments/main.py --config=coca_vqa_tiny.py --workdir=workdirs/coca_vqa_tiny
"""
from vljax.train.config import load_config


def get_config():
  c = load_config("coca_tiny.py")
  c.data.view = "vqa"
  c.data.max_text_len = 32
  c.data.shapes.shape_siblings = 0
  c.loss.contrastive_weight = 0.0
  c.loss.caption_weight = 1.0
  c.evals = dict(vqa=dict(type="vqa", questions=500),
                 perplexity=dict(type="perplexity", view="vqa", examples=500))
  return c
