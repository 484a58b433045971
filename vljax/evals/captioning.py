"""The captioning evaluator: decode captions for validation scenes and score them with BLEU-1..4
and CIDEr-D against every caption variant of the scene as references."""
from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from vljax.data import captions
from vljax.data.pipeline import make_source
from vljax.data.tokenizer import Tokenizer
from vljax.evals.caption_metrics import caption_scores, tokenize_caption
from vljax.evals.contrastive import batched


class CaptioningEvaluator:
  """Holds `num_images` validation images and their references; `run(generate)` scores a
  captioner, where `generate(uint8 [b, H, W, 3]) -> int32 [b, n]` returns token ids."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, num_images: int, batch_size: int,
               tokenizer: Tokenizer):
    source = make_source(data_cfg, "validation")
    scenes = [source.scene(i) for i in range(num_images)]
    self.images = np.stack([source.render(scene) for scene in scenes])
    self.references = {i: [tokenize_caption(c) for c in captions.captions(scene)]
                       for i, scene in enumerate(scenes)}
    self.batch_size = batch_size
    self.tokenizer = tokenizer
    self.last_captions: list[str] = []

  def run(self, generate: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    tokens = batched(generate, self.images, self.batch_size)
    self.last_captions = self.tokenizer.decode(tokens)
    candidates = {i: tokenize_caption(c) for i, c in enumerate(self.last_captions)}
    scores = caption_scores(candidates, self.references)
    return {f"captioning/{k}": float(v) for k, v in scores.items()}
