"""The text view: a caption alone, as a language model reads it (no image)."""
from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar

import jax
import numpy as np

from vljax.data.views.base import BadRecord, View, _Text


@dataclasses.dataclass(frozen=True)
class TextView(View):
  """A caption as a language-modelling example: text = [bos] w_1 .. w_n [eos] pad.

  prefix_words = 0 (a decoder LM): mask_ar all 1 (causal), mask_loss on every token but a
  leading bos and pad; the text equals the caption view's.
  prefix_words = k > 0, or -1 (a split drawn per record in 1..n-1 words, fixed by the record's
  index and caption): the first k words (and bos) are a prefix, mask_ar 0 and no loss, the rest
  and eos are the target, mask_ar 1 and mask_loss 1: T5's prefix-LM objective as BLIP-2
  pretrains its FlanT5 (the encoder reads the prefix, the decoder writes the rest).
  prompt() gives the first `prompt_words` words (and bos), for completions.
  """

  bos: bool = True
  eos: bool = True
  prefix_words: int = 0
  prompt_words: int = 3

  name: ClassVar[str] = "text"
  fields: ClassVar[tuple[str, ...]] = ("caption",)

  def __post_init__(self):
    super().__post_init__()
    if self.prefix_words < -1:
      raise ValueError(f"The text view's prefix_words must be >= -1 (-1: random), got "
                       f"{self.prefix_words}")
    if self.prompt_words < 0:
      raise ValueError(f"The text view's prompt_words must be >= 0, got {self.prompt_words}")

  def _words(self, record: dict) -> list[str]:
    caption = record["caption"]
    if not isinstance(caption, str):
      raise ValueError(f"The {self.name!r} view takes one caption (a str) per record")
    words = caption.split()
    if not words:
      raise BadRecord("empty caption")
    return words

  def _split(self, record: dict, num_words: int) -> int:
    """How many leading words form the prefix (0 without one); at least one word is a target."""
    if self.prefix_words == 0 or num_words < 2:
      return 0
    if self.prefix_words > 0:
      return min(self.prefix_words, num_words - 1)
    key = f"{record.get('index', '')}:{record['caption']}".encode()
    return 1 + zlib.crc32(key) % (num_words - 1)

  def _head(self, words: list[str], count: int) -> list[int]:
    """bos and the first `count` words' tokens."""
    head = self._bos() if self.bos else []
    return head + (self.tokenizer.tokenize(" ".join(words[:count])) if count else [])

  def _example(self, record: dict) -> dict:
    words = self._words(record)
    split = self._split(record, len(words))
    text = _Text().add(self._head(words, split), ar=int(split == 0), loss=0)
    text.add(self.tokenizer.tokenize(" ".join(words[split:])) + (self._eos() if self.eos else []),
             ar=1, loss=1)
    return text.pack(self.max_len, self.tokenizer.pad_id)

  def _prompt(self, record: dict) -> dict:
    words = self._words(record)
    count = min(self.prompt_words, len(words) - 1)
    text = _Text().add(self._head(words, count), ar=int(self.prefix_words == 0), loss=0)
    return text.pack(self.max_len, self.tokenizer.pad_id, prompt=True)

  def _references(self, record: dict) -> list[str]:
    return [record["caption"]]

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    text = jax.ShapeDtypeStruct((batch_size, self.max_len), np.int32)
    return {"text": text, "mask_ar": text, "mask_loss": text}
