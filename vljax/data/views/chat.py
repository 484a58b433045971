"""The chat view: LLaVA conversations in a named template."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Mapping


from vljax.data.views.base import IMAGE_TOKEN, BadRecord, View, _Text


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
