"""BLEU and CIDEr-D must equal the COCO caption toolkit (pycocoevalcap) exactly."""
import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vljax.evals import caption_metrics

_HAND_WRITTEN = {
    "dog": ("a dog runs on the grass",
            ["a dog is running on the grass", "a brown dog runs across a green field",
             "the dog runs on grass"]),
    "repeat": ("a man a man a man riding a horse",
               ["a man riding a horse", "a person on a horse on a beach"]),
    "short": ("a cat", ["a cat sitting on a red couch next to a pillow",
                        "a small cat lies on a couch", "cat on couch", "a grey cat resting",
                        "a cat is sleeping on the sofa"]),
    "long": ("a very large red double decker bus driving down a busy city street with many "
             "people walking next to it", ["a red bus on a street"]),
    "none": ("purple elephants juggle violins", ["a plate of food on a table",
                                                 "a sandwich and fries on a plate"]),
    "exact": ("two birds sitting on a wire", ["two birds sitting on a wire",
                                              "birds perched on a power line"]),
    "empty": ("", ["a kitchen with a stove", "an empty kitchen"]),
    "tie": ("a b c d e", ["a b c d", "a b c d e f"]),  # closest reference length: tie -> 4
}


def _fixture_captions():
  """~20 images: hand-written edge cases plus random captions over a small vocabulary."""
  candidates = {key: cand for key, (cand, _) in _HAND_WRITTEN.items()}
  references = {key: refs for key, (_, refs) in _HAND_WRITTEN.items()}
  words = "a the dog cat man on in sitting red blue table with".split()
  rng = np.random.default_rng(0)
  for i in range(12):
    caption = lambda: " ".join(rng.choice(words, size=rng.integers(1, 14)))  # noqa: E731
    candidates[i] = caption()
    references[i] = [caption() for _ in range(rng.integers(1, 6))]
  return candidates, references


def _toolkit_inputs(candidates, references):
  return references, {key: [cand] for key, cand in candidates.items()}


def test_bleu_equals_toolkit():
  candidates, references = _fixture_captions()
  expected, _ = Bleu(4).compute_score(*_toolkit_inputs(candidates, references), verbose=0)
  np.testing.assert_allclose(caption_metrics.bleu(candidates, references), expected,
                             rtol=1e-6, atol=1e-9)
  assert 0.05 < expected[3] < expected[0] < 1  # the fixture is neither trivial nor degenerate


def test_cider_d_equals_toolkit():
  candidates, references = _fixture_captions()
  expected, expected_per_image = Cider().compute_score(
      *_toolkit_inputs(candidates, references))
  per_image = caption_metrics.cider_d_per_image(candidates, references)
  np.testing.assert_allclose([per_image[key] for key in references], expected_per_image,
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(caption_metrics.cider_d(candidates, references), expected,
                             rtol=1e-6)
  assert per_image["none"] == 0 and per_image["exact"] > 1


@pytest.mark.parametrize("subset", [["dog"], ["short", "long"], ["tie", "short"], ["empty", 3, 5]])
def test_small_corpora_equal_toolkit(subset):
  """Corpus statistics (brevity penalty, document frequencies) depend on the set evaluated."""
  all_candidates, all_references = _fixture_captions()
  candidates = {key: all_candidates[key] for key in subset}
  references = {key: all_references[key] for key in subset}
  bleu_expected, _ = Bleu(4).compute_score(*_toolkit_inputs(candidates, references), verbose=0)
  cider_expected, _ = Cider().compute_score(*_toolkit_inputs(candidates, references))
  scores = caption_metrics.caption_scores(candidates, references)
  np.testing.assert_allclose([scores[f"bleu{n}"] for n in range(1, 5)], bleu_expected,
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(scores["cider"], cider_expected, rtol=1e-6, atol=1e-9)


def test_hand_computed_bleu():
  # Unigram matches are clipped by the reference count: 1 of 4, no brevity penalty.
  scores = caption_metrics.bleu({0: "a a a a"}, {0: ["a b"]})
  assert scores[0] == pytest.approx(0.25, rel=1e-8)
  # A candidate half the reference length: brevity penalty exp(1 - 4/2); precision 1 for
  # n <= 2, and no 3-grams, which the toolkit's smoothing turns into a factor 1e-15/1e-9.
  scores = caption_metrics.bleu({0: "a b"}, {0: ["a b c d"]})
  penalty = math.exp(-1.0)
  np.testing.assert_allclose(scores, [penalty, penalty, penalty * 1e-2, penalty * 1e-3],
                             rtol=1e-6)


def test_hand_computed_cider_d():
  # Identical two-word captions: cosine 1 for unigrams and bigrams, 0 for the (empty) 3- and
  # 4-grams, so each image scores 10 * (1 + 1 + 0 + 0) / 4 = 5.
  per_image = caption_metrics.cider_d_per_image({0: "a b", 1: "c d"}, {0: ["a b"], 1: ["c d"]})
  assert per_image == pytest.approx({0: 5.0, 1: 5.0}, rel=1e-12)
  # Same words plus one more in the reference: unigram cosine 2/sqrt(6), bigram 1/sqrt(2)
  # (all weights log 2), and a Gaussian length penalty exp(-1 / 72).
  per_image = caption_metrics.cider_d_per_image({0: "a b", 1: "c d"},
                                                {0: ["a b e"], 1: ["c d"]})
  expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
  assert per_image[0] == pytest.approx(expected, rel=1e-12)


def test_mismatched_keys_raise():
  with pytest.raises(ValueError, match="same keys"):
    caption_metrics.bleu({0: "a"}, {1: ["a"]})
  with pytest.raises(ValueError, match="non-empty list"):
    caption_metrics.cider_d({0: "a"}, {0: "a"})


@pytest.mark.parametrize("raw, tokenized", [
    ("A man riding a horse.", "a man riding a horse"),
    ("Two dogs, one cat; and a bird!", "two dogs one cat and a bird"),
    ("The man's dog doesn't bark", "the man 's dog does n't bark"),
    ('A "black-and-white" photo (old) of 3.5 cats...', "a black-and-white photo old of 3.5 cats"),
    ("The dogs' toys -- red, blue", "the dogs toys red blue"),
    ("  Is it\na U.S. flag?  ", "is it a u.s. flag"),
])
def test_tokenize_caption(raw, tokenized):
  assert caption_metrics.tokenize_caption(raw) == tokenized


def test_caption_scores_tokenizes_raw_captions():
  raw = caption_metrics.caption_scores({0: "A Dog.", 1: "A cat!"},
                                       {0: ["a dog"], 1: ["A cat, sitting."]}, tokenize=True)
  tokenized = caption_metrics.caption_scores({0: "a dog", 1: "a cat"},
                                             {0: ["a dog"], 1: ["a cat sitting"]})
  assert raw == tokenized
  assert sorted(raw) == ["bleu1", "bleu2", "bleu3", "bleu4", "cider"]
