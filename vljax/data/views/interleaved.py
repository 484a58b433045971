"""The interleaved view: several images with their texts in one sequence (Flamingo)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import numpy as np

from vljax.data.views.base import END_OF_CHUNK, IMAGE_TOKEN, BadRecord, View, _Text


@dataclasses.dataclass(frozen=True)
class InterleavedView(View):
  """Images interleaved with text (Flamingo): for each image i, "<image>{prompt_i} {answer_i}
  <|endofchunk|>", after bos and followed by eos.

  mask_ar is all 1. mask_loss is 1 on the answers, the <|endofchunk|> tokens and eos
  (loss_on="answers"), or on every token but bos and the image tokens (loss_on="all", as
  OpenFlamingo trains). "image_index" [L] is, at each position, the index of the latest image
  token at or before it (-1 before the first; padding keeps the last), the one image a token's
  cross-attention sees. Records with more than num_images images keep the first num_images
  chunks; ones with fewer get black images that no token refers to. prompt() ends after the
  last image's prompt text: the few-shot query.
  """

  num_images: int = 4  # N
  loss_on: str = "answers"

  name: ClassVar[str] = "interleaved"
  fields: ClassVar[tuple[str, ...]] = ("images", "prompts", "answers")
  special_tokens: ClassVar[tuple[str, ...]] = (IMAGE_TOKEN, END_OF_CHUNK)
  LOSS_ON: ClassVar[tuple[str, ...]] = ("answers", "all")

  def __post_init__(self):
    super().__post_init__()
    self._check_choice("loss_on", self.LOSS_ON)
    if self.num_images < 1:
      raise ValueError(f"num_images must be >= 1, got {self.num_images}")

  def _chunks(self, record: dict) -> tuple[list[str], list[str]]:
    """(prompts, answers) of the first num_images chunks."""
    prompts, answers = list(record["prompts"]), list(record["answers"])
    num_images = len(record["images"])
    if not len(prompts) == len(answers) == num_images:
      raise BadRecord(f"{num_images} images, {len(prompts)} prompts and {len(answers)} answers")
    if not prompts:
      raise BadRecord("no images")
    return prompts[:self.num_images], answers[:self.num_images]

  def _images(self, record: dict, count: int) -> np.ndarray:
    """uint8 [N, H, W, 3]: the first `count` images, then black ones."""
    images = self._pixels({"images": np.asarray(record["images"])[:count]}, "images", (count,))
    padded = np.zeros((self.num_images, *images.shape[1:]), np.uint8)
    padded[:count] = images
    return padded

  def _text(self, prompts: list[str], answers: list[str], query: bool) -> _Text:
    """All chunks; with `query` the last one stops after its prompt."""
    tokenize, prompt_loss = self.tokenizer.tokenize, int(self.loss_on == "all")
    image_id, end_id = self.tokenizer.token_id(IMAGE_TOKEN), self.tokenizer.token_id(END_OF_CHUNK)
    text = _Text().add(self._bos(), ar=1, loss=0)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
      text.add([image_id], ar=1, loss=0).add(tokenize(prompt), ar=1, loss=prompt_loss)
      if query and i == len(prompts) - 1:
        return text
      text.add(tokenize(answer) + [end_id], ar=1, loss=1)
    return text.add(self._eos(), ar=1, loss=1)

  def _pack(self, text: _Text, images: np.ndarray, prompt: bool) -> dict:
    out = text.pack(self.max_len, self.tokenizer.pad_id, prompt=prompt)
    is_image_l = out["text"] == self.tokenizer.token_id(IMAGE_TOKEN)
    out["image_index"] = (np.cumsum(is_image_l) - 1).astype(np.int32)
    out["images"] = images
    return out

  def _example(self, record: dict) -> dict:
    prompts, answers = self._chunks(record)
    return self._pack(self._text(prompts, answers, query=False),
                      self._images(record, len(prompts)), prompt=False)

  def _prompt(self, record: dict) -> dict:
    prompts, answers = self._chunks(record)
    return self._pack(self._text(prompts, answers, query=True),
                      self._images(record, len(prompts)), prompt=True)

  def _references(self, record: dict) -> list[str]:
    prompts, answers = self._chunks(record)
    answer_lists = record.get("answer_lists")
    if answer_lists is not None:
      return list(answer_lists[len(prompts) - 1])
    return [answers[-1]]

  def parse(self, text: str) -> str:
    """The generated answer: the text before the first <|endofchunk|>."""
    return text.split(END_OF_CHUNK, 1)[0].strip()

  def _pixel_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    side = self.image_size
    return {"images": jax.ShapeDtypeStruct((batch_size, self.num_images, side, side, 3), np.uint8),
            "image_index": jax.ShapeDtypeStruct((batch_size, self.max_len), np.int32)}
