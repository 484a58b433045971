"""Zero-shot classification (CLIP): class names x prompt templates -> averaged text embeddings."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def zeroshot_classifier(embed_texts: Callable[[list[str]], np.ndarray], class_names: Sequence[str],
                        templates: Sequence[str]) -> np.ndarray:
  """[C, D] class embeddings: each the renormalised mean of its normalised prompt embeddings."""
  prompts = [t.format(name) for name in class_names for t in templates]
  emb = _normalize(np.asarray(embed_texts(prompts), np.float32))
  emb = emb.reshape(len(class_names), len(templates), -1).mean(axis=1)
  return _normalize(emb)


def zeroshot_accuracy(image_emb: np.ndarray, classifier_cd: np.ndarray, labels: Sequence[int],
                      ks: Sequence[int] = (1, 5), prefix: str = "zeroshot") -> dict[str, float]:
  """Top-K accuracy of `argmax image_emb @ classifier.T` against integer labels."""
  labels = np.asarray(labels)
  if len(labels) != len(image_emb):
    raise ValueError(f"{len(image_emb)} images but {len(labels)} labels")
  if labels.min() < 0 or labels.max() >= len(classifier_cd):
    raise ValueError(f"labels must lie in [0, {len(classifier_cd)})")
  scores = np.asarray(image_emb, np.float32) @ classifier_cd.T
  true_score = scores[np.arange(len(labels)), labels]
  # Classes scoring >= the true class outrank it (a tie is not a win), the true class excluded.
  rank = (scores >= true_score[:, None]).sum(axis=1) - 1
  return {f"{prefix}/top{k}": float(np.mean(rank < k)) for k in ks if k <= len(classifier_cd)}
