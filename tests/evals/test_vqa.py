"""VQA accuracy: the official normalisation and the leave-one-out soft score, on hand cases."""
import random
import re
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
    # More of each rule.
    ("one dog and three cats", "1 dog and 3 cats"),
    ("yes, 2,000", "yes 2000"),  # a digit-comma-digit anywhere deletes all punctuation
    ("red/blue", "red blue"),
    ("red / blue", "red blue"),
    ("it is 2.50.", "it is 2.50"),
    ("a.m.", "am"),
    ("twas", "'twas"),
    ("yall", "y'all"),
    ("oclock", "o'clock"),
    ("let's", "let's"),
    ("shes", "shes"),  # "shes" is not in the table; "she's" maps to itself.
    ("dog's", "dog's"),  # apostrophes are not punctuation
    ("*", "*"),
]


@pytest.mark.parametrize("raw, expected", _NORMALISATION_CASES)
def test_normalize_answer_hand_cases(raw, expected):
  assert vqa.normalize_answer(raw) == expected
  assert vqa.normalize_answer(expected) == expected


def test_at_most_32_stray_periods_are_deleted():
  # The official script passes re.UNICODE (32) where re.sub takes its count.
  assert vqa.normalize_answer("." * 40) == "." * 8
  assert vqa.normalize_answer("a." * 33) == "a" * 33 + "."


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


def test_official_mode_leaves_unanimous_answers_alone():
  # The official script always normalises the prediction; the human answers only when they
  # disagree, and then only their punctuation.
  assert vqa.vqa_accuracy("Yes.", ["yes"] * 10, official=True) == 1.0
  assert vqa.vqa_accuracy("2", ["Two"] * 10) == 1.0
  assert vqa.vqa_accuracy("2", ["Two"] * 10, official=True) == 0.0
  assert vqa.vqa_accuracy("two", ["two"] * 10, official=True) == 0.0  # prediction -> "2"
  mixed = ["yes."] * 9 + ["no"]
  assert vqa.vqa_accuracy("Yes.", mixed, official=True) == pytest.approx(1.0)
  assert vqa.vqa_accuracy("2", ["two"] * 9 + ["3"], official=True) == 0.0  # no digit mapping


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


# The contraction table of the official script (GT-Vision-Lab/VQA, vqaEval.py), verbatim.
_OFFICIAL_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}


def test_contraction_table_is_the_official_one():
  # Entries that change nothing ("let's", "she's") or never match a lower-cased word ("Im")
  # make no difference.
  effective = {k: v for k, v in _OFFICIAL_CONTRACTIONS.items() if k != v and k == k.lower()}
  ours = {k: v for k, v in vqa.CONTRACTIONS.items() if k != v and k == k.lower()}
  assert ours == effective


# The official script's normalisation and scoring, transcribed, as the reference.
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!"]
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
               "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def _official_punctuation(in_text):
  out_text = in_text
  for p in _PUNCT:
    if (p + " " in in_text or " " + p in in_text) or re.search(r"(\d)(\,)(\d)", in_text):
      out_text = out_text.replace(p, "")
    else:
      out_text = out_text.replace(p, " ")
  return re.compile(r"(?!<=\d)(\.)(?!\d)").sub("", out_text, 32)


def _official_digit_article(in_text):
  out = [_MANUAL_MAP.get(w, w) for w in in_text.lower().split()]
  out = [w for w in out if w not in ("a", "an", "the")]
  return " ".join(_OFFICIAL_CONTRACTIONS.get(w, w) for w in out)


def _official_score(prediction, answers):
  prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
  prediction = _official_digit_article(_official_punctuation(prediction))
  if len(set(answers)) > 1:
    answers = [_official_punctuation(a) for a in answers]
  accs = []
  for i in range(len(answers)):
    others = answers[:i] + answers[i + 1:]
    accs.append(min(1, sum(a == prediction for a in others) / 3))
  return sum(accs) / len(accs)


def test_official_mode_matches_the_official_script():
  rng = random.Random(0)
  words = ["yes", "no", "Yes.", "two", "2", "the dog", "dog", "dont", "don't", "black-and-white",
           "black and white", "1,000", "1000", "3.5", "red!", "red", "a.m.", " red ", "Whats",
           "what's", "none", "0", "(left)", "left"]
  for _ in range(400):
    pool = rng.sample(words, rng.randint(1, 4))
    answers = [rng.choice(pool) for _ in range(10)]
    prediction = rng.choice(words)
    assert vqa.vqa_accuracy(prediction, answers, official=True) == pytest.approx(
        _official_score(prediction, answers), abs=1e-12), (prediction, answers)
    # On answers already in normal form the default mode agrees with the script.
    normal = [vqa.normalize_answer(a) for a in answers]
    assert vqa.vqa_accuracy(prediction, normal) == pytest.approx(
        _official_score(prediction, normal), abs=1e-12), (prediction, normal)
