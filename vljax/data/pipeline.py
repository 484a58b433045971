"""Input pipelines on grain: per-process shards of the global batch, deterministic given a seed,
optional worker processes, and checkpointable iterator state.

A source is a grain random-access data source whose examples are dicts with "image"
(uint8 [H, W, 3]) and "caption" (str). `train_iterator` turns it into batches of
{"image": uint8 [b, H, W, 3], "text": int32 [b, L], ...} for this process's b = B / processes
examples; `global_batch` assembles the processes' local batches into arrays sharded over the mesh.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vljax.data.batching import BOOKKEEPING, BadRecordCounter, SkipBadAndBatch
from vljax.data.shapes import ShapesWorld
from vljax.data.shapes_tasks import MAX_VIDEO_OBJECTS, ShapesEpisodes, ShapesVideos
from vljax.data.shapes_text import ShapesCaptions
from vljax.data.tfds import TfdsSource, open_tfds_source
from vljax.data.webdataset import WebDatasetSource
from vljax.data.tokenizer import Tokenizer, shapes_tokenizer
from vljax.data.views import (VIEWS, InterleavedView, VideoView, View, build_view,
                              view_settings)
from vljax.sharding import batch_sharding

# Each source's own settings, under config.data.<source>.
SOURCE_DEFAULTS = dict(
    shapes=dict(
        world_seed=0,
        min_objects=1,
        max_objects=3,
        shape_siblings=0,  # k: each training scene comes with k shape-changed copies (negatives)
        num_train_examples=100_000,
        # for the interleaved view: solved examples of "vqa" or "caption" (the number of images
        # follows the view's num_images; the video view's frames follow its num_frames)
        episode_task="vqa",
    ),
    webdataset=dict(
        shards="",  # brace pattern(s) of tar shards, e.g. "data/{00000..00127}.tar"
        caption_keys=("txt", "json"),  # members holding the caption, first found wins
        json_caption_field="caption",
        # The other fields a view reads ("question", "answers", "conversations", "regions")
        # come from the top level of each record's .json member (LLaVA's JSON, for chat).
    ),
    tfds=dict(
        name="",  # dataset, optionally with config / version ("coco_captions/2014:1.1.0")
        split="train",  # TFDS's syntax ("train+restval", "train[:90%]")
        data_dir="",  # where it was prepared; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
        image_key="image",  # the image feature ("/" descends into nested features)
        caption_key="captions/text",  # a Text feature or a sequence of them (one is picked)
        label_key="",  # optional ClassLabel feature, passed on as "label"
        download=False,  # prepare it if data_dir lacks it (may need TensorFlow, network)
    ),
)

DATA_DEFAULTS = dict(
    # "shapes" (the embedded world) | "webdataset" (tar shards) | "tfds" (a TFDS dataset stored
    # as array_record); each has its settings under config.data.<source>. Evaluators read their
    # own sources (config.evals), by default the shapes world's validation split.
    source="shapes",
    **SOURCE_DEFAULTS,
    max_bad_fraction=0.05,  # stop when more of the records read so far are undecodable / empty
    min_records_before_check=1000,  # ... but only after this many records
    # How a record becomes a training example (vljax.data.views): "caption", "vqa", "chat",
    # "interleaved", "video", "grounding", "text" (captions alone, for language models);
    # view_settings go to the view (e.g. chat's template).
    view="caption",
    view_settings={},
    image_size=64,
    max_text_len=32,
    text_bos=False,  # prepend BOS (BERT-style CLS pooling needs it)
    text_eos=True,
    # a SentencePiece .model file, or a Hugging Face model / tokenizer directory (tokenizer.json
    # or tokenizer.model: CLIP's BPE, SigLIP's, LLaMA's, ...); "" = the shapes world tokenizer
    tokenizer="",
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
    workers=0,  # grain worker processes (0: in the main process)
    prefetch=2,  # per-worker buffer size
)
# Keys that moved into a source's sub-dict: old config.data key -> new path under config.data.
MOVED_DATA_KEYS = {
    **{k: f"shapes.{k}" for k in ("world_seed", "min_objects", "max_objects", "shape_siblings",
                                  "num_train_examples")},
    "shapes_episode_task": "shapes.episode_task",
    **{k: f"webdataset.{k}" for k in ("shards", "caption_keys", "json_caption_field")},
    **{f"tfds_{k}": f"tfds.{k}" for k in SOURCE_DEFAULTS["tfds"]},
}


SOURCES = tuple(SOURCE_DEFAULTS)

# What to check when a kind of bad record is common, by source: the start of a reason -> advice
# (see `vljax.data.batching.too_many_bad_message`).
BAD_RECORD_ADVICE = {
    "webdataset": {
        "missing or empty caption": ("check config.data.webdataset.caption_keys / "
                                     "json_caption_field / shards"),
        "missing or empty": ("check that the .json members of config.data.webdataset.shards "
                             "hold the fields config.data.view reads"),
        "no image member": "check config.data.webdataset.shards (records without an image member)",
        "cannot decode image": ("check the images in config.data.webdataset.shards (corrupt or "
                                "not images)"),
        "unsupported image": ("check the images in config.data.webdataset.shards (unusual image "
                              "modes)"),
    },
    "tfds": {
        "missing or empty caption": "check config.data.tfds.caption_key",
        "cannot": "check config.data.tfds.name / data_dir (a damaged or mismatched dataset?)",
        "unsupported image": "check config.data.tfds.image_key",
    },
}


def moved_key_message(key: str) -> str | None:
  """The error for a config.data key that moved into a source's sub-dict, or None."""
  if key in MOVED_DATA_KEYS:
    return (f"config.data.{key} is now config.data.{MOVED_DATA_KEYS[key]} (each source has its "
            "sub-dict)")
  return None


