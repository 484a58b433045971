"""The image-text evaluator run during training: zero-shot classification and retrieval on
validation scenes, from an image embedder and a text embedder."""
from __future__ import annotations

from typing import Callable

import ml_collections
import numpy as np

from vljax.data import captions
from vljax.data.pipeline import encode_texts, make_source
from vljax.data.tokenizer import Tokenizer
from vljax.evals.retrieval import retrieval_metrics
from vljax.evals.zeroshot import zeroshot_accuracy, zeroshot_classifier

def batched(fn: Callable[[np.ndarray], np.ndarray], inputs: np.ndarray, batch_size: int) -> np.ndarray:
  """Applies `fn` to fixed-size batches (the last one padded) so it compiles once."""
  outputs = []
  for start in range(0, len(inputs), batch_size):
    chunk = inputs[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    outputs.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(outputs)


class ImageTextEvaluator:
  """Builds the validation sets once; `run` embeds them and returns the metrics."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, eval_cfg: ml_collections.ConfigDict,
               tokenizer: Tokenizer):
    self.cfg = eval_cfg
    self.data_cfg = data_cfg
    self.tokenizer = tokenizer
    single = make_source(data_cfg, "validation", min_objects=1, max_objects=1)
    zs = [single.example(i) for i in range(eval_cfg.zeroshot_images)]
    self.zs_images = np.stack([e["image"] for e in zs])
    self.zs_labels = np.array([e["label"] for e in zs])
    self.class_names = captions.class_names()
    held_out = {captions.class_id(c, s) for c, s in single.held_out}
    self.zs_held_out = np.array([label in held_out for label in self.zs_labels])
    pairs_source = make_source(data_cfg, "validation")
    pairs = [pairs_source.example(i) for i in range(eval_cfg.retrieval_pairs)]
    self.rt_images = np.stack([e["image"] for e in pairs])
    self.rt_captions = [e["caption"] for e in pairs]

  def tokenize(self, texts: list[str]) -> np.ndarray:
    return encode_texts(self.data_cfg, self.tokenizer, texts)

  def run(self, embed_images: Callable[[np.ndarray], np.ndarray],
          embed_texts: Callable[[np.ndarray], np.ndarray]) -> dict[str, float]:
    """`embed_images(uint8 [b,H,W,3])` and `embed_texts(int32 [b,L])` give L2-normalised rows."""
    bs = self.cfg.batch_size
    text_fn = lambda texts: batched(embed_texts, self.tokenize(texts), bs)
    classifier = zeroshot_classifier(text_fn, self.class_names, captions.ZEROSHOT_TEMPLATES)
    zs_emb = batched(embed_images, self.zs_images, bs)
    metrics = zeroshot_accuracy(zs_emb, classifier, self.zs_labels)
    if self.zs_held_out.any():
      metrics.update(zeroshot_accuracy(zs_emb[self.zs_held_out], classifier,
                                       self.zs_labels[self.zs_held_out], ks=(1,),
                                       prefix="zeroshot_held_out"))
    self._last_classifier = classifier
    img_emb = batched(embed_images, self.rt_images, bs)
    txt_emb = text_fn(self.rt_captions)
    metrics.update(retrieval_metrics(img_emb, txt_emb))
    return metrics

  def sample_lines(self, embed_images: Callable[[np.ndarray], np.ndarray], count: int = 8):
    """(images, lines) for `samples.png`: reference caption and top-3 zero-shot labels of the
    first `count` retrieval images (uses the classifier of the last `run`)."""
    images = self.rt_images[:count]
    scores = batched(embed_images, images, self.cfg.batch_size) @ self._last_classifier.T
    top3 = np.argsort(-scores, axis=1)[:, :3]
    lines = [[f"reference: {caption}",
              "zero-shot: " + ", ".join(self.class_names[c] for c in row)]
             for caption, row in zip(self.rt_captions[:count], top3)]
    return images, lines
