"""Views: one source record -> one example of fixed shapes (a training example, or a prompt).

Sources (the shapes world, WebDataset shards, TFDS) yield records, dicts such as
{"image", "caption"} or {"image", "question", "answers"}; a view turns one into arrays:
"text" int32 [L] with big_vision's two masks, "mask_ar" int32 [L] (0: bidirectional prefix token,
1: autoregressive token; see `vljax.nn.masks.attention_mask`) and "mask_loss" int32 [L] (1 where
the token is a target; see `vljax.losses.captioning.next_token_targets`), plus the pixels.
Padding is pad_id with mask_ar 1 and mask_loss 0, so right padding never changes what a real
token attends to. A record with "error" passes through, for the batcher to drop and count; a
record whose content is unusable (no answers, malformed conversation) becomes such a record.

Every view is a picklable frozen dataclass and a `grain.transforms.Map`, with
  map(record)        the training example,
  prompt(record)     the same fields with only the prompt in "text" and "prompt_len", the number
                     of prompt tokens, after which a generative model continues,
  references(record) the texts the prompt should produce,
  spec(batch_size)   the jax.ShapeDtypeStruct of every field of a batch of map() outputs,
  parse(text)        the answer read back from generated text.
"""
from __future__ import annotations

import abc
import collections
import dataclasses
import json
import re
from typing import Any, ClassVar, Mapping, Sequence

import grain
import jax
import numpy as np

from vljax.data.tokenizer import VISION_TOKENS, Tokenizer

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
REF_START, REF_END, BOX_START, BOX_END = "<ref>", "</ref>", "<box>", "</box>"

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


VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a conversation is written (LLaVA's conversation templates)."""

  system: str  # default system prompt, before the first turn ("" for none)
  user: str  # written before each human turn
  assistant: str  # written before each reply
  human_text: bool  # False: a human turn is only its image (LLaVA's pretraining "plain")


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    # LLaVA-1.5: "{system} USER: <image>{q} ASSISTANT: {a}</s>USER: ..."
    "vicuna_v1": ChatTemplate(VICUNA_SYSTEM, "USER:", "ASSISTANT:", human_text=True),
    # LLaVA pretraining: "<image>{caption}</s>", one human and one gpt turn.
    "plain": ChatTemplate("", "", "", human_text=False),
}

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


def parse_conversations(conversations: Any) -> list[tuple[str, str]]:
  """LLaVA "conversations" (a list of {"from", "value"} or its JSON text) -> [(role, text)] with
  roles "human" / "gpt" alternating from "human"; a leading gpt turn is dropped, as LLaVA does."""
  if isinstance(conversations, (str, bytes)):
    try:
      conversations = json.loads(conversations)
    except json.JSONDecodeError as e:
      raise BadRecord(f"conversations are not valid JSON: {e}") from e
  if not isinstance(conversations, (list, tuple)):
    raise BadRecord(f"conversations must be a list of turns, got {type(conversations).__name__}")
  turns = []
  for turn in conversations:
    if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
      raise BadRecord(f"a turn must be {{'from': ..., 'value': str}}, got {turn!r:.80}")
    role = _ROLES.get(str(turn.get("from", "")).lower())
    if role is None:
      raise BadRecord(f"unknown speaker {turn.get('from')!r} (expected one of "
                      f"{', '.join(_ROLES)})")
    turns.append((role, turn["value"]))
  if turns and turns[0][0] == "gpt":
    turns = turns[1:]
  for position, (role, _) in enumerate(turns):
    if role != ("human", "gpt")[position % 2]:
      raise BadRecord("turns do not alternate between human and gpt")
  if not turns:
    raise BadRecord("no human turn")
  return turns


