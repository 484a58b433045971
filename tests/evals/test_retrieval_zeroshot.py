"""Zero-shot and retrieval metrics on hand-built embeddings whose answers are known."""
import numpy as np
import pytest

from vljax.evals.retrieval import retrieval_metrics
from vljax.evals.zeroshot import zeroshot_accuracy, zeroshot_classifier


def test_retrieval_hand_built():
  # 3 images on the axes; texts: t0 -> img0 (exact), t1 -> img1 but closer to img2, t2 -> img2.
  img = np.eye(3)
  txt = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0.1, 0.99]])
  m = retrieval_metrics(img, txt, ks=(1, 2))
  # image->text: img0 ranks t0 first; img1 ranks t1 (0.6) first; img2 ranks t2 (0.99) first.
  assert m["retrieval/i2t/r@1"] == pytest.approx(1.0)
  # text->image: t0 -> img0 yes; t1 scores img2 (0.8) above img1 (0.6): miss at 1, hit at 2; t2 yes.
  assert m["retrieval/t2i/r@1"] == pytest.approx(2 / 3)
  assert m["retrieval/t2i/r@2"] == pytest.approx(1.0)


def test_retrieval_several_texts_per_image_and_ties():
  img = np.array([[1.0, 0.0], [0.0, 1.0]])
  txt = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # t0, t1 belong to img0; t2 to img1
  m = retrieval_metrics(img, txt, text_to_image=[0, 0, 1], ks=(1,))
  # img0's best own text (t1) ranks first; img1 ties t0 (negative) with t2: a tie is a miss.
  assert m["retrieval/i2t/r@1"] == pytest.approx(0.5)
  assert m["retrieval/t2i/r@1"] == pytest.approx(2 / 3)  # t0 -> img1 beats img0


def test_retrieval_rejects_bad_input():
  with pytest.raises(ValueError, match="one text per image"):
    retrieval_metrics(np.eye(3), np.eye(3)[:2])
  with pytest.raises(ValueError, match="at least one text"):
    retrieval_metrics(np.eye(3), np.eye(3), text_to_image=[0, 0, 1])


def test_zeroshot_classifier_averages_prompts_and_scores():
  # Fake text embedder: the embedding of a prompt depends on the class word and the template.
  classes = ["red", "blue"]
  templates = ["a {}.", "the {}!"]
  vectors = {"a red.": [1, 0.2, 0], "the red!": [1, -0.2, 0], "a blue.": [0, 1, 0.1],
             "the blue!": [0, 1, -0.1]}
  embed = lambda texts: np.array([vectors[t] for t in texts], float)
  classifier = zeroshot_classifier(embed, classes, templates)
  np.testing.assert_allclose(classifier, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
  images = np.array([[0.9, 0.1, 0], [0.2, 0.8, 0], [0.6, 0.4, 0]])
  m = zeroshot_accuracy(images, classifier, [0, 0, 1], ks=(1, 2))
  assert m["zeroshot/top1"] == pytest.approx(1 / 3)
  assert m["zeroshot/top2"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="labels must lie"):
    zeroshot_accuracy(images, classifier, [0, 2, 1])
