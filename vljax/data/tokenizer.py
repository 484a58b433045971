"""SentencePiece tokenizers: a picklable wrapper with added special tokens, and the shapes-world
tokenizer trained on demand.

The shapes tokenizer is trained deterministically from `captions.text_corpus()` in memory and cached
on disk under a name that hashes the corpus and the trainer settings, so every process (and every
grain worker) of a run agrees on the same vocabulary without shipping a model file.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any, Sequence

import numpy as np
import sentencepiece as spm

from vljax.data import captions
from vljax.files import write_atomically

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Special tokens the views of `vljax.data.views` write: the image placeholder (LLaVA), the end of
# an interleaved chunk (Flamingo), and grounding's phrase and box markers (Qwen-VL).
VISION_TOKENS: tuple[str, ...] = ("<image>", "<|endofchunk|>", "<ref>", "</ref>", "<box>",
                                  "</box>")

# Fixed so that training is a pure function of the corpus: one thread, every sentence in the
# given order, no sampling. Identity normalisation keeps decode(encode(text)) == text and the
# model file small (the NFKC tables alone weigh ~240 kB). BPE never emits unk for a character
# seen in training and, with enough merges, gives each corpus word a single token.
SHAPES_TRAINER_SETTINGS: dict[str, Any] = {
    "model_type": "bpe",
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "character_coverage": 1.0,
    "normalization_rule_name": "identity",
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "minloglevel": 2,
}

# Large enough for any shapes corpus; with a soft limit BPE stops when nothing is left to merge.
_SOFT_VOCAB_LIMIT = 100_000


class Tokenizer:
  """A SentencePiece model that encodes batches to fixed-length int32 arrays and decodes them,
  plus special tokens added after its vocabulary (`<image>`, `<box>`, ...).

  An added token that is not a piece of the model gets the next free id, from the
  SentencePiece vocabulary size on, in the order given; one that already is a piece keeps that
  piece's id. `encode` treats text as plain text; `tokenize` also recognises the added tokens'
  text. Pickles as its serialized model proto and added tokens, so grain worker processes can
  rebuild it.
  """

  def __init__(self, model_proto: bytes, *, source: str = "model proto",
               added_tokens: Sequence[str] = ()):
    self._model_proto = bytes(model_proto)
    self._processor = _load_processor(self._model_proto, source=source)
    self._set_added_tokens(added_tokens)

  def _set_added_tokens(self, added_tokens: Sequence[str]) -> None:
    """Assigns ids to `added_tokens` and builds the pattern that finds them in text."""
    if isinstance(added_tokens, str):
      raise TypeError(f"added_tokens must be a sequence of strings, not the string "
                      f"{added_tokens!r}")
    added_tokens = tuple(added_tokens)
    if not all(isinstance(t, str) and t for t in added_tokens):
      raise TypeError(f"added_tokens must be a sequence of non-empty strings, got "
                      f"{added_tokens!r}")
    duplicates = sorted({t for t in added_tokens if added_tokens.count(t) > 1})
    if duplicates:
      raise ValueError(f"added_tokens repeats {', '.join(duplicates)}")
    self._added_tokens = added_tokens
    self._added_ids: dict[str, int] = {}
    next_id = self._processor.vocab_size()
    for token in added_tokens:
      piece_id = self._processor.piece_to_id(token)
      if self._processor.id_to_piece(piece_id) == token:
        self._added_ids[token] = piece_id
      else:
        self._added_ids[token] = next_id
        next_id += 1
    self._added_texts = {token_id: token for token, token_id in self._added_ids.items()}
    self._vocab_size = next_id
    # Longest first, so that a token that extends another one wins.
    by_length = sorted(added_tokens, key=len, reverse=True)
    self._added_pattern = (re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
                           if added_tokens else None)

  @classmethod
  def from_file(cls, path: str | os.PathLike[str], *,
                added_tokens: Sequence[str] = ()) -> Tokenizer:
    """Loads a SentencePiece `.model` file; a missing or corrupt file raises naming `path`."""
    try:
      with open(path, "rb") as f:
        model_proto = f.read()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"SentencePiece model file not found: {path}") from e
    return cls(model_proto, source=os.fspath(path), added_tokens=added_tokens)

  def with_added_tokens(self, tokens: Sequence[str]) -> Tokenizer:
    """This tokenizer with `tokens` added after its own added tokens (ones it has are kept)."""
    new = tuple(t for t in dict.fromkeys(tokens) if t not in self._added_ids)
    return Tokenizer(self._model_proto, added_tokens=self._added_tokens + new)

  @property
  def model_proto(self) -> bytes:
    """The serialized SentencePiece model."""
    return self._model_proto

  @property
  def added_tokens(self) -> tuple[str, ...]:
    """The special tokens added to the SentencePiece vocabulary, in order."""
    return self._added_tokens

  @property
  def vocab_size(self) -> int:
    """Number of token ids: the SentencePiece pieces (special ones included) and added tokens."""
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    """Padding id; 0 when the model defines none (the usual convention for padded batches)."""
    pad_id = self._processor.pad_id()
    return pad_id if pad_id >= 0 else 0

  @property
  def bos_id(self) -> int:
    """Beginning-of-sequence id, or -1 when the model has none."""
    return self._processor.bos_id()

  @property
  def eos_id(self) -> int:
    """End-of-sequence id, or -1 when the model has none."""
    return self._processor.eos_id()

  @property
  def unk_id(self) -> int:
    """Id of the unknown token."""
    return self._processor.unk_id()

  def token_id(self, name: str) -> int:
    """The id of an added token, or of a SentencePiece piece (e.g. "</s>"), by its text."""
    if name in self._added_ids:
      return self._added_ids[name]
    piece_id = self._processor.piece_to_id(name)
    if self._processor.id_to_piece(piece_id) == name:
      return piece_id
    raise KeyError(f"{name!r} is neither an added token ({', '.join(self._added_tokens) or 'none'})"
                   " nor a piece of this SentencePiece model; add it with "
                   "Tokenizer.with_added_tokens")

  def tokenize(self, text: str) -> list[int]:
    """The ids of one text, without bos, eos or padding; each added token's text is its one id
    and the text between them is encoded by SentencePiece (each stretch on its own)."""
    if not isinstance(text, str):
      raise TypeError(f"tokenize() takes one string, got {type(text).__name__}")
    chunks = self._added_pattern.split(text) if self._added_pattern else [text]
    ids = []
    for chunk in chunks:
      if chunk in self._added_ids:
        ids.append(self._added_ids[chunk])
      elif chunk:
        ids.extend(self._processor.encode(chunk))
    return ids

  def encode(self, texts: Sequence[str], max_len: int, *, bos: bool = False,
             eos: bool = True) -> np.ndarray:
    """Encodes `texts` as int32 [len(texts), max_len], right-padded with pad_id.

    The texts are plain text (added tokens are not recognised; see `tokenize`). Long texts are
    truncated; with `eos` the last kept token is always eos, so a model can still tell where a
    truncated text ends.
    """
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of strings; wrap a single text in a list.")
    if bos and self.bos_id < 0:
      raise ValueError("This SentencePiece model has no bos token.")
    if eos and self.eos_id < 0:
      raise ValueError("This SentencePiece model has no eos token.")
    if max_len < int(bos) + int(eos) + 1:
      raise ValueError(f"max_len={max_len} leaves no room for text after bos/eos.")
    ids_nl = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    for row, ids in enumerate(self._processor.encode(list(texts))):
      if bos:
        ids = [self.bos_id] + ids
      ids = ids[:max_len - 1] + [self.eos_id] if eos else ids[:max_len]
      ids_nl[row, :len(ids)] = ids
    return ids_nl

  def decode(self, ids: Any) -> list[str]:
    """Decodes each row of token ids [N, L] to text, stopping at the first eos and skipping
    pad and bos. Added tokens render as their text, joined to the text around them without
    spaces (so "<image>", "a red circle", "<|endofchunk|>" reads
    "<image>a red circle<|endofchunk|>")."""
    skipped = {self.pad_id, self.bos_id}
    texts = []
    for row in ids:
      parts, pieces = [], []
      for token in np.asarray(row).tolist():
        if token == self.eos_id:
          break
        if token in skipped:
          continue
        if token in self._added_texts:
          parts.append(self._processor.decode(pieces))
          parts.append(self._added_texts[token])
          pieces = []
        else:
          pieces.append(token)
      parts.append(self._processor.decode(pieces))
      texts.append("".join(parts))
    return texts

  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._model_proto, "added_tokens": self._added_tokens}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._model_proto = state["model_proto"]
    self._processor = _load_processor(self._model_proto, source="pickled model proto")
    self._set_added_tokens(state.get("added_tokens", ()))


def _load_processor(model_proto: bytes, *, source: str) -> spm.SentencePieceProcessor:
  """Parses a serialized model, raising ValueError naming `source` when it is not one."""
  processor = spm.SentencePieceProcessor()
  try:
    processor.LoadFromSerializedProto(model_proto)
  except (RuntimeError, OSError) as e:
    raise ValueError(f"{source} is not a valid SentencePiece model: {e}") from e
  # An empty or cut-short proto can parse cleanly into a model with no pieces.
  if processor.vocab_size() == 0:
    raise ValueError(f"{source} is not a valid SentencePiece model: it has no pieces.")
  return processor


def _train_model_proto(corpus: Sequence[str], vocab_size: int, hard_vocab_limit: bool) -> bytes:
  """Trains a SentencePiece model on `corpus` in memory and returns it serialized."""
  model_writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus), model_writer=model_writer, vocab_size=vocab_size,
      hard_vocab_limit=hard_vocab_limit, **SHAPES_TRAINER_SETTINGS)
  return model_writer.getvalue()


def corpus_words(corpus: Sequence[str]) -> list[str]:
  """The distinct alphanumeric words of `corpus`, in order of first appearance."""
  return list(dict.fromkeys(word for text in corpus for word in re.findall(r"\w+", text)))


def _words_are_single_tokens(model_proto: bytes, words: Sequence[str]) -> bool:
  """Whether every word of `words` encodes (after a space) to one token."""
  processor = _load_processor(model_proto, source="trained model")
  return all(len(ids) == 1 for ids in processor.encode(list(words)))


def _train_word_level(corpus: Sequence[str]) -> bytes:
  """Trains with the smallest vocabulary in which every corpus word is a single token."""
  words = corpus_words(corpus)
  largest = _train_model_proto(corpus, _SOFT_VOCAB_LIMIT, hard_vocab_limit=False)
  # Vocabularies grow by more merges, so "every word is one token" is monotone in the size:
  # binary search for the smallest size that has it (sizes sentencepiece rejects do not).
  num_special_tokens = len({PAD_ID, UNK_ID, BOS_ID, EOS_ID})
  low = num_special_tokens + 1
  high = _load_processor(largest, source="trained model").vocab_size()
  best = largest
  while low < high:
    middle = (low + high) // 2
    try:
      candidate = _train_model_proto(corpus, middle, hard_vocab_limit=True)
    except RuntimeError:  # Too small to hold every character of the corpus.
      low = middle + 1
      continue
    if _words_are_single_tokens(candidate, words):
      best, high = candidate, middle
    else:
      low = middle + 1
  return best


def default_cache_dir() -> str:
  """$VLJAX_CACHE if set, else ~/.cache/vljax."""
  return os.environ.get("VLJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "vljax")


def _cache_key(corpus: Sequence[str], vocab_size: int | None) -> str:
  """A hash of everything the trained model depends on."""
  digest = hashlib.sha256()
  settings = {"trainer": SHAPES_TRAINER_SETTINGS, "vocab_size": vocab_size,
              "sentencepiece": spm.__version__}
  digest.update(json.dumps(settings, sort_keys=True).encode())
  for text in corpus:
    digest.update(text.encode())
    digest.update(b"\n")
  return digest.hexdigest()[:16]


def _is_usable(model_proto: bytes, corpus: Sequence[str], vocab_size: int | None) -> bool:
  """Whether a cached model parses, has the expected special ids and size (or word-level
  pieces), and encodes the whole corpus without unk; this also catches files cut short."""
  try:
    processor = _load_processor(model_proto, source="cached model")
  except ValueError:
    return False
  special_ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
  if special_ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
    return False
  if vocab_size is not None and processor.vocab_size() != vocab_size:
    return False
  if vocab_size is None and not _words_are_single_tokens(model_proto, corpus_words(corpus)):
    return False
  return all(UNK_ID not in ids for ids in processor.encode(list(corpus)))


def train_tokenizer(corpus: Sequence[str], vocab_size: int | None = None, *,
                    added_tokens: Sequence[str] = VISION_TOKENS) -> Tokenizer:
  """A tokenizer trained in memory on `corpus` with the shapes settings (nothing is cached).

  `vocab_size=None` merges as far as the corpus allows (its words become single tokens); an
  explicit size is a hard limit. Every character of the corpus gets a piece, so texts made of
  them encode without unk. Meant for small corpora: tests and demos with their own words.
  """
  try:
    model_proto = (_train_model_proto(corpus, _SOFT_VOCAB_LIMIT, hard_vocab_limit=False)
                   if vocab_size is None else
                   _train_model_proto(corpus, vocab_size, hard_vocab_limit=True))
  except RuntimeError as e:
    raise ValueError(f"SentencePiece cannot train vocab_size={vocab_size} on this corpus: "
                     f"{e}") from e
  return Tokenizer(model_proto, added_tokens=added_tokens)


SHAPES_CORPORA = ("captions", "all")


def shapes_corpus(which: str = "captions") -> list[str]:
  """The texts the shapes tokenizer learns. "captions": captions and zero-shot prompts (what the
  caption view writes). "all": also every other kind of text the shapes world and the views
  write: VQA pairs, conversations, episodes, motion captions and referring expressions, the
  views' fixed words (templates, system prompt), and the digits and brackets of box coordinates.
  ("all" needs a vocabulary of ~780 for every word to be one BPE token, against ~180.)"""
  if which not in SHAPES_CORPORA:
    raise ValueError(f"Unknown shapes corpus {which!r}; choose one of {SHAPES_CORPORA}")
  if which == "captions":
    return captions.text_corpus()
  # Imported here: these modules import this one.
  from vljax.data import shapes_qa, shapes_tasks, views
  # The views' fixed texts are repeated so that BPE merges their words as early as the scenes'.
  return (captions.text_corpus() + shapes_qa.text_corpus() + shapes_tasks.text_corpus()
          + views.template_texts() * 200)


def shapes_tokenizer(vocab_size: int | None = None, cache_dir: str | None = None, *,
                     added_tokens: Sequence[str] = (),
                     corpus: str = "captions") -> Tokenizer:
  """The tokenizer of the shapes world, trained on `shapes_corpus(corpus)` and cached on disk.

  `vocab_size=None` picks the smallest vocabulary in which every corpus word is one token, so
  captions stay short; an explicit `vocab_size` is the SentencePiece vocabulary's size.
  `added_tokens` (e.g. `VISION_TOKENS`, or a view's `special_tokens`) get the ids after it, so every SentencePiece id is
  the same with or without them. A missing or unusable cache file is (re)built; the model is a
  pure function of the corpus and settings, so concurrent builders write identical bytes.
  """
  corpus = shapes_corpus(corpus)
  path = os.path.join(cache_dir or default_cache_dir(),
                      f"shapes_tokenizer_{_cache_key(corpus, vocab_size)}.model")
  if os.path.exists(path):
    with open(path, "rb") as f:
      model_proto = f.read()
    if _is_usable(model_proto, corpus, vocab_size):
      return Tokenizer(model_proto, added_tokens=added_tokens)
  if vocab_size is None:
    model_proto = _train_word_level(corpus)
  else:
    try:
      model_proto = _train_model_proto(corpus, vocab_size, hard_vocab_limit=True)
    except RuntimeError as e:
      raise ValueError(f"SentencePiece rejects vocab_size={vocab_size} for the shapes "
                       f"corpus: {e}") from e
  write_atomically(path, lambda f: f.write(model_proto))
  return Tokenizer(model_proto, added_tokens=added_tokens)
