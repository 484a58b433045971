"""Views of one image (or video) and one text: captions, video captions, VQA."""
from __future__ import annotations

import collections
import dataclasses
from typing import ClassVar, Sequence

import jax
import numpy as np

from vljax.data.tokenizer import Tokenizer
from vljax.data.views.base import BadRecord, View, _Text


def _caption_text(tokenizer: Tokenizer, captions: list[str], max_len: int, bos: bool,
                  eos: bool) -> dict[str, np.ndarray]:
  """[n, L] text (`Tokenizer.encode`), mask_ar all 1, mask_loss on all but pad and a leading bos."""
  text_nl = tokenizer.encode(captions, max_len, bos=bos, eos=eos)
  mask_loss_nl = (text_nl != tokenizer.pad_id).astype(np.int32)
  if bos:
    mask_loss_nl[:, 0] = 0
  return {"text": text_nl, "mask_ar": np.ones_like(text_nl), "mask_loss": mask_loss_nl}


@dataclasses.dataclass(frozen=True)
class CaptionView(View):
  """Image + caption: text = encode(caption, L, bos, eos) exactly as the captioning pipeline
  always did; mask_ar all 1; mask_loss 1 on every token but pad and a leading bos.

  A group (a scene and its shape-changed siblings: "caption" a list of g texts, "image"
  [g, H, W, 3], "label" [g]) gives text, mask_ar and mask_loss [g, L] and label [g], whatever
  group_size, which only tells spec() the g of the batches. "label" is -1 when the record has
  none.
  """

  bos: bool = True
  eos: bool = True
  group_size: int = 1  # g of grouped records (1: single records)

  name: ClassVar[str] = "caption"
  fields: ClassVar[tuple[str, ...]] = ("image", "caption")

  def _encode(self, captions: list[str]) -> dict[str, np.ndarray]:
    return _caption_text(self.tokenizer, captions, self.max_len, self.bos, self.eos)

  def _example(self, record: dict) -> dict:
    captions = record["caption"]
    if isinstance(captions, str):
      return {**{k: v[0] for k, v in self._encode([captions]).items()},
              **self._single_image(record)}
    group = len(captions)
    label = np.broadcast_to(np.asarray(record.get("label", -1), np.int32), (group,))
    return {**self._encode(list(captions)), "image": self._pixels(record, "image", (group,)),
            "label": np.array(label)}

  def _prompt(self, record: dict) -> dict:
    if not isinstance(record["caption"], str):
      raise ValueError(f"The {self.name!r} view's prompt() takes single records, not groups")
    text = _Text().add(self._bos() if self.bos else [], ar=1, loss=0)
    return {**text.pack(self.max_len, self.tokenizer.pad_id, prompt=True),
            **self._single_image(record)}

  def _references(self, record: dict) -> list[str]:
    captions = record["caption"]
    return [captions] if isinstance(captions, str) else list(captions)

  def _pixel_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    if self.group_size == 1:
      return super()._pixel_spec(batch_size)
    side, group = self.image_size, self.group_size
    return {"image": jax.ShapeDtypeStruct((batch_size, group, side, side, 3), np.uint8),
            "label": jax.ShapeDtypeStruct((batch_size, group), np.int32)}

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    if self.group_size == 1:
      return super().spec(batch_size)
    text = jax.ShapeDtypeStruct((batch_size, self.group_size, self.max_len), np.int32)
    return {"text": text, "mask_ar": text, "mask_loss": text, **self._pixel_spec(batch_size)}


@dataclasses.dataclass(frozen=True)
class VideoView(View):
  """Video frames [T, S, S, 3] + caption, the caption's text and masks as the caption view's
  ([bos] caption [eos] pad, mask_ar all 1, mask_loss on all but pad and bos)."""

  bos: bool = True
  eos: bool = True
  num_frames: int = 8  # T

  name: ClassVar[str] = "video"
  fields: ClassVar[tuple[str, ...]] = ("frames", "caption")

  def _frames(self, record: dict) -> dict[str, np.ndarray]:
    return {"frames": self._pixels(record, "frames", (self.num_frames,))}

  def _example(self, record: dict) -> dict:
    if not isinstance(record["caption"], str):
      raise ValueError(f"The {self.name!r} view takes one caption (a str) per record")
    text = _caption_text(self.tokenizer, [record["caption"]], self.max_len, self.bos, self.eos)
    return {**{k: v[0] for k, v in text.items()}, **self._frames(record)}

  def _prompt(self, record: dict) -> dict:
    text = _Text().add(self._bos() if self.bos else [], ar=1, loss=0)
    return {**text.pack(self.max_len, self.tokenizer.pad_id, prompt=True), **self._frames(record)}

  def _references(self, record: dict) -> list[str]:
    return [record["caption"]]

  def _pixel_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    side = self.image_size
    return {"frames": jax.ShapeDtypeStruct((batch_size, self.num_frames, side, side, 3),
                                           np.uint8)}


def majority_answer(answers: Sequence[str]) -> str:
  """The most common answer; among equally common ones, the first given."""
  counts = collections.Counter(answers)
  return max(answers, key=lambda a: counts[a])  # max keeps the first of equal keys


@dataclasses.dataclass(frozen=True)
class VqaView(View):
  """Image + question -> answer: text = [bos] template(question) answer [eos] pad.

  mask_ar is 0 on bos and the question (a bidirectional prefix), 1 on the answer, eos and pad;
  mask_loss is 1 on the answer and eos. The training answer is the most common of "answers"
  (ties: the first); references() gives them all, for VQA accuracy.
  """

  template: str = "question: {question} answer:"

  name: ClassVar[str] = "vqa"
  fields: ClassVar[tuple[str, ...]] = ("image", "question", "answers")

  def __post_init__(self):
    super().__post_init__()
    if "{question}" not in self.template:
      raise ValueError(f"The vqa view's template must contain '{{question}}', got "
                       f"{self.template!r}")

  def _prefix(self, record: dict) -> _Text:
    question = self.template.format(question=record["question"])
    return _Text().add(self._bos() + self.tokenizer.tokenize(question), ar=0, loss=0)

  def _example(self, record: dict) -> dict:
    answers = self._references(record)
    if not answers:
      raise BadRecord("no answers")
    text = self._prefix(record).add(self.tokenizer.tokenize(majority_answer(answers)) +
                                    self._eos(), ar=1, loss=1)
    return {**text.pack(self.max_len, self.tokenizer.pad_id), **self._single_image(record)}

  def _prompt(self, record: dict) -> dict:
    return {**self._prefix(record).pack(self.max_len, self.tokenizer.pad_id, prompt=True),
            **self._single_image(record)}

  def _references(self, record: dict) -> list[str]:
    answers = record["answers"]
    return [answers] if isinstance(answers, str) else list(answers)
