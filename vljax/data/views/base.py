"""The View base class and the token-sequence builder every view uses (see `vljax.data.views`)."""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import grain
import jax
import numpy as np

from vljax.data.tokenizer import VISION_TOKENS, Tokenizer


IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"


class BadRecord(ValueError):
  """A record whose content a view cannot use; `View.map` turns it into an error record."""


class _Text:
  """Token ids with their mask_ar and mask_loss, appended segment by segment."""

  def __init__(self):
    self.ids: list[int] = []
    self.mask_ar: list[int] = []
    self.mask_loss: list[int] = []

  def add(self, ids: Sequence[int], *, ar: int, loss: int) -> _Text:
    self.ids.extend(ids)
    self.mask_ar.extend([ar] * len(ids))
    self.mask_loss.extend([loss] * len(ids))
    return self

  def pack(self, max_len: int, pad_id: int, *, prompt: bool = False) -> dict[str, np.ndarray]:
    """Truncated / right-padded int32 [max_len] arrays; a prompt has no loss and a prompt_len."""
    kept = min(len(self.ids), max_len)
    text_l = np.full((max_len,), pad_id, np.int32)
    mask_ar_l = np.ones((max_len,), np.int32)
    mask_loss_l = np.zeros((max_len,), np.int32)
    text_l[:kept] = self.ids[:kept]
    mask_ar_l[:kept] = self.mask_ar[:kept]
    out = {"text": text_l, "mask_ar": mask_ar_l, "mask_loss": mask_loss_l}
    if prompt:
      out["prompt_len"] = np.asarray(kept, np.int32)
    else:
      mask_loss_l[:kept] = self.mask_loss[:kept]
      if any(self.mask_loss) and not mask_loss_l.any():  # an example that teaches nothing
        raise BadRecord(f"no scored token fits in max_len={max_len} (the text has "
                        f"{len(self.ids)} tokens): raise config.data.max_text_len")
    return out


def _record_key(record: Mapping[str, Any]) -> str:
  return str(record.get("key", record.get("index", "?")))


@dataclasses.dataclass(frozen=True)
class View(grain.transforms.Map):
  """Base of the views: the tokenizer, the text length L and the image side."""

  tokenizer: Tokenizer
  max_len: int  # L: every text is truncated or right-padded to it
  image_size: int = dataclasses.field(default=64, kw_only=True)  # spec(): images [S, S, 3]

  name: ClassVar[str] = ""
  fields: ClassVar[tuple[str, ...]] = ()  # record fields map() reads
  special_tokens: ClassVar[tuple[str, ...]] = ()  # added tokens the view writes

  def __post_init__(self):
    if self.max_len < 2:
      raise ValueError(f"The {self.name!r} view needs max_len >= 2, got {self.max_len}")
    for token in ("bos", "eos"):  # views without a bos / eos setting always write them
      if getattr(self, token, True) and getattr(self.tokenizer, f"{token}_id") < 0:
        raise ValueError(f"The {self.name!r} view writes {token}, which the tokenizer lacks")
    for token in self.special_tokens:
      if token not in self.tokenizer.added_tokens:
        raise ValueError(
            f"The {self.name!r} view writes the token {token!r}, which the tokenizer lacks: "
            f"use tokenizer.with_added_tokens({VISION_TOKENS!r})")

  def _check_choice(self, setting: str, choices: tuple[str, ...]) -> None:
    """Raises naming the setting and the valid values when its value is not one of `choices`."""
    value = getattr(self, setting)
    if value not in choices:
      raise ValueError(f"Unknown {setting}={value!r} for the {self.name} view; valid: "
                       f"{', '.join(choices)}")

  def map(self, record: dict) -> dict:
    """The training example of `record`; a bad record passes through (one this view cannot
    use becomes {"error", "key"})."""
    return self._guarded(self._example, record)

  def prompt(self, record: dict) -> dict:
    """The example with only the prompt as text (mask_loss all 0) and "prompt_len"."""
    return self._guarded(self._prompt, record)

  def _guarded(self, make, record: dict) -> dict:
    """make(record), for a record with the fields; bad records come out as error records."""
    if "error" in record:
      return record
    self._require(record)
    try:
      return make(record)
    except BadRecord as e:
      return {"error": f"{self.name} view: {e}", "key": _record_key(record)}

  def references(self, record: dict) -> list[str]:
    """The texts the prompt should produce (reference answers or captions)."""
    self._require(record)
    return self._references(record)

  def parse(self, text: str) -> Any:
    """The answer in generated `text`; here the text without surrounding whitespace."""
    return text.strip()

  def spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a batch of `batch_size` map() outputs."""
    text = jax.ShapeDtypeStruct((batch_size, self.max_len), np.int32)
    return {"text": text, "mask_ar": text, "mask_loss": text, **self._pixel_spec(batch_size)}

  def _pixel_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The image fields of a batch, and "label"; for a view of single-image records."""
    side = self.image_size
    return {"image": jax.ShapeDtypeStruct((batch_size, side, side, 3), np.uint8),
            "label": jax.ShapeDtypeStruct((batch_size,), np.int32)}

  @abc.abstractmethod
  def _example(self, record: dict) -> dict:
    """The training example of a good record with the view's fields."""

  @abc.abstractmethod
  def _prompt(self, record: dict) -> dict:
    """The prompt example of a good record with the view's fields."""

  @abc.abstractmethod
  def _references(self, record: dict) -> list[str]:
    """The reference texts of a record with the view's fields."""

  def _require(self, record: Mapping[str, Any]) -> None:
    for field in self.fields:
      if field not in record:
        raise ValueError(f"The {self.name!r} view needs the record field {field!r}; this record "
                         f"has {', '.join(map(repr, sorted(record))) or 'no fields'}")

  def _pixels(self, record: Mapping[str, Any], field: str, leading: tuple[int, ...] = ()
              ) -> np.ndarray:
    """record[field] as uint8 [*leading, H, W, 3], or an error naming the view and field.

    H and W are the source's (it resizes); spec() says image_size, and the batch checks of the
    input pipeline compare the two.
    """
    array = np.asarray(record[field])
    rank = len(leading) + 3
    if (array.dtype != np.uint8 or array.ndim != rank or array.shape[:len(leading)] != leading
        or array.shape[-1] != 3):
      expected = ", ".join([*map(str, leading), "H", "W", "3"])
      raise ValueError(f"The {self.name!r} view needs {field!r} as uint8 [{expected}], got "
                       f"{array.dtype} {list(array.shape)}")
    return array

  def _single_image(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {"image": self._pixels(record, "image"),
            "label": np.asarray(record.get("label", -1), np.int32)}

  def _bos(self) -> list[int]:
    return [self.tokenizer.bos_id]

  def _eos(self) -> list[int]:
    return [self.tokenizer.eos_id]
