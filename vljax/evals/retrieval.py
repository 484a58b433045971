"""Image-text retrieval: Recall@K in both directions from embeddings.

Each text belongs to one image (`text_to_image[j]` is its image's row); an image may own several
texts (COCO has five). Image->text R@K counts an image as hit when any of its texts ranks in the
top K; text->image R@K when the text's own image does.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _rank_of_best(scores_nm: np.ndarray, positives_nm: np.ndarray) -> np.ndarray:
  """0-based rank of the best-scoring positive of each row (ties count against the positive)."""
  best_pos = np.where(positives_nm, scores_nm, -np.inf).max(axis=1)
  # Negatives scoring >= the best positive outrank it: a tie is not a win.
  return (np.where(positives_nm, -np.inf, scores_nm) >= best_pos[:, None]).sum(axis=1)


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray,
                      text_to_image: Sequence[int] | None = None,
                      ks: Sequence[int] = (1, 5, 10), prefix: str = "retrieval") -> dict[str, float]:
  """R@K for image->text and text->image; embeddings are compared by dot product."""
  image_emb = np.asarray(image_emb, np.float32)
  text_emb = np.asarray(text_emb, np.float32)
  if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
    raise ValueError(f"embeddings must be [N, D] and [M, D], got {image_emb.shape} and {text_emb.shape}")
  num_images, num_texts = len(image_emb), len(text_emb)
  if text_to_image is None:
    if num_images != num_texts:
      raise ValueError("without text_to_image, there must be one text per image")
    text_to_image = np.arange(num_texts)
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (num_texts,) or text_to_image.min() < 0 or text_to_image.max() >= num_images:
    raise ValueError("text_to_image must give an image row in [0, N) for each text")
  scores_nm = image_emb @ text_emb.T
  owns_nm = text_to_image[None, :] == np.arange(num_images)[:, None]
  if not owns_nm.any(axis=1).all():
    raise ValueError("every image needs at least one text")
  i2t_rank = _rank_of_best(scores_nm, owns_nm)
  t2i_rank = _rank_of_best(scores_nm.T, owns_nm.T)
  out = {}
  for k in ks:
    out[f"{prefix}/i2t/r@{k}"] = float(np.mean(i2t_rank < k))
    out[f"{prefix}/t2i/r@{k}"] = float(np.mean(t2i_rank < k))
  return out
