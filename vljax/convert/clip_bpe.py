"""open_clip's CLIP tokenizer (`open_clip.tokenizer.SimpleTokenizer`, OpenAI's original), read
from its BPE merges file (`bpe_simple_vocab_16e6.txt.gz`, which open_clip ships): the same ids
for the same texts, without torch or open_clip.

  tokenizer = ClipBPETokenizer("/path/to/bpe_simple_vocab_16e6.txt.gz")
  tokens_nl = tokenizer(["a photo of a cat", "a dog"])  # int32 [2, 77]

The text is cleaned as open_clip cleans it ("lower" by default: ftfy's `fix_text`, HTML
unescaped twice, whitespace runs to one space, lower case), split into words, contractions,
single digits and runs of other symbols, and each piece's UTF-8 bytes merged by BPE rank, the
last symbol of a piece ending in "</w>". Rows are `<start_of_text> ... <end_of_text>`, cut at
`context_length` with the end-of-text id kept last, and padded with 0 (which is also the id of
"!": pool at the end-of-text id, the largest, not at a search for 0).

ftfy (`pip install ftfy`) repairs mojibake and normalises text before tokenization. With
`fix_text=False` it is skipped, and only texts that ftfy would change tokenize differently:
mis-decoded UTF-8 ("cafÃ©"), curly quotes and apostrophes (ftfy makes "don’t" "don't"),
ligatures ("ﬁ", "ǅ"), full-width forms ("ＡＢＣ"), terminal escapes, C0 / C1 control characters
and text not in NFC (a combining accent after its letter). Letters and digits are told apart with Python's Unicode database; open_clip's `regex` module
may know characters of newer Unicode versions, which only such characters would reveal.
"""
from __future__ import annotations

import gzip
import html
import os
import string
import unicodedata
from typing import Any, Sequence

import numpy as np

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip keeps the merges on lines 1 .. 48894 of the file (its vocabulary: 256 bytes, 256
# bytes ending a word, these merges and the special tokens, 49408 ids for the two specials).
_NUM_MERGES = 49152 - 256 - 2
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


# The printable Latin-1 bytes, which stand for themselves in the byte-level vocabulary.
_KEPT_BYTES = (*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1))
_MOVED_BYTES = tuple(b for b in range(256) if b not in set(_KEPT_BYTES))


def byte_symbols() -> list[str]:
  """The 256 one-character symbols standing for the bytes 0..255 (GPT-2's reversible mapping):
  printable Latin-1 bytes are themselves, the others (controls, space, soft hyphen, ...) take
  the characters from U+0100 on, in byte order."""
  symbols = [chr(b) for b in range(256)]
  for n, b in enumerate(_MOVED_BYTES):
    symbols[b] = chr(256 + n)
  return symbols


def _is_letter(char: str) -> bool:
  return unicodedata.category(char)[0] == "L"


def _is_number(char: str) -> bool:
  return unicodedata.category(char)[0] == "N"


def _fold(text: str) -> str:
  """Case folding one character at a time (the `regex` module's case-insensitive matching)."""
  return "".join(char.casefold() if len(char.casefold()) == 1 else char for char in text)


def _canonicalize(text: str) -> str:
  """big_vision's / open_clip's canonical text: "_" as a space, punctuation removed, lower
  case, whitespace runs to one space."""
  text = text.replace("_", " ").translate(_PUNCTUATION).lower()
  return " ".join(text.split())


