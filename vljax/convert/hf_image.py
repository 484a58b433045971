"""Image preprocessing of a Hugging Face model directory (`preprocessor_config.json`), giving the
pixels transformers' `CLIPImageProcessor` / `SiglipImageProcessor` give, with NumPy and PIL only,
channels-last as vljax models take them.

The steps and their rounding are those of transformers' PIL backend (`CLIPImageProcessorPil`,
the processor `AutoImageProcessor` builds without torchvision): convert to RGB (transparency
composited onto white), resize with PIL (shortest edge: the long edge is
`int(size * long / short)`, truncated), centre crop (top/left `(size - crop) // 2`, zero padding
where the image is smaller), rescale in float64 then float32, normalise in float32. The
torchvision backend (`CLIPImageProcessor` where torchvision is installed) resizes with torch's
interpolation instead, which this module does not reproduce (not checked: torchvision cannot be
installed beside the pinned torch).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Sequence

import numpy as np
import PIL.Image

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# Keys this processor reads; the others below it ignores because they do not change pixels.
_KNOWN_KEYS = frozenset({
    "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb",
    "default_to_square"})
_IGNORED_KEYS = frozenset({
    "image_processor_type", "feature_extractor_type", "processor_class", "auto_map",
    "_processor_class", "return_tensors", "data_format", "input_data_format", "device",
    "image_seq_length", "backend", "disable_grouping", "do_pad", "pad_size",
    "use_square_size", "model_input_names"})
# The PIL filters transformers' PILImageResampling names, by the value configs save.
_RESAMPLE = {0: PIL.Image.Resampling.NEAREST, 1: PIL.Image.Resampling.LANCZOS,
             2: PIL.Image.Resampling.BILINEAR, 3: PIL.Image.Resampling.BICUBIC,
             4: PIL.Image.Resampling.BOX, 5: PIL.Image.Resampling.HAMMING}
# Processor classes and their defaults, for keys a config leaves out (transformers' class
# attributes).
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_DEFAULTS = {
    "CLIPImageProcessor": dict(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, do_convert_rgb=True,
        default_to_square=False),
    "SiglipImageProcessor": dict(
        do_resize=True, size={"height": 224, "width": 224}, resample=3, do_center_crop=False,
        crop_size=None, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), do_convert_rgb=True,
        default_to_square=False),
}
_ALIASES = {"CLIPFeatureExtractor": "CLIPImageProcessor", "CLIPImageProcessorFast":
            "CLIPImageProcessor", "CLIPImageProcessorPil": "CLIPImageProcessor",
            "SiglipImageProcessorFast": "SiglipImageProcessor",
            "SiglipImageProcessorPil": "SiglipImageProcessor"}


def _size_dict(value: Any, name: str, default_to_square: bool) -> dict[str, int] | None:
  """A size as transformers' `get_size_dict` reads it (an int is square, or the shortest edge
  where `default_to_square` is False; a pair is (height, width))."""
  if value is None:
    return None
  if isinstance(value, bool):
    raise ValueError(f"{name} must be an int, a pair or a dict, got {value!r}")
  if isinstance(value, int):
    return {"height": value, "width": value} if default_to_square else {"shortest_edge": value}
  if isinstance(value, (list, tuple)) and len(value) == 2:
    return {"height": int(value[0]), "width": int(value[1])}
  if isinstance(value, dict) and set(value) in ({"height", "width"}, {"shortest_edge"},
                                                {"shortest_edge", "longest_edge"}):
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in value.values()):
      raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return dict(value)
  raise ValueError(f"{name} must be an int, (height, width), or a dict with 'height' and "
                   f"'width', 'shortest_edge' or 'shortest_edge' and 'longest_edge'; got "
                   f"{value!r}")


def _shortest_edge_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
  """transformers' output size for a shortest-edge resize (truncating the long edge)."""
  short = size["shortest_edge"]
  longest = size.get("longest_edge")
  if longest is None:
    small, large = (width, height) if width <= height else (height, width)
    new_short, new_long = short, int(short * large / small)
    return (new_long, new_short) if width <= height else (new_short, new_long)
  # get_size_with_aspect_ratio: the short edge shrinks so that the long one fits.
  raw = None
  lo, hi = float(min(height, width)), float(max(height, width))
  if hi / lo * short > longest:
    raw = longest * lo / hi
    short = int(round(raw))
  if (height <= width and height == short) or (width <= height and width == short):
    return height, width
  if width < height:
    return int((raw if raw is not None else short) * height / width), short
  return short, int((raw if raw is not None else short) * width / height)


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """RGB, with any transparency composited onto white (transformers' `convert_to_rgb`)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def load_image(source: Any) -> PIL.Image.Image:
  """A PIL image from a path, encoded bytes, a PIL image or a uint8 array ([H, W], [H, W, 1|3|4])."""
  if isinstance(source, PIL.Image.Image):
    return source
  if isinstance(source, (str, os.PathLike, bytes, bytearray)):
    what = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "the given bytes"
    try:
      image = PIL.Image.open(source if not isinstance(source, (bytes, bytearray))
                             else io.BytesIO(bytes(source)))
      image.load()
    except FileNotFoundError:
      raise
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
      raise ValueError(f"Cannot read an image from {what}: {e}") from e
    return image
  array = np.asarray(source)
  if array.dtype != np.uint8:
    raise TypeError(f"An image array must be uint8 (0..255), got {array.dtype}; convert floats "
                    "with (x * 255).round().astype(np.uint8)")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    return PIL.Image.fromarray(array, mode="L")
  if array.ndim == 3 and array.shape[-1] in (3, 4):
    return PIL.Image.fromarray(array, mode="RGB" if array.shape[-1] == 3 else "RGBA")
  raise ValueError(f"An image array must be [H, W] or [H, W, 1|3|4] (channels last), got shape "
                   f"{array.shape}")


class ImageProcessor:
  """The preprocessing of `preprocessor_config.json` (CLIPImageProcessor, SiglipImageProcessor):
  `processor(images) -> float32 [N, H, W, 3]`, equal to transformers' `pixel_values`
  transposed to channels-last."""

  def __init__(self, config: dict[str, Any]):
    if not isinstance(config, dict):
      raise TypeError(f"An image processor config is a dict, got {type(config).__name__}")
    kind = config.get("image_processor_type") or config.get("feature_extractor_type")
    kind = _ALIASES.get(kind, kind)
    if kind is not None and kind not in _DEFAULTS:
      raise ValueError(f"Unsupported image processor {kind!r}; this module reproduces "
                       f"{sorted(_DEFAULTS)}")
    unknown = sorted(set(config) - _KNOWN_KEYS - _IGNORED_KEYS)
    if unknown:
      raise ValueError(f"Unsupported image processor config keys {unknown}: this module "
                       f"reads {sorted(_KNOWN_KEYS)}")
    if config.get("do_pad"):
      raise ValueError("Unsupported image processor config: do_pad=True")
    settings = {**_DEFAULTS[kind or "CLIPImageProcessor"], **{
        key: value for key, value in config.items() if key in _KNOWN_KEYS and value is not None}}
    self.kind = kind or "CLIPImageProcessor"
    self.do_resize = bool(settings["do_resize"])
    self.size = _size_dict(settings["size"], "size", bool(settings["default_to_square"]))
    resample = settings["resample"]
    if resample not in _RESAMPLE:
      raise ValueError(f"Unsupported resample {resample!r}; PIL filters are {sorted(_RESAMPLE)}")
    self.resample = _RESAMPLE[resample]
    self.do_center_crop = bool(settings["do_center_crop"])
    self.crop_size = _size_dict(settings["crop_size"], "crop_size", True)
    if self.do_center_crop and (self.crop_size is None or set(self.crop_size) != {"height",
                                                                                  "width"}):
      raise ValueError(f"crop_size must give height and width, got {settings['crop_size']!r}")
    if self.do_resize and self.size is None:
      raise ValueError("do_resize needs a size")
    self.do_rescale = bool(settings["do_rescale"])
    self.rescale_factor = float(settings["rescale_factor"])
    self.do_normalize = bool(settings["do_normalize"])
    mean, std = settings["image_mean"], settings["image_std"]
    mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
    std = [std] * 3 if isinstance(std, (int, float)) else list(std)
    if len(mean) != 3 or len(std) != 3:
      raise ValueError(f"image_mean and image_std need 3 values, got {mean!r}, {std!r}")
    self.image_mean = np.asarray(mean, np.float32)
    self.image_std = np.asarray(std, np.float32)
    self.do_convert_rgb = bool(settings["do_convert_rgb"])

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike[str]) -> ImageProcessor:
    """The processor of a model directory (or a preprocessor_config.json path)."""
    path = os.fspath(path)
    if os.path.isdir(path):
      path = os.path.join(path, PREPROCESSOR_CONFIG)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No {PREPROCESSOR_CONFIG} at {path}")
    try:
      with open(path, encoding="utf-8") as f:
        config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not valid JSON: {e}") from e
    return cls(config)

  @property
  def output_size(self) -> tuple[int, int] | None:
    """(height, width) of every output, or None where it depends on the image."""
    if self.do_center_crop:
      return self.crop_size["height"], self.crop_size["width"]
    if self.do_resize and "height" in self.size:
      return self.size["height"], self.size["width"]
    return None

  def preprocess_one(self, image: Any) -> np.ndarray:
    """One image (see `load_image`) as float32 [H, W, 3]."""
    pil = load_image(image)
    if self.do_convert_rgb:
      pil = _to_rgb(pil)
    elif pil.mode != "RGB":
      raise ValueError(f"A {pil.mode} image needs do_convert_rgb to become RGB")
    if self.do_resize:
      if "shortest_edge" in self.size:
        height, width = _shortest_edge_size(pil.height, pil.width, self.size)
      else:
        height, width = self.size["height"], self.size["width"]
      pil = pil.resize((width, height), resample=self.resample)
    pixels = np.asarray(pil)
    if self.do_center_crop:
      pixels = _center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
    if self.do_rescale:
      pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
    else:
      pixels = pixels.astype(np.float32)
    if self.do_normalize:
      pixels = (pixels - self.image_mean) / self.image_std
    return pixels

  def __call__(self, images: Any | Sequence[Any]) -> np.ndarray:
    """Images (one, or a list) as float32 [N, H, W, 3]; all must come out the same size."""
    if isinstance(images, (list, tuple)):
      batch = [self.preprocess_one(image) for image in images]
    else:
      batch = [self.preprocess_one(images)]
    shapes = {pixels.shape for pixels in batch}
    if len(shapes) > 1:
      raise ValueError(f"Images came out in several sizes {sorted(shapes)} (no crop and a "
                       "shortest-edge resize); process them one by one")
    return np.stack(batch)


def _center_crop(pixels_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
  """transformers' centre crop: top / left at (size - crop) // 2, zero padding (centred,
  rounded up on the top / left) where the image is smaller than the crop."""
  orig_height, orig_width = pixels_hwc.shape[:2]
  top, left = (orig_height - height) // 2, (orig_width - width) // 2
  if top >= 0 and left >= 0:
    return pixels_hwc[top:top + height, left:left + width]
  new_height, new_width = max(height, orig_height), max(width, orig_width)
  padded = np.zeros((new_height, new_width) + pixels_hwc.shape[2:], pixels_hwc.dtype)
  top_pad = -(-(new_height - orig_height) // 2)
  left_pad = -(-(new_width - orig_width) // 2)
  padded[top_pad:top_pad + orig_height, left_pad:left_pad + orig_width] = pixels_hwc
  top, left = top + top_pad, left + left_pad
  return padded[max(0, top):min(new_height, top + height),
                max(0, left):min(new_width, left + width)]
