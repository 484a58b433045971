"""VQAv2 accuracy: the official evaluation's answer normalisation and its 10-annotator soft score.

Written from the rules of the official VQA evaluation (Agrawal et al., `vqaEval.py` of the VQA
API, GT-Vision-Lab/VQA, as used by the VQAv2 challenge, LAVIS and lmms-eval):

1. newlines and tabs become spaces, the ends are stripped;
2. punctuation: each character of `PUNCTUATION` is deleted when it stands next to a space
   anywhere in the answer (or when the answer holds a digit-comma-digit number such as "1,000"),
   and otherwise replaced by a space ("black-and-white" -> "black and white"); then every
   period not followed by a digit is deleted ("yes." -> "yes", "3.5" stays), at most 32 of them
   (the script passes `re.UNICODE`, 32, where `re.sub` takes its count);
3. lower case, split on whitespace; number words "none", "zero" .. "ten" become digits; the
   articles "a", "an", "the" are dropped; apostrophe-less contractions get their apostrophes
   back ("dont" -> "don't", "whats" -> "what's"); words joined by single spaces.

The score of a prediction against the 10 human answers averages, over the 10 subsets of 9
annotators that leave one out, min(#annotators in the subset who gave the prediction / 3, 1):
an answer given by 1, 2, 3 or >= 4 annotators scores 0.3, 0.6, 0.9 and 1.0.

One deliberate difference: the official script normalises the prediction fully (1-3) but the
human answers only partly: not at all when the 10 are identical, else punctuation only (2).
VQAv2's answers are stored in normal form, so this only matters for answers that are not, e.g.
ten "Two" against a prediction "2". Here the human answers get the full normalisation too;
`official=True` restores the script's behaviour exactly.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence

NUM_ANNOTATORS = 10
# An answer given by this many annotators (of the 9 in a leave-one-out subset) scores 1.
MATCHES_FOR_FULL_SCORE = 3

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
    "`", ",", "?", "!")

NUMBER_WORDS: Mapping[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The contractions the official table restores, in their correct spelling. The table accepts
# each with its apostrophe left out or, for those with several, with any one apostrophe left
# out ("couldnt've" and "couldn'tve" -> "couldn't've", but not "couldntve").
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've "
    "hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've "
    "it'll ma'am mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't "
    "'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll "
    "somebody's someone'd someone'd've someone'll someone's something'd something'd've "
    "something'll that's there'd there'd've there're there's they'd they'd've they'll they're "
    "they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd "
    "where's where've who'd who'd've who'll who's who've why'll why're why's won't would've "
    "wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_table() -> dict[str, str]:
  table = {}
  for word in _CONTRACTIONS:
    positions = [i for i, char in enumerate(word) if char == "'"]
    for i in positions:
      table[word[:i] + word[i + 1:]] = word
  # Quirks of the official table: an entry that maps a correct spelling to a wrong one. (It also
  # holds capitalised keys, "Im", "Ive", "Id've", that never match: words are lower-cased first.)
  table["somebody'd"] = "somebodyd"
  return table


CONTRACTIONS: Mapping[str, str] = _contraction_table()

_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern means "a period not followed by a digit"; its attempt at "not preceded by
# a digit" is written as a lookahead for the literal text "<=" plus a digit, which never fires
# before a period, so "3." loses its period and ".5" keeps it.
_STRAY_PERIOD = re.compile(r"\.(?!\d)")
# The official script's `periodStrip.sub("", text, re.UNICODE)` passes re.UNICODE (32) as the
# count of replacements.
_STRAY_PERIOD_LIMIT = 32


def _strip_punctuation(text: str) -> str:
  has_number_with_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
  out = text
  for char in PUNCTUATION:
    # The test looks at the input, not at what earlier characters' replacements left.
    if has_number_with_comma or char + " " in text or " " + char in text:
      out = out.replace(char, "")
    else:
      out = out.replace(char, " ")
  return _STRAY_PERIOD.sub("", out, count=_STRAY_PERIOD_LIMIT)


def _normalize_words(text: str) -> str:
  words = []
  for word in text.lower().split():
    word = NUMBER_WORDS.get(word, word)
    if word not in ARTICLES:
      words.append(CONTRACTIONS.get(word, word))
  return " ".join(words)


def _clean_whitespace(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
  """The official VQA normalisation of an answer (see the module docstring for the rules)."""
  return _normalize_words(_strip_punctuation(_clean_whitespace(text)))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, official: bool = False) -> float:
  """The VQA soft score of `prediction` against the human `answers` (10 in VQAv2), in [0, 1].

  The mean over the leave-one-out subsets of `answers` of min(#matches in the subset / 3, 1),
  after normalising the prediction and every answer. With a single ground truth repeated 10
  times (the shapes world, `[answer] * 10`) it is exact match after normalisation: 1 or 0.
  `official=True` normalises the human answers as the official script does: not at all when
  they are identical, else their punctuation only.
  """
  if not answers:
    raise ValueError("vqa_accuracy needs at least one human answer.")
  prediction = normalize_answer(prediction)
  if not official:
    answers = [normalize_answer(answer) for answer in answers]
  elif len(set(answers)) > 1:
    answers = [_strip_punctuation(answer) for answer in answers]
  matches = sum(answer == prediction for answer in answers)
  total = 0.0
  for left_out in answers:
    in_subset = matches - (left_out == prediction)
    total += min(in_subset / MATCHES_FOR_FULL_SCORE, 1.0)
  return total / len(answers)


def vqa_scores(predictions: Sequence[str], answers_lists: Sequence[Sequence[str]],
               question_types: Sequence[str] | None = None, *,
               official: bool = False) -> dict[str, float]:
  """Mean VQA accuracy over questions, in [0, 1] (the official script reports 100x this).

  Returns {"accuracy": mean, "count": number of questions} and, when `question_types` is given
  (one name per question), "accuracy/<type>" for each type; an evaluator prefixes the keys
  (e.g. "vqa/accuracy/colour"). Fails if the three sequences differ in length or are empty.
  """
  if len(predictions) != len(answers_lists):
    raise ValueError(f"{len(predictions)} predictions but {len(answers_lists)} answer lists.")
  if question_types is not None and len(question_types) != len(predictions):
    raise ValueError(f"{len(question_types)} question types for {len(predictions)} "
                     "predictions.")
  if not predictions:
    raise ValueError("vqa_scores needs at least one question.")
  scores = [vqa_accuracy(prediction, answers, official=official)
            for prediction, answers in zip(predictions, answers_lists)]
  result = {"accuracy": sum(scores) / len(scores), "count": float(len(scores))}
  if question_types is not None:
    by_type = collections.defaultdict(list)
    for question_type, score in zip(question_types, scores):
      by_type[question_type].append(score)
    for question_type in sorted(by_type):
      type_scores = by_type[question_type]
      result[f"accuracy/{question_type}"] = sum(type_scores) / len(type_scores)
  return result
