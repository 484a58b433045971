"""VQA accuracy: the official normalisation and the leave-one-out soft score, on hand cases."""
from fractions import Fraction

import pytest

from vljax.evals import vqa

# (raw answer, what the official VQA evaluation normalises it to), worked out from its rules.
_NORMALISATION_CASES = [
    # Periods: dropped unless a digit follows.
    ("yes.", "yes"),
    ("3.5", "3.5"),
    ("3.", "3"),
    (".5", ".5"),
    ("U.S.", "us"),
    # A digit-comma-digit number deletes every punctuation character of the answer.
    ("1,000", "1000"),
    ("1,000-2,000", "10002000"),
    # Punctuation next to a space is deleted, elsewhere it becomes a space.
    ("black-and-white", "black and white"),
    ("black - white", "black white"),
    ("red,blue", "red blue"),
    ("hello, world", "hello world"),
    ("(left)", "left"),
    ("what?", "what"),
    ("yes!", "yes"),
    ("10:30", "10:30"),  # ":" is not in the punctuation list.
    # Number words zero..ten (and "none") to digits; others stay.
    ("two", "2"),
    ("Ten dogs", "10 dogs"),
    ("none", "0"),
    ("zero", "0"),
    ("eleven", "eleven"),
    ("21", "21"),
    # Articles.
    ("the red circle", "red circle"),
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("the", ""),
    # Contractions: apostrophes restored, correct spellings kept.
    ("dont", "don't"),
    ("don't", "don't"),
    ("Whats", "what's"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("couldntve", "couldntve"),  # Not in the official table: only one apostrophe may be missing.
    ("im", "im"),  # The table's "Im" key is capitalised and never matches lower-cased words.
    ("somebody'd", "somebodyd"),  # A quirk of the official table, kept.
    ("it's", "it's"),
    # Case and whitespace.
    ("  Two\tDogs\n", "2 dogs"),
    ("YES", "yes"),
]


@pytest.mark.parametrize("raw, expected", _NORMALISATION_CASES)
def test_normalize_answer_hand_cases(raw, expected):
  assert vqa.normalize_answer(raw) == expected
  assert vqa.normalize_answer(expected) == expected


def _answers(matches: int, prediction: str = "red") -> list[str]:
  """10 human answers, `matches` of which are `prediction`, the rest spread over others."""
  others = ["blue", "green", "white"]
  return [prediction] * matches + [others[i % 3] for i in range(10 - matches)]


# Leave-one-out by hand: with k of 10 annotators matching, the 10 - k subsets that leave out a
# non-matching annotator hold k matches and the k subsets that leave out a matching one hold k - 1.
_SOFT_SCORES = {
    0: Fraction(0),
    1: (9 * Fraction(1, 3) + 1 * Fraction(0)) / 10,  # 3/10
    2: (8 * Fraction(2, 3) + 2 * Fraction(1, 3)) / 10,  # 6/10
    3: (7 * Fraction(1) + 3 * Fraction(2, 3)) / 10,  # 9/10
    4: (6 * Fraction(1) + 4 * Fraction(1)) / 10,  # 1
    7: Fraction(1),
    10: Fraction(1),
}


@pytest.mark.parametrize("matches", sorted(_SOFT_SCORES))
def test_soft_score_leave_one_out(matches):
  expected = _SOFT_SCORES[matches]
  assert vqa.vqa_accuracy("red", _answers(matches)) == pytest.approx(float(expected), abs=1e-12)


def test_soft_scores_are_the_familiar_values():
  assert [float(_SOFT_SCORES[k]) for k in (1, 2, 3, 4)] == [0.3, 0.6, 0.9, 1.0]


def test_soft_score_normalises_prediction_and_answers():
  answers = ["2"] * 2 + ["two"] + ["3"] * 7  # Three annotators said 2.
  assert vqa.vqa_accuracy("Two.", answers) == pytest.approx(0.9)
  assert vqa.vqa_accuracy("the 3", answers) == pytest.approx(1.0)
  assert vqa.vqa_accuracy("4", answers) == 0.0


def test_single_answer_repeated_reduces_to_exact_match():
  cases = [("Red.", "red"), ("red", "red"), ("blue", "red"), ("two", "2"), ("top left", "top left"),
           ("the top left", "top left"), ("top", "top left"), ("Yes", "yes"), ("no", "yes")]
  for prediction, answer in cases:
    exact = vqa.normalize_answer(prediction) == vqa.normalize_answer(answer)
    assert vqa.vqa_accuracy(prediction, [answer] * 10) == float(exact), (prediction, answer)


def test_official_unanimous_quirk():
  # The official script normalises only when annotators disagree.
  assert vqa.vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
  assert vqa.vqa_accuracy("Yes.", ["yes"] * 10, official_unanimous=True) == 0.0
  mixed = ["yes"] * 9 + ["no"]
  assert vqa.vqa_accuracy("Yes.", mixed, official_unanimous=True) == pytest.approx(1.0)


def test_vqa_scores_mean_and_per_type():
  predictions = ["red", "2", "circle", "yes"]
  answers = [_answers(1), ["two"] * 10, ["square"] * 10, ["yes"] * 10]
  types = ["colour", "count", "shape", "colour"]
  scores = vqa.vqa_scores(predictions, answers, types)
  assert scores["accuracy"] == pytest.approx((0.3 + 1.0 + 0.0 + 1.0) / 4)
  assert scores["accuracy/colour"] == pytest.approx((0.3 + 1.0) / 2)
  assert scores["accuracy/count"] == 1.0
  assert scores["accuracy/shape"] == 0.0
  assert scores["count"] == 4
  assert set(vqa.vqa_scores(predictions, answers)) == {"accuracy", "count"}


@pytest.mark.parametrize("args", [
    (["a"], [["a"], ["b"]], None),
    (["a"], [["a"]], ["t", "u"]),
    ([], [], None),
])
def test_vqa_scores_rejects_bad_inputs(args):
  with pytest.raises(ValueError):
    vqa.vqa_scores(*args)
