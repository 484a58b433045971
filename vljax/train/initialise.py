"""Initialisation of a model's parameters from several checkpoints (`config.init`), e.g. the
image tower from one run and the text tower from another, as multi-stage recipes need."""
from __future__ import annotations

import logging
import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vljax.convert import checkpoints
from vljax.train.config import init_entries

log = logging.getLogger("vljax")


class _Source:
  """The flat parameters of one checkpoint. An imported one (read unscanned) also offers them
  with their layers stacked, for a model that scans them; made on first use."""

  def __init__(self, imported: checkpoints.Imported):
    self.first = flax.traverse_util.flatten_dict(imported.params, sep="/")
    self._imported, self._scanned = imported, None
    self.format, self.posemb_method = imported.format, imported.posemb_method

  def layouts(self):
    yield self.first
    if self._imported.scanned is not None:
      if self._scanned is None:
        self._scanned = flax.traverse_util.flatten_dict(
            self._imported.scanned(self._imported.params), sep="/")
      yield self._scanned


def load_init_params(config, params, shardings, frozen):
  """`params` with the parameters that config.init's entries select copied in (see init_entries).

  A checkpoint is any format `vljax.convert.checkpoints.read` reads: a vljax workdir /
  checkpoint, or an imported one (a Hugging Face LLaMA / OPT / GPT-2 / T5 / CLIP / SigLIP
  directory, ...) whose parameters are named as the vljax module's (e.g.
  "decoder/layer_0/self_attn/query/kernel", "img/encoder/layer_0/..."),
  with the layers stacked ("decoder/layers/...") where this model scans them. Each entry's
  checkpoint is read once (entries naming the same one share the read). Raises,
  naming the entry, for a checkpoint that does not exist or holds no vljax checkpoint, a `params`
  regex that selects nothing, a target this model lacks, a shape mismatch, a parameter written
  by two entries, bfloat16 for a parameter config.optim.freeze does not freeze, and (for an
  entry without `to`) parameters of this model matching its `params` that no entry writes.
  """

  def read(name: str, checkpoint: str) -> _Source:
    if not os.path.exists(checkpoint):
      raise FileNotFoundError(f"{name}.checkpoint={checkpoint!r} does not exist")
    try:
      fmt = checkpoints.detect(checkpoint)
    except ValueError as e:
      raise ValueError(f"{name}.checkpoint={checkpoint!r}: {e}") from None
    try:
      return _Source(checkpoints.read(checkpoint))
    except FileNotFoundError as e:
      if fmt == "vljax":
        raise FileNotFoundError(f"{name}.checkpoint={checkpoint!r} holds no vljax checkpoint "
                                f"({e})") from None
      raise FileNotFoundError(f"{name}.checkpoint={checkpoint!r} is not a readable "
                              f"{checkpoints.describe(fmt)} ({e})") from None
    except (ValueError, NotImplementedError) as e:
      raise ValueError(f"{name}.checkpoint={checkpoint!r} is not a {checkpoints.describe(fmt)} "
                       f"vljax reads ({e})") from None

  def rename(entry, src: str) -> str:
    return re.sub(entry["to"][0], entry["to"][1], src, count=1) if entry["to"] else src

  flat = flax.traverse_util.flatten_dict(params, sep="/")
  flat_shardings = flax.traverse_util.flatten_dict(shardings, sep="/")
  flat_frozen = flax.traverse_util.flatten_dict(frozen, sep="/")
  sources: dict[str, _Source] = {}
  written: dict[str, str] = {}  # target path -> the entry that wrote it
  identity = []  # entries without `to`: their regex names parameters of this model too
  for i, entry in enumerate(init_entries(config)):
    name, checkpoint = f"config.init[{i}]", entry["checkpoint"]
    key = os.path.abspath(checkpoint)
    if key not in sources:
      sources[key] = read(name, checkpoint)
    pattern = re.compile(entry["params"])
    # The layout (layers scanned or not) in which every selected parameter lands in this model.
    loaded = sources[key].first
    for layout in sources[key].layouts():
      chosen = [k for k in layout if pattern.fullmatch(k)]
      if chosen and all(rename(entry, k) in flat for k in chosen):
        loaded = layout
        break
    selected = [k for k in loaded if pattern.fullmatch(k)]
    if not selected:
      raise ValueError(f"{name}.params={entry['params']!r} matches no parameter of {checkpoint!r} "
                       f"(its parameters: {', '.join(list(loaded)[:5])}, ...)")
    if entry["to"] is None:
      identity.append((name, checkpoint, entry["params"], pattern))
    targets = {}
    for src in selected:
      dst = rename(entry, src)
      if dst not in flat:
        raise ValueError(f"{name} puts {src} at {dst}, which this model does not have"
                         + (f" (check {name}.to={entry['to']!r})" if entry["to"] else ""))
      if dst in targets:
        raise ValueError(f"{name} writes {dst} twice (from {targets[dst]} and {src})")
      if dst in written:
        raise ValueError(f"{written[dst]} and {name} both write {dst}")
      resized = checkpoints.resize_position_table(src, loaded[src], flat[dst].shape,
                                        sources[key].posemb_method)
      if resized is not None:
        log.info("%s: resampled %s from %s to %s (%s, as %s does)", name, src,
                 tuple(loaded[src].shape), tuple(resized.shape),
                 sources[key].posemb_method, sources[key].format)
        loaded = {**loaded, src: resized}
      if tuple(loaded[src].shape) != tuple(flat[dst].shape):
        raise ValueError(f"{name}: {src} has shape {tuple(loaded[src].shape)} in {checkpoint!r}, "
                         f"but {dst} has shape {tuple(flat[dst].shape)} in this model")
      if entry["dtype"] == "bfloat16" and not flat_frozen[dst]:
        raise ValueError(f"{name}.dtype='bfloat16' would hold {dst} in bfloat16, but "
                         f"config.optim.freeze={config.optim.freeze!r} does not freeze it; only "
                         f"frozen parameters (no optimizer state) may be held in bfloat16")
      targets[dst] = src
    for dst, src in targets.items():
      dtype = jnp.bfloat16 if entry["dtype"] == "bfloat16" else flat[dst].dtype
      flat[dst] = jax.device_put(np.asarray(loaded[src], dtype), flat_shardings[dst])
      written[dst] = name
    log.info("Initialised %d parameters from %s (%s)", len(targets), checkpoint, name)
  for name, checkpoint, regex, pattern in identity:  # e.g. a deeper tower than the source's
    missing = [k for k in flat if pattern.fullmatch(k) and k not in written]
    if missing:
      raise ValueError(f"{name}.checkpoint={checkpoint!r} lacks {len(missing)} parameter(s) of "
                       f"this model matching {name}.params={regex!r} (and no other entry "
                       f"writes them): {', '.join(missing[:5])}")
  return flax.traverse_util.unflatten_dict(flat, sep="/")
