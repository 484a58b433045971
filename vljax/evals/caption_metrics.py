"""Captioning metrics: BLEU-1..4 and CIDEr-D, as the COCO caption evaluation toolkit computes them.

The numbers reproduce `pycocoevalcap` (the toolkit behind every published COCO captioning score)
to floating-point round-off, including its quirks: corpus-level BLEU with the "closest"
reference length and tiny/small smoothing constants, and CIDEr-D (the toolkit's `Cider` class
is CIDEr-D: clipped counts and a Gaussian length penalty) with document frequencies taken from
the references of the evaluated set. No Java is needed: `tokenize_caption` stands in for the
toolkit's Stanford PTB tokenizer + punctuation filter on plain English captions.

Inputs are `candidates: {key: caption}` and `references: {key: [caption, ...]}` with the same
keys, every caption already tokenized (lowercase words separated by single spaces).
"""
from __future__ import annotations

import collections
import math
import re
from collections.abc import Hashable, Mapping, Sequence

MAX_ORDER = 4
# BLEU smoothing constants of the toolkit: `tiny` in numerators makes a zero match count give
# (almost) zero rather than 0/0; `small` in denominators avoids dividing by zero.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9
CIDER_SIGMA = 6.0

NgramCounts = collections.Counter  # tuple[str, ...] -> count

# Tokens the toolkit drops after PTB tokenization (PTB turns quotes into `` and '' and brackets
# into -LRB- / -RRB- / -LCB- / -RCB-, which are in this list as well).
_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"',
     "(", ")", "{", "}", "[", "]"])
# PTB splits these clitics off the word they end: "man's" -> "man 's", "don't" -> "do n't".
_CLITIC_RE = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_TOKEN_RE = re.compile(
    r"(?:[^\W\d_]\.){2,}"            # abbreviations kept whole: "u.s.", "e.g."
    r"|\d+(?:[.,:]\d+)+"             # numbers with inner separators: "3.5", "1,000", "10:30"
    r"|[^\W_]+(?:['\-/&][^\W_]+)*'?"  # words with inner hyphens/apostrophes: "black-and-white"
    r"|\.\.\.|--"                    # multi-character punctuation
    r"|\S")                          # any other single symbol
_WORD_WITH_APOSTROPHE_RE = re.compile(r"^[^\W_]+'$")


def tokenize_caption(text: str) -> str:
  """Lowercases and tokenizes a raw caption the way the toolkit's PTB pipeline does.

  Punctuation tokens are removed, clitics split ("man's" -> "man 's"), inner hyphens and
  decimal points kept. An approximation of Stanford's PTBTokenizer that agrees with it on
  ordinary English captions; exotic inputs (URLs, emoticons) may tokenize differently.
  """
  tokens = []
  for token in _TOKEN_RE.findall(text.lower().replace("\n", " ")):
    # A trailing apostrophe ("dogs'") is a separate token for PTB, dropped as punctuation.
    if _WORD_WITH_APOSTROPHE_RE.match(token):
      token = token[:-1]
    clitic = _CLITIC_RE.match(token)
    if clitic:
      tokens.extend(clitic.groups())
    elif token not in _PUNCTUATION:
      tokens.append(token)
  return " ".join(tokens)


def _ngram_counts(caption: str, max_order: int = MAX_ORDER) -> tuple[int, NgramCounts]:
  """Returns (number of words, counts of every n-gram with 1 <= n <= max_order)."""
  words = caption.split()
  counts = collections.Counter()
  for order in range(1, max_order + 1):
    for start in range(len(words) - order + 1):
      counts[tuple(words[start:start + order])] += 1
  return len(words), counts


def _check_keys(candidates: Mapping, references: Mapping) -> list:
  """Returns the shared keys in the candidates' order; raises if the two key sets differ."""
  if set(candidates) != set(references):
    raise ValueError("candidates and references must have the same keys; "
                     f"{len(set(candidates) ^ set(references))} keys differ")
  for key, refs in references.items():
    if isinstance(refs, str) or len(refs) == 0:
      raise ValueError(f"references[{key!r}] must be a non-empty list of captions")
  return list(candidates)


def bleu(candidates: Mapping[Hashable, str],
         references: Mapping[Hashable, Sequence[str]],
         max_order: int = MAX_ORDER) -> list[float]:
  """Corpus BLEU-1..max_order, as pycocoevalcap's `Bleu(4)` computes it.

  Matched n-grams are clipped by their largest count in any one reference and summed over the
  corpus; the brevity penalty uses, per candidate, the reference length closest to the
  candidate's (the shorter one on ties), summed over the corpus.
  """
  keys = _check_keys(candidates, references)
  matched = [0] * max_order
  possible = [0] * max_order
  total_candidate_len = 0
  total_reference_len = 0
  for key in keys:
    candidate_len, candidate_counts = _ngram_counts(candidates[key], max_order)
    max_ref_counts: dict[tuple[str, ...], int] = {}
    ref_lens = []
    for ref in references[key]:
      ref_len, ref_counts = _ngram_counts(ref, max_order)
      ref_lens.append(ref_len)
      for ngram, count in ref_counts.items():
        max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), count)
    total_candidate_len += candidate_len
    total_reference_len += min(ref_lens, key=lambda n: (abs(n - candidate_len), n))
    for order in range(1, max_order + 1):
      possible[order - 1] += max(0, candidate_len - order + 1)
    for ngram, count in candidate_counts.items():
      matched[len(ngram) - 1] += min(count, max_ref_counts.get(ngram, 0))

  # BLEU-n is the geometric mean of the first n precisions, built up as a running product.
  scores = []
  product = 1.0
  for order in range(max_order):
    product *= (matched[order] + _BLEU_TINY) / (possible[order] + _BLEU_SMALL)
    scores.append(product ** (1.0 / (order + 1)))
  length_ratio = (total_candidate_len + _BLEU_TINY) / (total_reference_len + _BLEU_SMALL)
  if length_ratio < 1:
    brevity_penalty = math.exp(1.0 - 1.0 / length_ratio)
    scores = [score * brevity_penalty for score in scores]
  return scores


