"""The grounding view: referring expressions and boxes written as text (Qwen-VL)."""
from __future__ import annotations

import dataclasses
import re
from typing import ClassVar, Mapping, Sequence

import numpy as np

from vljax.data.views.base import (BOX_END, BOX_START, REF_END, REF_START, BadRecord, View,
                                   _Text)


# Qwen-VL's grounding interface (Bai et al. 2023, sec. 2.2): coordinates normalised to integers
# in [0, 1000) and written "(x1,y1),(x2,y2)"; its RefCOCO evaluation
# (QwenLM/Qwen-VL eval_mm/evaluate_grounding.py) reads them back divided by 999.
BOX_SCALE = 999
_BOX_PATTERN = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def box_to_text(box: Sequence[float]) -> str:
  """(x1, y1, x2, y2) in [0, 1] -> "(x1,y1),(x2,y2)" with integers round(v * 999)."""
  ints = [int(round(min(max(float(v), 0.0), 1.0) * BOX_SCALE)) for v in box]
  return f"({ints[0]},{ints[1]}),({ints[2]},{ints[3]})"


def text_to_box(text: str) -> tuple[float, float, float, float] | None:
  """The first "(x1,y1),(x2,y2)" of `text` as floats in [0, 1]; None if there is none."""
  found = _BOX_PATTERN.search(text)
  if found is None:
    return None
  x1, y1, x2, y2 = (min(int(v), BOX_SCALE) / BOX_SCALE for v in found.groups())
  return (x1, y1, x2, y2)


@dataclasses.dataclass(frozen=True)
class GroundingView(View):
  """Image + one region (Qwen-VL's format). direction="ref2box": prompt "<ref>{phrase}</ref>",
  answer "<box>(x1,y1),(x2,y2)</box>"; "box2ref": the reverse. Coordinates are integers
  round(v * 999) in [0, 1000) (see `box_to_text`).

  text = [bos] prompt answer [eos]; mask_ar 0 on bos and the prompt, 1 on the answer and eos;
  mask_loss 1 on the answer and eos. The region is regions[record["index"] % len(regions)], or
  the first one for records without "index".
  """

  direction: str = "ref2box"

  name: ClassVar[str] = "grounding"
  fields: ClassVar[tuple[str, ...]] = ("image", "regions")
  special_tokens: ClassVar[tuple[str, ...]] = (REF_START, REF_END, BOX_START, BOX_END)
  DIRECTIONS: ClassVar[tuple[str, ...]] = ("ref2box", "box2ref")

  def __post_init__(self):
    super().__post_init__()
    self._check_choice("direction", self.DIRECTIONS)

  def _prompt_and_answer(self, record: dict) -> tuple[str, str]:
    regions = record["regions"]
    if not regions:
      raise BadRecord("no regions")
    region = regions[int(record.get("index", 0)) % len(regions)]
    if not isinstance(region, Mapping) or "phrase" not in region or "box" not in region:
      raise BadRecord(f"a region must be {{'phrase': str, 'box': (x1, y1, x2, y2)}}, got "
                      f"{region!r:.80}")
    box = np.asarray(region["box"], np.float64)
    if box.shape != (4,) or not np.isfinite(box).all():
      raise BadRecord(f"a box must be 4 finite numbers (x1, y1, x2, y2), got {region['box']!r}")
    phrase = f"{REF_START}{region['phrase']}{REF_END}"
    box_text = f"{BOX_START}{box_to_text(box)}{BOX_END}"
    return (phrase, box_text) if self.direction == "ref2box" else (box_text, phrase)

  def _prefix(self, prompt: str) -> _Text:
    return _Text().add(self._bos() + self.tokenizer.tokenize(prompt), ar=0, loss=0)

  def _example(self, record: dict) -> dict:
    prompt, answer = self._prompt_and_answer(record)
    text = self._prefix(prompt).add(self.tokenizer.tokenize(answer) + self._eos(), ar=1, loss=1)
    return {**text.pack(self.max_len, self.tokenizer.pad_id), **self._single_image(record)}

  def _prompt(self, record: dict) -> dict:
    prompt, _ = self._prompt_and_answer(record)
    return {**self._prefix(prompt).pack(self.max_len, self.tokenizer.pad_id, prompt=True),
            **self._single_image(record)}

  def _references(self, record: dict) -> list[str]:
    return [self._prompt_and_answer(record)[1]]

  def parse(self, text: str) -> tuple[float, float, float, float] | str | None:
    """ref2box: the box (x1, y1, x2, y2) in [0, 1] or None; box2ref: the phrase or None."""
    if self.direction == "ref2box":
      return text_to_box(text)
    found = re.search(re.escape(REF_START) + r"(.*?)(?:" + re.escape(REF_END) + r"|$)", text,
                      re.DOTALL)
    phrase = (found.group(1) if found else text).strip()
    return phrase or None
