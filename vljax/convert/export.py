r"""One export command for every vljax model that has a public format: the training config
builds the module, the newest readable checkpoint of the workdir gives its params, and the
format's writer saves them.

  python -m vljax.convert.export --config=CONFIG --checkpoint=WORKDIR --out=/tmp/model_hf \
      [--format=transformers] [--dtype=bfloat16] [--overwrite] [--max_shard_bytes=N] \
      [--config.data.image_size=224 ...]
  python -m vljax.convert.export --config=CONFIG --checkpoint=WORKDIR --out=/tmp/siglip.npz \
      --format=big_vision

What each model exports to:
  LM, T5    transformers: a LLaMA / OPT / GPT-2 / T5 directory (`hf_lm.save`), with the
            bos / eos / pad ids of the config's tokenizer
  TwoTower  transformers: a CLIPModel (softmax loss) or SiglipModel (sigmoid loss) directory
            (`hf_clip.save`); big_vision: a SigLIP-style two-towers .npz (`big_vision.save`)
Other families (CoCa, ...) have no public format and are refused by name, as are layouts a
format cannot express (the error names the fields; the hf_clip and big_vision docstrings list
the layouts each has), before the checkpoint is read. Errors print one `error: ...` line and
exit 1. `python -m vljax.convert.hf_lm export` is this command for LM and T5 models.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np

from vljax.convert import big_vision, hf_clip, hf_lm
from vljax.models import lm, t5
from vljax.models.two_tower import TwoTower

FORMATS = ("transformers", "big_vision")
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The errors a bad command line, config or checkpoint raises; anything else is a bug.
ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotImplementedError)

# writer(out, model, params, tokenizer, dtype=, overwrite=, max_shard_bytes=) -> paths written.
Writer = Callable[..., list[str]]


def _shard_kw(max_shard_bytes: int | None) -> dict[str, int]:
  return {} if max_shard_bytes is None else dict(max_shard_bytes=max_shard_bytes)


def _cast(params: Any, dtype: str | None) -> Any:
  """Floating arrays of a tree as NumPy `dtype` (None: as they are); others untouched."""
  if dtype is None:
    return params
  target = DTYPES[dtype]

  def cast(x):
    x = np.asarray(x)
    floating = np.issubdtype(x.dtype, np.floating) or x.dtype in DTYPES.values()
    return x.astype(target) if floating and x.dtype != target else x

  return jax.tree.map(cast, params)


def _lm_to_transformers(out: str, model: nn.Module, params: Any, tokenizer: Any, *,
                        dtype: str | None, overwrite: bool,
                        max_shard_bytes: int | None) -> list[str]:
  extra = {}
  for key, attribute in (("bos_token_id", "bos_id"), ("eos_token_id", "eos_id"),
                         ("pad_token_id", "pad_id")):
    value = getattr(tokenizer, attribute, None)
    if isinstance(value, int) and value >= 0:
      extra[key] = value
  if isinstance(model, t5.T5) and "pad_token_id" in extra:
    extra["decoder_start_token_id"] = extra["pad_token_id"]
  return hf_lm.save(out, model, params, dtype=dtype, overwrite=overwrite, extra_config=extra,
                    **_shard_kw(max_shard_bytes))


def _two_tower_to_transformers(out: str, model: TwoTower, params: Any, tokenizer: Any, *,
                               dtype: str | None, overwrite: bool,
                               max_shard_bytes: int | None) -> list[str]:
  del tokenizer  # the pad / eot ids are the module's fields
  return hf_clip.save(out, model, _cast(params, dtype), overwrite=overwrite,
                      **_shard_kw(max_shard_bytes))


def _two_tower_to_big_vision(out: str, model: TwoTower, params: Any, tokenizer: Any, *,
                             dtype: str | None, overwrite: bool,
                             max_shard_bytes: int | None) -> list[str]:
  del tokenizer, max_shard_bytes  # big_vision's tokenisation is not part of the file; one file
  return [big_vision.save(out, model, _cast(params, dtype), overwrite=overwrite)]


# The module a family builds -> (what it is called, {format: writer}).
EXPORTS: dict[type, tuple[str, dict[str, Writer]]] = {
    lm.LM: ("LM", {"transformers": _lm_to_transformers}),
    t5.T5: ("T5", {"transformers": _lm_to_transformers}),
    TwoTower: ("TwoTower (CLIP / SigLIP)", {"transformers": _two_tower_to_transformers,
                                            "big_vision": _two_tower_to_big_vision}),
}


def _exports_text() -> str:
  return "; ".join(f"{name} -> {', '.join(writers)}" for name, writers in EXPORTS.values())


def _check_out(out: str, fmt: str, overwrite: bool, max_shard_bytes: int | None) -> None:
  """Refuses, before the checkpoint is read, an output the writer would refuse after."""
  if fmt == "big_vision":
    if not out.endswith(".npz"):
      raise ValueError(f"--format=big_vision writes one .npz file (vljax tells big_vision files by "
                       f"the suffix): give --out=PATH.npz, not {out}")
    if max_shard_bytes is not None:
      raise ValueError("--max_shard_bytes shards transformers directories; a big_vision .npz is "
                       "one file")
    if os.path.exists(out) and not overwrite:
      raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    return
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"{out} exists and is not a directory")
  if hf_lm.is_hf_dir(out) and not overwrite:
    raise FileExistsError(f"{out} already holds model files; pass --overwrite to replace them")


def _read_params(checkpoint: str) -> Any:
  """The params of the vljax checkpoint at `checkpoint` (a workdir, its checkpoints dir or a
  step dir); a public checkpoint is refused by its format's name."""
  # Imported here, as the training stack (orbax) is only needed to read vljax checkpoints.
  from vljax.convert import checkpoints  # pylint: disable=import-outside-toplevel
  from vljax.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint={checkpoint} does not exist")
  fmt = checkpoints.detect(checkpoint)
  if fmt != "vljax":
    raise ValueError(f"--checkpoint={checkpoint} is a {checkpoints.describe(fmt)}, not a vljax "
                     "checkpoint (a workdir, its checkpoints dir or a step dir): it is in a public "
                     "format already")
  return nn.meta.unbox(load_params(checkpoint))


