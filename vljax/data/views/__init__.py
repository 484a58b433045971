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

import dataclasses
from typing import Any


from vljax.data.tokenizer import Tokenizer

from vljax.data.views.base import (BOX_END, BOX_START, END_OF_CHUNK, IMAGE_TOKEN, REF_END,
                                   REF_START, BadRecord, View)
from vljax.data.views.chat import (CHAT_TEMPLATES, VICUNA_SYSTEM, ChatTemplate, ChatView,
                                   parse_conversations)
from vljax.data.views.grounding import BOX_SCALE, GroundingView, box_to_text, text_to_box
from vljax.data.views.interleaved import InterleavedView
from vljax.data.views.lm_text import TextView
from vljax.data.views.text import CaptionView, VideoView, VqaView, majority_answer

__all__ = ["BOX_END", "BOX_START", "END_OF_CHUNK", "IMAGE_TOKEN", "REF_END", "REF_START",
           "BadRecord", "View", "CHAT_TEMPLATES", "VICUNA_SYSTEM", "ChatTemplate", "ChatView",
           "parse_conversations", "BOX_SCALE", "GroundingView", "box_to_text", "text_to_box",
           "InterleavedView", "TextView", "CaptionView", "VideoView", "VqaView", "majority_answer",
           "VIEWS", "build_view", "view_settings", "template_texts"]

VIEWS: dict[str, type[View]] = {view.name: view for view in (
    CaptionView, VqaView, ChatView, InterleavedView, VideoView, GroundingView, TextView)}


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