@dataclasses.dataclass(frozen=True)
class ChatView(View):
  """Image + LLaVA conversation: "{system} USER: <image>{q1} ASSISTANT: {a1}</s>USER: {q2} ..."
  with template "vicuna_v1" (the record's "system" replaces the default one), or
  "<image>{a1}</s>" with "plain" (LLaVA pretraining).

  "<image>" becomes the one added image token (the model expands it into image embeddings),
  moved to the start of its turn as LLaVA does; a conversation without it gets it in the first
  human turn. mask_ar is all 1; mask_loss is 1 on the replies and the eos after each. Texts longer
  than L are cut at L; a record whose first reply is cut off entirely is a bad record (skipped
  and counted: it would teach nothing), as in every view.
  """

  template: str = "vicuna_v1"

  name: ClassVar[str] = "chat"
  fields: ClassVar[tuple[str, ...]] = ("image", "conversations")
  special_tokens: ClassVar[tuple[str, ...]] = (IMAGE_TOKEN,)

  def __post_init__(self):
    super().__post_init__()
    if self.template not in CHAT_TEMPLATES:
      raise ValueError(f"Unknown chat template {self.template!r}; valid templates: "
                       f"{', '.join(CHAT_TEMPLATES)}")

  def _turns(self, record: dict) -> list[tuple[str, str]]:
    """The conversation with its one image placeholder at the start of its human turn."""
    turns = parse_conversations(record["conversations"])
    placeholders = sum(text.count(IMAGE_TOKEN) for _, text in turns)
    if placeholders > 1:
      raise BadRecord(f"{placeholders} '{IMAGE_TOKEN}' placeholders; one image per example")
    if not CHAT_TEMPLATES[self.template].human_text:
      if len(turns) != 2:
        raise BadRecord("the plain template takes one human and one gpt turn")
      return [("human", IMAGE_TOKEN), turns[1]]
    with_image = next((i for i, (_, text) in enumerate(turns) if IMAGE_TOKEN in text), 0)
    human_text = turns[with_image][1].replace(IMAGE_TOKEN, "").strip()
    turns[with_image] = ("human", IMAGE_TOKEN + human_text)
    return turns

  def _text(self, record: dict, turns: list[tuple[str, str]]) -> _Text:
    """bos, the system prompt and `turns`; a reply carries loss, as does its eos."""
    template, tokenize = CHAT_TEMPLATES[self.template], self.tokenizer.tokenize
    system = record.get("system", template.system)
    text = _Text().add(self._bos() + (tokenize(system) if system else []), ar=1, loss=0)
    for role, value in turns:
      if role == "human":
        text.add(tokenize(f"{template.user} {value}".strip()) + tokenize(template.assistant),
                 ar=1, loss=0)
      else:
        text.add(tokenize(value) + self._eos(), ar=1, loss=1)
    return text

  def _example(self, record: dict) -> dict:
    text = self._text(record, self._turns(record))
    return {**text.pack(self.max_len, self.tokenizer.pad_id), **self._single_image(record)}

  def _prompt(self, record: dict) -> dict:
    turns = self._turns(record)
    if turns[-1][0] == "gpt":
      turns = turns[:-1]
    text = self._text(record, turns)
    return {**text.pack(self.max_len, self.tokenizer.pad_id, prompt=True),
            **self._single_image(record)}

  def _references(self, record: dict) -> list[str]:
    turns = parse_conversations(record["conversations"])
    return [turns[-1][1]] if turns[-1][0] == "gpt" else []


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
    if self.loss_on not in self.LOSS_ON:
      raise ValueError(f"Unknown loss_on={self.loss_on!r} for the interleaved view; valid: "
                       f"{', '.join(self.LOSS_ON)}")
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
    if self.direction not in self.DIRECTIONS:
      raise ValueError(f"Unknown direction={self.direction!r} for the grounding view; valid: "
                       f"{', '.join(self.DIRECTIONS)}")

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


VIEWS: dict[str, type[View]] = {view.name: view for view in (
    CaptionView, VqaView, ChatView, InterleavedView, VideoView, GroundingView)}


def template_texts() -> list[str]:
  """The texts views write around a record's own (templates, system prompts, role names, box
  coordinates), for training a tokenizer that knows them (`tokenizer.shapes_corpus`)."""
  texts = [VqaView.template.format(question="what colour is it?")]
  for template in CHAT_TEMPLATES.values():
    texts.append(" ".join(t for t in (template.system, template.user, template.assistant) if t))
  # Box coordinates are digit sequences: the digits and brackets, not every number, are pieces.
  texts.append("<box>(0,1),(2,3)</box> 4 5 6 7 8 9")
  return texts


def view_settings(name: str) -> tuple[str, ...]:
  """The settings `build_view` takes for view `name` (besides tokenizer and max_len)."""
  return tuple(f.name for f in dataclasses.fields(VIEWS[name])
               if f.init and f.name not in ("tokenizer", "max_len"))


def build_view(name: str, tokenizer: Tokenizer, max_len: int, **settings: Any) -> View:
  """The view `name` of VIEWS with its settings; unknown names and settings raise naming the
  valid ones."""
  if name not in VIEWS:
    raise ValueError(f"Unknown view {name!r}; valid views: {', '.join(VIEWS)}")
  unknown = sorted(set(settings) - set(view_settings(name)))
  if unknown:
    raise ValueError(f"Unknown setting(s) {', '.join(unknown)} for the {name!r} view; valid "
                     f"settings: {', '.join(view_settings(name))}")
  return VIEWS[name](tokenizer=tokenizer, max_len=max_len, **settings)