def _check_params(model: nn.Module, params: Any, image_size: int) -> None:
  """Raises a ValueError naming the missing, unexpected and misshapen params (scanned or not)."""
  # pylint: disable=protected-access
  if isinstance(model, TwoTower):
    hf_clip._check_params(model, params, image_size)
  else:
    hf_lm._check_params(model, params)


def export(config: str, checkpoint: str, out: str, *, fmt: str = "transformers",
           dtype: str | None = None, overwrite: bool = False,
           max_shard_bytes: int | None = None, overrides: Sequence[str] = (),
           only: Sequence[type] | None = None) -> list[str]:
  """Writes the params of the vljax checkpoint at `checkpoint`, trained with the config file
  `config` (with "a.b=VALUE" `overrides`), as `fmt` at `out`. Returns the paths written.
  `only` limits the module classes exported (the others are refused naming this command)."""
  # Imported here: the training stack is only needed to build a module from a config.
  # pylint: disable=import-outside-toplevel
  from vljax.data.pipeline import build_tokenizer, data_config
  from vljax.families import get_family
  from vljax.families.base import build_model
  from vljax.train.config import apply_overrides, load_config, validate

  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt}: choose one of {', '.join(FORMATS)}")
  if dtype is not None and dtype not in DTYPES:
    raise ValueError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}")
  cfg = validate(apply_overrides(load_config(config), overrides))
  data = data_config(cfg.data)
  tokenizer = build_tokenizer(data)
  model = build_model(get_family(cfg.family), cfg, tokenizer)
  built = f"--config={config} builds a {type(model).__name__} (family {cfg.family!r})"
  if only is not None and not isinstance(model, tuple(only)):
    names = " and ".join(EXPORTS[cls][0] for cls in only if cls in EXPORTS)
    raise ValueError(f"{built}; this command exports {names} models only: use python -m "
                     "vljax.convert.export")
  if type(model) not in EXPORTS:
    raise ValueError(f"{built}, which has no public format to export to; the formats are "
                     f"{', '.join(FORMATS)}, for {_exports_text()}")
  name, writers = EXPORTS[type(model)]
  if fmt not in writers:
    raise ValueError(f"{built}: a {name} exports to {', '.join(writers)}, not --format={fmt}")
  # What the format cannot express, before reading the checkpoint.
  # pylint: disable=protected-access
  if isinstance(model, TwoTower):
    if fmt == "transformers":
      hf_clip.hf_config(model, image_size=data.image_size)
    else:
      big_vision._check_expressible(model)
  else:
    hf_lm.hf_config(model)
  _check_out(os.fspath(out), fmt, overwrite, max_shard_bytes)
  params = _read_params(os.fspath(checkpoint))
  try:
    _check_params(model, params, data.image_size)
  except ValueError as e:
    raise ValueError(f"{checkpoint} holds the params of another model than --config={config} "
                     f"builds; give the config (and --config.* overrides) it was trained with "
                     f"({e})") from None
  return writers[fmt](os.fspath(out), model, params, tokenizer, dtype=dtype, overwrite=overwrite,
                      max_shard_bytes=max_shard_bytes)


def parser(prog: str = "python -m vljax.convert.export") -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog=prog, description="Export a trained vljax model in a public format: "
      f"{_exports_text()}. Extra --config.a.b=VALUE arguments override fields of the config.")
  p.add_argument("--config", required=True,
                 help="the training config (a file or a name in experiments/configs/)")
  p.add_argument("--checkpoint", required=True,
                 help="a vljax workdir, its checkpoints dir, or a step dir")
  p.add_argument("--out", required=True,
                 help="the directory (transformers) or .npz file (big_vision) to write")
  p.add_argument("--format", choices=FORMATS, default="transformers",
                 help="default: transformers")
  p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                 help="cast the weights (default: as trained)")
  p.add_argument("--max_shard_bytes", type=int, default=None,
                 help="shard transformers weights above this size")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the model files of an existing directory, or an existing file")
  return p


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m vljax.convert.export",
         only: Sequence[type] | None = None) -> int:
  """The command line; returns the exit status (0, or 1 after one `error: ...` line)."""
  # Imported here, as in `export`.
  from vljax.train.config import split_overrides  # pylint: disable=import-outside-toplevel
  p = parser(prog)
  rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
  args = p.parse_args(rest)
  try:
    written = export(args.config, args.checkpoint, args.out, fmt=args.format, dtype=args.dtype,
                     overwrite=args.overwrite, max_shard_bytes=args.max_shard_bytes,
                     overrides=overrides, only=only)
  except ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
