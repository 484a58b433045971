"""Sources x views through the training pipeline: every view's batches from the shapes world
match the view's batch spec (which the model is initialised from), for every family and view,
and their masks mark exactly the answer tokens."""
import io
import json

import pytest
from PIL import Image

from tests.data.test_webdataset import write_tar
from tests.train.helpers import tiny_config
from vljax.data.batching import SKIPPED_REASONS, TooManyBadRecordsError
from vljax.data.pipeline import (build_tokenizer, check_batch, data_config, make_source,
                                 train_iterator, train_view)
from vljax.data.views import VIEWS
from vljax.families import FAMILIES
from vljax.train.loop import build_experiment

SMALL = dict(image_size=32, max_text_len=40, min_records_before_check=4)
VIEW_SETTINGS = {"interleaved": dict(num_images=3), "video": dict(num_frames=3)}
MAX_TEXT_LEN = {"chat": 96}  # LLaVA's system prompt alone is ~30 tokens


def _data(view, **changes):
  return data_config(dict(SMALL, view=view, view_settings=VIEW_SETTINGS.get(view, {}),
                          text_bos=True, **{"max_text_len": MAX_TEXT_LEN.get(view, 40),
                                            **changes}))


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_every_view_batches_match_its_spec(view):
  cfg = _data(view)
  tokenizer = build_tokenizer(cfg)
  batch = next(train_iterator(cfg, tokenizer, seed=0, global_batch_size=4))
  check_batch(batch, train_view(cfg, tokenizer).spec(4), 1, f"({view} view)")
  # The loss is on the answer and EOS: some tokens, never a pad, never the prompt's BOS.
  assert batch["mask_loss"].any(axis=1).all()
  assert not (batch["mask_loss"] & (batch["text"] == tokenizer.pad_id)).any()
  assert not batch["mask_loss"][:, 0].any()


@pytest.mark.parametrize("family,view", [(f, v) for f in sorted(FAMILIES)
                                         for v in FAMILIES[f].views])
def test_the_batch_spec_of_every_family_and_view_matches_the_pipeline(family, view):
  config = tiny_config(family=family)
  if family == "coca":
    config.model = dict(image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                        width=32, num_heads=2, mlp_dim=64, unimodal_depth=1, multimodal_depth=1,
                        num_caption_queries=4)
  settings, changes = {}, {}
  if family in ("lm", "t5"):
    config.model = dict(variant="mu", recipe="llama") if family == "lm" else dict(variant="mu")
    settings = dict(prefix_words=-1) if family == "t5" else {}
  if family == "llava":
    config.model = dict(variant="mu")
    changes = dict(max_text_len=96) if view == "chat" else {}  # the system prompt fits
  config.data = dict(SMALL, view=view, text_bos=True, view_settings=settings, **changes)
  config.evals = {}
  exp = build_experiment(config)
  batch = next(train_iterator(exp.data_cfg, exp.tokenizer, seed=0,
                              global_batch_size=config.batch_size))
  check_batch(batch, exp.batch_spec, 1, family)
  assert set(exp.batch_spec) >= {"text", "mask_ar", "mask_loss"}


def test_examples_whose_answers_do_not_fit_are_skipped_and_a_source_of_them_stops():
  cfg = _data("chat", max_text_len=40)  # every answer comes after the system prompt's ~30 tokens
  with pytest.raises(TooManyBadRecordsError, match=r"chat view: no scored token fits in "
                                                   r"max_len=40 .*raise config\.data\.max_text_len"):
    next(train_iterator(cfg, build_tokenizer(cfg), seed=0, global_batch_size=4))


def test_the_shapes_source_follows_the_view():
  assert "question" in make_source(_data("vqa"), "train")[0]
  assert "question" not in make_source(_data("caption"), "train")[0]
  episode = make_source(_data("interleaved"), "train")[0]
  assert episode["images"].shape == (3, 32, 32, 3)  # num_images = shots + 1
  assert make_source(_data("video"), "train")[0]["frames"].shape == (3, 32, 32, 3)


def test_llava_conversations_from_webdataset_shards_train_through_the_chat_view(tmp_path):
  """LLaVA-Instruct records (an image and a .json with "conversations") in a WebDataset shard:
  the chat view scores exactly the assistant turns; a record without conversations is skipped."""
  image = shapes_image()
  turns = [{"from": "human", "value": "<image>\nwhat shape is in the picture?"},
           {"from": "gpt", "value": "a red circle."},
           {"from": "human", "value": "where is it?"},
           {"from": "gpt", "value": "at the top left."}]
  members = []
  for i in range(4):
    members += [(f"{i:03d}.png", image),
                (f"{i:03d}.json", json.dumps({"id": str(i), "conversations": turns}).encode())]
  members += [("999.png", image), ("999.json", json.dumps({"id": "999"}).encode())]
  write_tar(tmp_path / "llava.tar", members)
  cfg = _data("chat", source="webdataset", webdataset=dict(shards=str(tmp_path / "llava.tar")))
  tokenizer = build_tokenizer(cfg)
  it = train_iterator(cfg, tokenizer, seed=0, global_batch_size=4)
  batch = next(it)
  check_batch(batch, train_view(cfg, tokenizer).spec(4), 1, "(chat view)")
  for text, mask in zip(batch["text"], batch["mask_loss"]):
    scored = text[mask == 1]
    assert (scored == tokenizer.eos_id).sum() == 2  # each reply ends with </s>
    replies = tokenizer.decode([scored[scored != tokenizer.eos_id]])[0]
    assert replies.split() == "a red circle. at the top left.".split()
  skipped = [next(it) for _ in range(2)]  # the shuffled epoch holds the bad record once
  reasons = {k: v for b in [batch] + skipped for k, v in dict(b[SKIPPED_REASONS]).items()}
  assert reasons == {"missing or empty conversations (looked in .json)": 1}


def shapes_image() -> bytes:
  world = make_source(_data("caption"), "validation")
  buffer = io.BytesIO()
  Image.fromarray(world[0]["image"]).save(buffer, format="PNG")
  return buffer.getvalue()
