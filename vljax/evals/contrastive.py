"""Zero-shot classification and image-text retrieval evaluators, from an image embedder and a
text embedder (types "zeroshot" and "retrieval" of `config.evals`)."""
from __future__ import annotations

import numpy as np

from vljax.data import captions
from vljax.data.pipeline import encode_texts
from vljax.evals.base import Evaluator, Predict, register
from vljax.evals.retrieval import retrieval_metrics
from vljax.evals.sources import image_caption_records, open_source
from vljax.evals.zeroshot import zeroshot_accuracy, zeroshot_classifier


class _Embedding(Evaluator):
  NEEDS = ("embed_images", "embed_texts")

  def embed_images(self, predict: Predict, images: np.ndarray) -> np.ndarray:
    return predict("embed_images", {"image": images})

  def embed_texts(self, predict: Predict, texts: list[str]) -> np.ndarray:
    return predict("embed_texts", {"text": encode_texts(self.env.data, self.env.tokenizer, texts)})


@register("zeroshot")
class ZeroShot(_Embedding):
  """Top-1 / top-5 over the colour x shape classes on single-object validation scenes, with
  CLIP-style prompt ensembles; "NAME_held_out/top1" on the held-out combinations alone."""

  SETTINGS = dict(images=960)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    world = open_source(settings.source, self.where, env.data, settings.images,
                        min_objects=1, max_objects=1)
    if not hasattr(world, "held_out"):
      raise ValueError(f"{self.where}: zero-shot over class names reads the shapes world; use "
                       "type='tfds_zeroshot' for a TFDS classification set")
    records = [world.example(i) for i in range(settings.images)]
    self.images = np.stack([r["image"] for r in records])
    self.labels = np.array([r["label"] for r in records])
    self.class_names = captions.class_names()
    held_out = {captions.class_id(c, s) for c, s in world.held_out}
    self.held_out = np.array([label in held_out for label in self.labels])
    self._classifier = None

  def describe(self) -> str:
    return f"{self.name}: zero-shot on {self.settings.images} images"

  def classifier(self, predict: Predict) -> np.ndarray:
    return zeroshot_classifier(lambda texts: self.embed_texts(predict, texts), self.class_names,
                               captions.ZEROSHOT_TEMPLATES)

  def run(self, predict: Predict) -> dict[str, float]:
    self._classifier = classifier = self.classifier(predict)
    embeddings = self.embed_images(predict, self.images)
    metrics = zeroshot_accuracy(embeddings, classifier, self.labels, prefix=self.name)
    if self.held_out.any():
      metrics.update(zeroshot_accuracy(embeddings[self.held_out], classifier,
                                       self.labels[self.held_out], ks=(1,),
                                       prefix=f"{self.name}_held_out"))
    return metrics

  def annotate(self, predict: Predict, images: np.ndarray) -> list[list[str]]:
    classifier = self._classifier if self._classifier is not None else self.classifier(predict)
    top3 = np.argsort(-(self.embed_images(predict, images) @ classifier.T), axis=1)[:, :3]
    return [["zero-shot: " + ", ".join(self.class_names[c] for c in row)] for row in top3]


@register("retrieval")
class Retrieval(_Embedding):
  """Image -> text and text -> image Recall@1/5/10 over image-caption pairs of the source."""

  SETTINGS = dict(pairs=1000)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    _, records = image_caption_records(self, settings.pairs)
    self.images = np.stack([r["image"] for r in records])
    self.captions = [r["caption"] for r in records]

  def describe(self) -> str:
    return f"{self.name}: retrieval over {self.settings.pairs} pairs"

  def run(self, predict: Predict) -> dict[str, float]:
    return retrieval_metrics(self.embed_images(predict, self.images),
                             self.embed_texts(predict, self.captions), prefix=self.name)

  def sample(self, predict: Predict, count: int):
    return self.images[:count], [[f"reference: {c}"] for c in self.captions[:count]]