def _tfidf(counts: NgramCounts, log_num_images: float, document_frequency: Mapping,
           max_order: int) -> tuple[list[dict], list[float]]:
  """TF-IDF vector (one dict per n-gram order) of a caption and the vector's norm per order.

  idf = log(number of images) - log(max(1, images whose references contain the n-gram)), so
  an n-gram unseen in the references gets the largest weight, as in the toolkit.
  """
  vectors: list[dict] = [{} for _ in range(max_order)]
  squared_norms = [0.0] * max_order
  for ngram, term_frequency in counts.items():
    weight = term_frequency * (
        log_num_images - math.log(max(1.0, document_frequency.get(ngram, 0.0))))
    vectors[len(ngram) - 1][ngram] = weight
    squared_norms[len(ngram) - 1] += weight * weight
  return vectors, [math.sqrt(s) for s in squared_norms]


def cider_d_per_image(candidates: Mapping[Hashable, str],
                      references: Mapping[Hashable, Sequence[str]],
                      max_order: int = MAX_ORDER, sigma: float = CIDER_SIGMA,
                      ) -> dict[Hashable, float]:
  """CIDEr-D of every candidate, as pycocoevalcap's `Cider` computes it (its mean is the score).

  For each n-gram order: cosine similarity of TF-IDF vectors with the candidate's weights
  clipped by the reference's, times a Gaussian penalty exp(-delta^2 / (2 sigma^2)) on the
  length difference; averaged over orders and references, times 10. Document frequencies
  come from the references of all the images passed in.
  """
  keys = _check_keys(candidates, references)
  ref_counts = {key: [_ngram_counts(ref, max_order)[1] for ref in references[key]]
                for key in keys}
  document_frequency: collections.Counter = collections.Counter()
  for key in keys:
    document_frequency.update(set().union(*ref_counts[key]))
  log_num_images = math.log(float(len(keys)))

  def length(counts: NgramCounts) -> int:
    # The toolkit measures length as the number of bigrams (words - 1, or 0 when empty):
    # length differences are word-count differences, except against an empty caption,
    # whose similarity is 0 anyway.
    return sum(c for ngram, c in counts.items() if len(ngram) == 2)

  scores = {}
  for key in keys:
    candidate_counts = _ngram_counts(candidates[key], max_order)[1]
    cand_vectors, cand_norms = _tfidf(candidate_counts, log_num_images, document_frequency,
                                      max_order)
    cand_length = length(candidate_counts)
    per_order = [0.0] * max_order
    for counts in ref_counts[key]:
      ref_vectors, ref_norms = _tfidf(counts, log_num_images, document_frequency, max_order)
      delta = float(cand_length - length(counts))
      penalty = math.exp(-(delta ** 2) / (2 * sigma ** 2))
      for order in range(max_order):
        ref_vector = ref_vectors[order]
        dot = sum(min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
                  for ngram, weight in cand_vectors[order].items())
        if cand_norms[order] != 0 and ref_norms[order] != 0:
          dot /= cand_norms[order] * ref_norms[order]
        per_order[order] += dot * penalty
    scores[key] = 10.0 * (sum(per_order) / max_order) / len(ref_counts[key])
  return scores


def cider_d(candidates: Mapping[Hashable, str],
            references: Mapping[Hashable, Sequence[str]],
            max_order: int = MAX_ORDER, sigma: float = CIDER_SIGMA) -> float:
  """Corpus CIDEr-D: the mean over images of `cider_d_per_image`."""
  per_image = cider_d_per_image(candidates, references, max_order, sigma)
  return sum(per_image.values()) / len(per_image)


def caption_scores(candidates: Mapping[Hashable, str],
                   references: Mapping[Hashable, Sequence[str]],
                   tokenize: bool = False) -> dict[str, float]:
  """BLEU-1..4 and CIDEr-D as {"bleu1", ..., "bleu4", "cider"}.

  Pass `tokenize=True` for raw captions; by default they are taken as already tokenized.
  """
  if tokenize:
    candidates = {key: tokenize_caption(c) for key, c in candidates.items()}
    references = {key: [tokenize_caption(r) for r in refs] for key, refs in references.items()}
  scores = {f"bleu{order + 1}": value for order, value in enumerate(bleu(candidates, references))}
  scores["cider"] = cider_d(candidates, references)
  return scores