def data_config(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """DATA_DEFAULTS updated by `cfg`, the sources' sub-dicts key by key; an unknown key raises
  naming it (and where a moved key went)."""
  cfg = dict(cfg)
  for key in cfg:
    if moved_key_message(key):
      raise ValueError(moved_key_message(key))
  unknown = sorted(set(cfg) - set(DATA_DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown config key(s) {', '.join('config.data.' + k for k in unknown)}; "
                     f"valid keys: {', '.join(sorted(DATA_DEFAULTS))}")
  merged = {**DATA_DEFAULTS, **cfg}
  for source, defaults in SOURCE_DEFAULTS.items():
    given = dict(cfg.get(source) or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(f"Unknown config key(s) "
                       f"{', '.join(f'config.data.{source}.{k}' for k in unknown)}; valid keys: "
                       f"{', '.join(sorted(defaults))}")
    merged[source] = {**defaults, **given}
  return ml_collections.ConfigDict(merged)


def require_source(cfg: ml_collections.ConfigDict, config_name: str = "this config") -> None:
  """Stops a run at once, naming the fields to set, when no data source is configured."""
  if not cfg.source:
    raise ValueError(
        f"{config_name} has no data source: set config.data.source (e.g. "
        "--config.data.source=shapes for the embedded shapes world, or 'webdataset' / 'tfds' "
        "for real image-text pairs) and, for real sources, its shard / dataset fields and "
        "config.data.tokenizer (a sentencepiece .model path).")


# Views whose texts are captions: the shapes tokenizer of the captions serves them (a language
# model trained on the text view shares the captioning families' vocabulary).
CAPTION_CORPUS_VIEWS = ("caption", "text")


def build_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer at `cfg.tokenizer` (a SentencePiece model file, or a Hugging Face directory
  read by `vljax.convert.hf_tokenizer.HFTokenizer`), or the shapes tokenizer (of the captions
  for the caption view, of every shapes text for the others), with the tokens the view adds
  (`<image>`, `<ref>`, ...) after its vocabulary."""
  added = VIEWS[cfg.view].special_tokens if cfg.view in VIEWS else ()
  if cfg.tokenizer and os.path.isdir(cfg.tokenizer):
    from vljax.convert.hf_tokenizer import HFTokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = HFTokenizer(cfg.tokenizer)
    return tokenizer.with_added_tokens(added) if added else tokenizer
  if cfg.tokenizer:
    return Tokenizer.from_file(cfg.tokenizer, added_tokens=added)
  return shapes_tokenizer(corpus="captions" if cfg.view in CAPTION_CORPUS_VIEWS else "all",
                          added_tokens=added)


def encode_texts(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, texts) -> np.ndarray:
  """Texts -> int32 [n, max_text_len], with the BOS / EOS the training captions get."""
  return tokenizer.encode(list(texts), cfg.max_text_len, bos=cfg.text_bos, eos=cfg.text_eos)


def tfds_source(cfg: ml_collections.ConfigDict) -> TfdsSource:
  """The TFDS training source that `cfg.tfds` describes; errors name the config field."""
  tfds = cfg.tfds
  if not tfds.name:
    raise ValueError("config.data.source='tfds' needs config.data.tfds.name (e.g. 'coco_captions')")
  if not tfds.caption_key:
    raise ValueError("config.data.source='tfds' needs config.data.tfds.caption_key (e.g. "
                     "'captions/text'): training pairs images with captions")
  return open_tfds_source(
      lambda argument: f"config.data.tfds.{argument}",
      "config.data.tfds (name / data_dir / download)", tfds.name,
      split=tfds.split, data_dir=tfds.data_dir or None, image_size=cfg.image_size,
      image_key=tfds.image_key, caption_key=tfds.caption_key,
      label_key=tfds.label_key or None, download=tfds.download)


def make_source(cfg: ml_collections.ConfigDict, split: str, **overrides):
  """The random-access source of a split (validation sets come from the shapes world)."""
  if cfg.source == "webdataset" and split == "train":
    wds = cfg.webdataset
    if not wds.shards:
      raise ValueError("config.data.source='webdataset' needs config.data.webdataset.shards (a "
                       "brace pattern)")
    return WebDatasetSource(wds.shards, image_size=cfg.image_size, caption_keys=wds.caption_keys,
                            json_caption_field=wds.json_caption_field,
                            fields=VIEWS[cfg.view].fields if cfg.view in VIEWS else ("image",
                                                                                    "caption"))
  if cfg.source == "tfds" and split == "train":
    return tfds_source(cfg)
  if cfg.source not in SOURCES:
    raise ValueError(f"config.data.source={cfg.source!r} is not available; choose one of "
                     f"{', '.join(repr(s) for s in SOURCES)}")
  shapes = cfg.shapes
  kw = dict(split=split, seed=shapes.world_seed, image_size=cfg.image_size,
            min_objects=shapes.min_objects, max_objects=shapes.max_objects)
  if split == "train":
    kw["num_examples"] = shapes.num_train_examples
  kw.update(overrides)
  if cfg.view == "interleaved":
    shots = dict(cfg.view_settings).get("num_images", InterleavedView.num_images) - 1
    return ShapesEpisodes(shots=shots, task=shapes.episode_task, **kw)
  if cfg.view == "video":
    frames = dict(cfg.view_settings).get("num_frames", VideoView.num_frames)
    kw["max_objects"] = min(kw["max_objects"], MAX_VIDEO_OBJECTS)
    return ShapesVideos(frames=frames, **kw)
  if cfg.view == "text":  # captions alone: no image is rendered
    return ShapesCaptions(**kw)
  return ShapesWorld(annotations=cfg.view != "caption", **kw)


def train_view(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> View:
  """The view `cfg.view` with `cfg.view_settings`, the image size, and for views that take them
  BOS / EOS from text_bos / text_eos. (Groups of shape siblings are merged into the batch, so
  the batches have the spec of single records.)"""
  settings: dict[str, Any] = {"image_size": cfg.image_size}
  accepted = view_settings(cfg.view) if cfg.view in VIEWS else ()
  if "bos" in accepted:
    settings.update(bos=cfg.text_bos, eos=cfg.text_eos)
  settings.update(dict(cfg.view_settings))
  return build_view(cfg.view, tokenizer, cfg.max_text_len, **settings)


def check_batch(local_batch: Mapping[str, np.ndarray], spec: Mapping[str, jax.ShapeDtypeStruct],
                process_count: int, family: str) -> None:
  """Raises, naming the field, when this process's batch does not match its share of the batch
  spec the model was initialised from (the view's)."""
  fields = {k: v for k, v in local_batch.items() if k not in BOOKKEEPING}
  for key in sorted(set(spec) | set(fields)):
    if key not in fields:
      raise ValueError(f"the input pipeline's batches lack field {key!r} that family {family!r} "
                       f"expects (batch spec: {', '.join(sorted(spec))})")
    if key not in spec:
      raise ValueError(f"the input pipeline's batches have field {key!r}, which is not in the "
                       f"batch spec of family {family!r} ({', '.join(sorted(spec))})")
    want = (spec[key].shape[0] // process_count,) + tuple(spec[key].shape[1:])
    got = np.shape(fields[key])
    dtype = np.asarray(fields[key]).dtype
    if tuple(got) != want or dtype != spec[key].dtype:
      raise ValueError(f"batch field {key!r} is {dtype}{list(got)} but the batch spec says "
                       f"{np.dtype(spec[key].dtype)}{list(want)} per process")


@dataclasses.dataclass(frozen=True)
class AddSiblings(grain.transforms.Map):
  """Example -> the example and `count` shape-changed siblings, stacked on a new leading axis."""

  world: ShapesWorld
  count: int

  def map(self, example: dict) -> dict:
    group = [example] + self.world.siblings(example["index"], self.count)
    return {"image": np.stack([e["image"] for e in group]),
            "caption": [e["caption"] for e in group],
            "label": np.array([e["label"] for e in group])}


def _merge_groups(batch: dict) -> dict:
  """[b / g, g, ...] batches of (scene, siblings...) groups -> [b, ...], each group adjacent."""
  return {k: v.reshape((-1,) + v.shape[2:]) if k not in BOOKKEEPING else v
          for k, v in batch.items()}


def train_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, seed: int,
                   global_batch_size: int, process_index: int = 0, process_count: int = 1):
  """An endless, checkpointable iterator of this process's share of each global batch.

  The order is a pure function of `seed`: every epoch is a fresh permutation of the source,
  and process p takes every `process_count`-th example starting at p.
  """
  if global_batch_size % process_count:
    raise ValueError(f"batch_size {global_batch_size} is not divisible by {process_count} processes")
  source = make_source(cfg, "train")
  if len(source) == 0:
    raise ValueError(f"The training source {source!r} holds no records: check config.data.source "
                     "and its fields (shards, tfds_name / tfds_split, num_train_examples)")
  local_batch = global_batch_size // process_count
  ds = grain.MapDataset.source(source).repeat().shuffle(seed=seed)
  ds = ds[process_index::process_count]
  siblings = cfg.shapes.shape_siblings
  group = 1 + siblings
  if siblings:
    if not isinstance(source, ShapesWorld):
      raise ValueError("config.data.shapes.shape_siblings needs the shapes world source")
    if siblings < 0 or local_batch % group:
      raise ValueError(f"config.data.shapes.shape_siblings={siblings} needs a per-process batch "
                       f"divisible by {group} (a scene and its siblings), got {local_batch}")
    ds = ds.map(AddSiblings(source, siblings))
  ds = ds.map(train_view(cfg, tokenizer))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  it_ds = SkipBadAndBatch(it_ds, local_batch // group, max_keys=local_batch,
                         max_bad_fraction=cfg.max_bad_fraction,
                         min_records=cfg.min_records_before_check,
                         advice=BAD_RECORD_ADVICE.get(cfg.source))
  if siblings:
    it_ds = it_ds.map(_merge_groups)
  if cfg.workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                           per_worker_buffer_size=cfg.prefetch))
  return iter(it_ds)


def bad_record_counter(cfg: ml_collections.ConfigDict) -> BadRecordCounter:
  return BadRecordCounter(cfg.max_bad_fraction, cfg.min_records_before_check,
                          advice=BAD_RECORD_ADVICE.get(cfg.source))


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Each process's local rows -> global arrays sharded along the batch over the mesh."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
          for k, v in local_batch.items()}
