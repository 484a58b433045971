"""The captioning evaluator (type "captioning"): generate captions for validation images and
score them with BLEU-1..4 and CIDEr-D against every reference caption."""
from __future__ import annotations

import numpy as np

from vljax.data import captions
from vljax.evals.base import Evaluator, Predict, register
from vljax.evals.caption_metrics import caption_scores, tokenize_caption
from vljax.evals.generative import generate, make_view
from vljax.evals.sources import image_caption_records
from vljax.losses.captioning import decoder_input_length


@register("captioning")
class Captioning(Evaluator):
  """BLEU-n and CIDEr-D of generated captions; references are every caption template of a
  shapes scene, or the record's caption(s) for other sources."""

  NEEDS = ("generate",)
  VIEW = "caption"
  SETTINGS = dict(images=200)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    source, records = image_caption_records(self, settings.images)
    self.images = np.stack([r["image"] for r in records])
    if hasattr(source, "scene"):
      refs = [captions.captions(source.scene(i)) for i in range(settings.images)]
    else:
      refs = [r["caption"] if isinstance(r["caption"], list) else [r["caption"]] for r in records]
    self.references = {i: [tokenize_caption(c) for c in rs] for i, rs in enumerate(refs)}
    self.raw_references = refs
    self.view = make_view(env, "caption")
    self.max_new_tokens = decoder_input_length(env.data.max_text_len)
    self.last_captions: list[str] = []

  def describe(self) -> str:
    return f"{self.name}: captioning {self.settings.images} images"

  def generate(self, predict: Predict, images: np.ndarray) -> list[str]:
    prompts = [self.view.prompt({"image": image, "caption": ""}) for image in images]
    return generate(self, predict, prompts, self.max_new_tokens)

  def run(self, predict: Predict) -> dict[str, float]:
    self.last_captions = self.generate(predict, self.images)
    candidates = {i: tokenize_caption(c) for i, c in enumerate(self.last_captions)}
    scores = caption_scores(candidates, self.references)
    return {f"{self.name}/{k}": float(v) for k, v in scores.items()}

  def sample(self, predict: Predict, count: int):
    return self.images[:count], [[f"reference: {r[0]}"] for r in self.raw_references[:count]]

  def annotate(self, predict: Predict, images: np.ndarray) -> list[list[str]]:
    return [[f"generated: {c}"] for c in self.generate(predict, images)]