class ClipBPETokenizer:
  """open_clip's SimpleTokenizer: `tokenizer(texts) -> int32 [N, context_length]`.

  `clean` is open_clip's tokenizer option ("lower", "whitespace" or "canonicalize", as a model
  config's `text_cfg.tokenizer_kwargs` may set it); `additional_special_tokens` get the ids after
  the end-of-text token. Also has the interface of `vljax.data.tokenizer.Tokenizer` that the
  data views use (`tokenize`, batch `encode` / `decode`, `pad_id`, `bos_id`, `eos_id`, ...).
  """

  def __init__(self, path: str | os.PathLike[str], *, context_length: int = 77,
               clean: str = "lower", additional_special_tokens: Sequence[str] = (),
               fix_text: bool = True):
    path = os.fspath(path)
    if clean not in _CLEAN_MODES:
      raise ValueError(f"Unknown clean {clean!r}; open_clip's are {_CLEAN_MODES}")
    if not isinstance(context_length, int) or context_length < 2:
      raise ValueError(f"context_length must be an int >= 2 (start and end of text), got "
                       f"{context_length!r}")
    self._fix = None
    if fix_text:
      try:
        import ftfy  # pylint: disable=import-outside-toplevel
      except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "open_clip's tokenizer repairs text with ftfy: pip install ftfy, or pass "
            "fix_text=False (see vljax.convert.clip_bpe for the texts that then differ)") from None
      self._fix = ftfy.fix_text
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    except OSError as e:
      raise ValueError(f"{path}: not a gzip-compressed BPE merges file ({e})") from e
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    bad = next((i for i, merge in enumerate(merges) if len(merge) != 2), None)
    if bad is not None:
      raise ValueError(f"{path}: line {bad + 2} is not a merge of two symbols: {lines[bad + 1]!r}")
    symbols = byte_symbols()
    # Ids 0..255: the kept bytes' symbols first, then the moved ones (open_clip's order).
    byte_vocab = [symbols[b] for b in _KEPT_BYTES + _MOVED_BYTES]
    self.special_tokens = (SOT_TOKEN, EOT_TOKEN, *additional_special_tokens)
    vocab = (byte_vocab + [s + "</w>" for s in byte_vocab] + ["".join(m) for m in merges]
             + list(self.special_tokens))
    self._ids = {token: i for i, token in enumerate(vocab)}
    self._tokens = vocab
    self._ranks = {merge: i for i, merge in enumerate(merges)}
    self._byte_symbols = symbols
    self._symbol_bytes = {symbol: b for b, symbol in enumerate(symbols)}
    self._cache: dict[str, list[int]] = {}
    self._folded_specials = [(_fold(token), token) for token in self.special_tokens]
    self.context_length = context_length
    self.clean = clean

  @property
  def vocab_size(self) -> int:
    """The number of ids (49408 for OpenAI's file without additional special tokens)."""
    return len(self._tokens)

  @property
  def bos_id(self) -> int:
    """The id of <start_of_text>."""
    return self._ids[SOT_TOKEN]

  @property
  def eos_id(self) -> int:
    """The id of <end_of_text>, the largest id of the vocabulary proper."""
    return self._ids[EOT_TOKEN]

  @property
  def pad_id(self) -> int:
    """0, what open_clip pads with (also the id of "!")."""
    return 0

  def token_id(self, name: str) -> int:
    """The id of a vocabulary entry or special token by its text (e.g. "cat</w>")."""
    if name not in self._ids:
      raise KeyError(f"{name!r} is not a token of this vocabulary")
    return self._ids[name]

  def clean_text(self, text: str) -> str:
    """The text as open_clip cleans it before splitting."""
    if self._fix is not None:
      text = self._fix(text)
    text = html.unescape(html.unescape(text)).strip()
    if self.clean == "canonicalize":
      return _canonicalize(text)
    text = " ".join(text.split())
    return text.lower() if self.clean == "lower" else text

  def _pieces(self, text: str) -> list[str]:
    """open_clip's split: special tokens, contractions, letter runs, single digits and runs of
    other non-space characters (matched case-insensitively, as its regular expression is)."""
    pieces, i, n = [], 0, len(text)
    while i < n:
      char = text[i]
      if char.isspace():
        i += 1
        continue
      match = next((len(token) for folded, token in self._folded_specials
                    if _fold(text[i:i + len(token)]) == folded), 0)
      if not match and char == "'":
        match = next((len(c) for c in _CONTRACTIONS if _fold(text[i:i + len(c)]) == c), 0)
      if not match:
        if _is_letter(char) or _is_number(char):
          kind = _is_letter if _is_letter(char) else None
          match = 1
          while kind is not None and i + match < n and kind(text[i + match]):
            match += 1
        else:
          match = 1
          while i + match < n and not (text[i + match].isspace() or _is_letter(text[i + match])
                                       or _is_number(text[i + match])):
            match += 1
      pieces.append(text[i:i + match])
      i += match
    return pieces

  def _bpe(self, piece: str) -> list[int]:
    """The ids of one piece: its byte symbols merged, lowest-ranked pair first (every
    non-overlapping occurrence, left to right), until no pair is a merge."""
    if piece in self._cache:
      return self._cache[piece]
    if piece in self.special_tokens:
      return [self._ids[piece]]
    word = [self._byte_symbols[b] for b in piece.encode("utf-8")]
    word[-1] += "</w>"
    while len(word) > 1:
      ranked = [(self._ranks.get(pair, _NUM_MERGES + 1), pair) for pair in zip(word, word[1:])]
      rank, best = min(ranked)
      if rank > _NUM_MERGES:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = [self._ids[symbol] for symbol in word]
    self._cache[piece] = ids
    return ids

  def tokenize(self, text: str) -> list[int]:
    """The ids of one text, without start / end of text (open_clip's `SimpleTokenizer.encode`)."""
    if not isinstance(text, str):
      raise TypeError(f"tokenize() takes one string, got {type(text).__name__}")
    return [i for piece in self._pieces(self.clean_text(text)) for i in self._bpe(piece)]

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """open_clip's `tokenizer(texts)`: int32 [N, context_length] rows of <start_of_text>, the
    text and <end_of_text>, cut to the length with <end_of_text> kept last, padded with 0."""
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length if context_length is None else context_length
    if not isinstance(length, int) or length < 2:
      raise ValueError(f"context_length must be an int >= 2, got {length!r}")
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id, *self.tokenize(text), self.eos_id]
      if len(ids) > length:
        ids = ids[:length - 1] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def encode(self, texts: Sequence[str], max_len: int, *, bos: bool = False,
             eos: bool = True) -> np.ndarray:
    """`vljax.data.tokenizer.Tokenizer.encode`: int32 [N, max_len], bos and eos as asked, cut
    with eos kept last, padded with 0; `encode(texts, n, bos=True)` is `tokenizer(texts, n)`."""
    if isinstance(texts, str):
      raise TypeError("encode() takes a sequence of strings; wrap a single text in a list.")
    if max_len < int(bos) + int(eos) + 1:
      raise ValueError(f"max_len={max_len} leaves no room for text after bos/eos.")
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = ([self.bos_id] if bos else []) + self.tokenize(text)
      ids = ids[:max_len - 1] + [self.eos_id] if eos else ids[:max_len]
      out[row, :len(ids)] = ids
    return out

  def decode_ids(self, ids: Sequence[int]) -> str:
    """open_clip's `SimpleTokenizer.decode`: every id's text as bytes, decoded as UTF-8 (invalid
    bytes replaced), "</w>" read as a space."""
    symbols = "".join(self._tokens[int(i)] for i in ids)
    data = bytes(self._symbol_bytes[char] for char in symbols)
    return data.decode("utf-8", errors="replace").replace("</w>", " ")

  def decode(self, ids: Any) -> list[str]:
    """Each row of [N, L] ids as text (see `decode_ids`), up to its first <end_of_text>, without
    <start_of_text>, stripped; the 0s before the end of text are "!"s, not padding."""
    texts = []
    for row in np.asarray(ids).reshape(len(ids), -1).tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      texts.append(self.decode_ids([i for i in row if i != self.bos_id]).strip())
    return texts
