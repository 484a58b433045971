"""Tests of the grain input pipeline on the shapes world: batches, determinism, sibling groups."""
import numpy as np
import pytest

from vljax.data import shapes
from vljax.data.pipeline import data_config, train_iterator
from vljax.data.tokenizer import shapes_tokenizer


def _batches(count, **data):
  cfg = data_config(dict(image_size=24, max_text_len=40, **data))
  it = train_iterator(cfg, shapes_tokenizer(), seed=1, global_batch_size=8)
  return [next(it) for _ in range(count)]


def test_batches_are_deterministic_and_well_formed():
  first, second = _batches(2), _batches(2)
  for a, b in zip(first, second):
    assert a["image"].shape == (8, 24, 24, 3) and a["image"].dtype == np.uint8
    assert a["text"].shape == (8, 40) and a["text"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])


def test_sibling_groups_are_adjacent_and_differ_only_in_shape_words():
  tokenizer = shapes_tokenizer()
  (batch,) = _batches(1, shape_siblings=3)
  texts = tokenizer.decode(batch["text"])
  assert len(texts) == 8 and len(set(texts)) == 8
  for start in (0, 4):  # two groups of a scene and its 3 siblings
    group = [t.split() for t in texts[start:start + 4]]
    assert all(len(words) == len(group[0]) for words in group)
    differing = {i for words in group[1:] for i, (a, b) in enumerate(zip(group[0], words))
                 if a != b}
    assert differing and all(group[0][i].strip(".,") in shapes.SHAPES for i in differing)
  with pytest.raises(ValueError, match="divisible by 3"):
    _batches(1, shape_siblings=2)
