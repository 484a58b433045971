"""WebDataset tar shards (as img2dataset writes them) as a grain random-access source.

A shard is an uncompressed tar whose members are grouped into records by key: `dir/key.jpg`,
`dir/key.txt`, `dir/key.json`, ... share the key `dir/key` (the member path up to the first dot
of its base name). Construction reads only the tar headers and remembers where each member's
bytes lie, so `source[i]` is a few positional reads plus one image decode, from any process and
in any order, which is what grain's shuffling, sharding and exact resume need.

Records that cannot be used (no image, an image that does not decode, no caption, an image mode
with no faithful RGB conversion) come back as `{"error": reason, "key": key}` instead of raising,
so that `vljax.data.batching.SkipBadAndBatch` can skip and count them.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import operator
import os
import re
import tarfile
import threading
from typing import Any, Iterable, Sequence, SupportsIndex

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")

# Modes with a faithful 8-bit RGB conversion. Rejected are the 16/32-bit integer and float
# modes ("I", "I;16", "F", ...), whose value range PIL's convert() clips instead of rescaling
# (most pixels turn white), and colour spaces such as "LAB" and "HSV" that web images never
# legitimately use; such a record is reported as bad rather than silently corrupted.
RGB_CONVERTIBLE_MODES: frozenset[str] = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})

# Alpha is composited over this colour: a transparent logo on a web page is seen on white, and
# dropping the alpha channel instead would expose whatever colour the encoder left underneath.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

_NUMERIC_RANGE = re.compile(r"(\d+)\.\.(\d+)")
log = logging.getLogger("vljax")


def _split_top_level(text: str, pattern: str) -> list[str]:
  """Splits `text` at commas that are not inside nested braces."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char == "{":
      depth += 1
    elif char == "}":
      depth -= 1
    elif char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  if len(parts) == 1:
    raise ValueError(f"Malformed brace pattern {pattern!r}: {{{text}}} is neither a comma "
                     "list {a,b} nor a numeric range {000..123}")
  return parts


def _expand_range(text: str, pattern: str) -> list[str]:
  """'000..012' -> ['000', ..., '012']; zero-padded to the wider end when an end has leading 0s."""
  lo_text, hi_text = _NUMERIC_RANGE.fullmatch(text).groups()
  lo, hi = int(lo_text), int(hi_text)
  if hi < lo:
    raise ValueError(f"Malformed brace pattern {pattern!r}: range {{{text}}} ends before it starts")
  padded = any(len(t) > 1 and t.startswith("0") for t in (lo_text, hi_text))
  width = max(len(lo_text), len(hi_text)) if padded else 0
  return [f"{n:0{width}d}" for n in range(lo, hi + 1)]


def _expand_one(pattern: str, whole: str) -> list[str]:
  """Expands the first top-level brace group of `pattern` and recurses on the results."""
  start = pattern.find("{")
  stray = pattern.find("}")
  if start < 0:
    if stray >= 0:
      raise ValueError(f"Malformed brace pattern {whole!r}: '}}' without a matching '{{'")
    return [pattern]
  if 0 <= stray < start:
    raise ValueError(f"Malformed brace pattern {whole!r}: '}}' without a matching '{{'")
  depth = 0
  for end in range(start, len(pattern)):
    depth += {"{": 1, "}": -1}.get(pattern[end], 0)
    if depth == 0:
      break
  else:
    raise ValueError(f"Malformed brace pattern {whole!r}: '{{' without a matching '}}'")
  prefix, body, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
  if _NUMERIC_RANGE.fullmatch(body):
    alternatives = _expand_range(body, whole)
  else:
    alternatives = [x for part in _split_top_level(body, whole) for x in _expand_one(part, whole)]
  return [x for alt in alternatives for x in _expand_one(prefix + alt + suffix, whole)]


def expand_braces(patterns: str | Iterable[str]) -> list[str]:
  """Expands shard patterns: "a/{000..012}.tar", "{x,y}/s.tar", nested and repeated braces.

  `patterns` is one pattern, a "::"-separated string of patterns (as webdataset accepts), or a
  sequence of patterns; the result keeps their order. Raises ValueError on unbalanced braces,
  empty or one-item groups, and ranges that end before they start.
  """
  if isinstance(patterns, str):
    patterns = patterns.split("::")
  out = []
  for pattern in patterns:
    if not pattern:
      raise ValueError("Empty shard pattern")
    out.extend(_expand_one(pattern, pattern))
  return out


def split_member_name(name: str) -> tuple[str, str]:
  """'dir/000123.seg.jpg' -> ('dir/000123', 'seg.jpg'): key up to the basename's first dot."""
  directory, _, base = name.rpartition("/")
  stem, _, extension = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), extension.lower()


# Leading bytes of compressed files (which cannot be read by seeking to a member) -> the format.
COMPRESSION_MAGIC: dict[bytes, str] = {
    b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _truncated(path: str, detail: str) -> ValueError:
  return ValueError(f"WebDataset shard {path!r} is truncated: {detail} (an interrupted download "
                    "or copy?)")


def index_shard(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
  """[(key, {extension: (data offset, size)})] of a tar shard, in order, from its headers only.

  An empty file or tar gives []; a compressed, truncated, damaged or non-tar file raises
  ValueError saying which it is.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"WebDataset shard {path!r} does not exist"
                            + (" (it is a directory)" if os.path.isdir(path) else ""))
  file_size = os.path.getsize(path)
  if file_size == 0:
    return []
  with open(path, "rb") as f:
    head = f.read(tarfile.BLOCKSIZE)
  for magic, kind in COMPRESSION_MAGIC.items():
    if head.startswith(magic):
      raise ValueError(f"WebDataset shard {path!r} is {kind}-compressed; WebDataset sources need "
                       f"uncompressed tar shards, whose members are read by seeking: decompress "
                       f"it, e.g. `{kind} -dc {path} > uncompressed.tar`")
  records: dict[str, dict[str, tuple[int, int]]] = {}
  last = None  # the name of the last member read
  try:
    with tarfile.open(path, mode="r:") as tar:
      for info in tar:
        if info.offset_data + info.size > file_size:
          raise _truncated(path, f"member {info.name!r} needs bytes up to "
                           f"{info.offset_data + info.size} but the file has {file_size} bytes")
        last = info.name
        if not info.isfile():
          continue
        key, extension = split_member_name(info.name)
        if not key.rpartition("/")[2] or not extension:
          continue  # hidden files (".DS_Store") and members without an extension
        records.setdefault(key, {})[extension] = (info.offset_data, info.size)
      # After the first member tarfile ends silently at a header it cannot read; a complete
      # archive ends with zero blocks instead.
      tar.fileobj.seek(tar.offset)
      tail = tar.fileobj.read(tarfile.BLOCKSIZE)
  except tarfile.TarError as e:
    if str(e) == "unexpected end of data" or (str(e) == "truncated header"
                                              and head[257:262] == b"ustar"):
      where = f"the padding after member {last!r}" if last else "the first member's header"
      raise _truncated(path, f"it ends at byte {file_size}, inside {where}") from e
    raise ValueError(f"WebDataset shard {path!r} is not a tar archive ({e})") from e
  if tail.strip(b"\0"):
    if len(tail) < tarfile.BLOCKSIZE:
      raise _truncated(path, f"the tar header after member {last!r} is cut off at byte "
                       f"{file_size}")
    raise ValueError(f"WebDataset shard {path!r} is damaged: the bytes at offset {tar.offset}, "
                     f"after member {last!r}, are not a tar header, so the members after it "
                     "cannot be read")
  return list(records.items())


def _caption(members: dict[str, bytes], caption_keys: Sequence[str], json_field: str) -> str | None:
  """The first non-empty caption among `caption_keys` (JSON members give `json_field`)."""
  for extension in caption_keys:
    if extension not in members:
      continue
    text = members[extension].decode("utf-8", errors="replace")
    if extension == "json" or extension.endswith(".json"):
      try:
        value = json.loads(text)
      except ValueError:
        continue
      text = value.get(json_field) if isinstance(value, dict) else None
      if not isinstance(text, str):
        continue
    text = text.strip()
    if text:
      return text
  return None


def decode_rgb(data: bytes, image_size: int | None = None,
               exif_transpose: bool = True) -> np.ndarray | str:
  """Image bytes -> uint8 [H, W, 3], or a string saying why they cannot be used.

  With `image_size`, the shorter side is resized to it (bicubic, antialiased when shrinking) and
  the centre square is kept, in one resampling (see `to_rgb`).
  """
  try:
    image = Image.open(io.BytesIO(data))
    if image_size is not None and image.format == "JPEG":
      # Lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= image_size: much faster.
      image.draft("RGB", (image_size, image_size))
    image.load()
  except Image.UnidentifiedImageError:
    return "cannot decode image (not in any format PIL reads)"
  except Exception as e:  # pylint: disable=broad-except
    # Damaged bytes make PIL raise many types (OSError, SyntaxError, ValueError, bombs...).
    return f"cannot decode image ({type(e).__name__}: {e})"
  return to_rgb(image, image_size, exif_transpose)


def to_rgb(image: Image.Image, image_size: int | None = None,
           exif_transpose: bool = True) -> np.ndarray | str:
  """A PIL image -> uint8 [H, W, 3], or a string saying why it cannot be used.

  Alpha is composited over `ALPHA_BACKGROUND`; modes outside `RGB_CONVERTIBLE_MODES` are refused.
  With `image_size`, the shorter side is resized to it (bicubic, antialiased when shrinking) and
  the centre square is kept, in one resampling.
  """
  try:
    if image.mode not in RGB_CONVERTIBLE_MODES:
      return f"unsupported image mode {image.mode!r}"
    if exif_transpose:
      image = ImageOps.exif_transpose(image)
    if image.mode in ("P", "PA") and ("transparency" in image.info or image.mode == "PA"):
      image = image.convert("RGBA")
    if image.mode in ("LA", "RGBA"):
      image = image.convert("RGBA")
      background = Image.new("RGBA", image.size, ALPHA_BACKGROUND + (255,))
      image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    if image_size is not None:
      width, height = image.size
      side = min(width, height)
      left, top = (width - side) / 2, (height - side) / 2
      image = image.resize((image_size, image_size), Image.Resampling.BICUBIC,
                           box=(left, top, left + side, top + side))
    return np.asarray(image, dtype=np.uint8)
  except Exception as e:  # pylint: disable=broad-except
    # Lazily decoded data can still fail here (truncated tiles, bombs...).
    return f"cannot decode image ({type(e).__name__}: {e})"


# Record fields one WebDataset record can give besides "image" and "caption": they are read from
# the top level of its .json member (e.g. LLaVA's {"conversations": [...]}).
JSON_FIELDS = ("question", "answers", "question_type", "conversations", "system", "regions")


class WebDatasetSource:
  """Records of WebDataset tar shards: index -> {"image", "caption", "key"} or {"error", "key"}.

  `fields` are the record fields wanted (a view's `fields`): "image", "caption" (from
  `caption_keys`) and any of JSON_FIELDS, read from the record's .json member; a record lacking
  one is a bad record ("missing or empty <field>").

  Implements grain's RandomAccessDataSource protocol. Pickling drops the open files, which are
  reopened on first use, so the source can be sent to grain worker processes. Reads are
  positional (`os.pread`), so threads can share it. Without `image_size` images keep their own
  size and cannot be batched together. Shards without records are skipped with a warning; if all
  are empty it raises ValueError.
  """

  def __init__(self, shards: str | Sequence[str], *, image_size: int | None = None,
               caption_keys: Sequence[str] = ("txt", "json"), json_caption_field: str = "caption",
               exif_transpose: bool = True, fields: Sequence[str] = ("image", "caption")):
    unusable = sorted(set(fields) - {"image", "caption", *JSON_FIELDS})
    if unusable:
      raise ValueError(f"WebDataset records give one image, a caption and the .json fields "
                       f"{', '.join(JSON_FIELDS)}; not {', '.join(unusable)} (views of several "
                       "images or frames read the shapes world)")
    self.fields = tuple(fields)
    self.shards: tuple[str, ...] = tuple(expand_braces(shards))
    self.image_size = image_size
    if isinstance(caption_keys, str):  # one key, not its letters
      caption_keys = (caption_keys,)
    self.caption_keys = tuple(k.lower() for k in caption_keys)
    self.json_caption_field = json_caption_field
    self.exif_transpose = exif_transpose
    if image_size is not None and image_size < 1:
      raise ValueError(f"image_size must be positive, got {image_size}")
    if not self.caption_keys and "caption" in self.fields:
      raise ValueError("caption_keys is empty")
    # One row per record: (shard number, key, {extension: (offset, size)}).
    self._records: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
    empty = []
    for shard_id, path in enumerate(self.shards):
      records = index_shard(path)
      self._records.extend((shard_id, key, members) for key, members in records)
      if not records:
        empty.append(path)
    if not self._records:
      raise ValueError(f"WebDataset shards {shards!r} hold no records ({len(empty)} empty tar "
                       "files): check config.data.webdataset.shards")
    repeated = sorted(path for path, n in collections.Counter(self.shards).items() if n > 1)
    if repeated:
      log.warning("WebDataset shards listed more than once (their records are read as often): %s",
                  ", ".join(repeated[:5]) + (", ..." if len(repeated) > 5 else ""))
    if empty:
      log.warning("Skipping %d of %d WebDataset shards that hold no records: %s", len(empty),
                  len(self.shards), ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else ""))
    self._files: dict[int, int] = {}
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._records)

  def __repr__(self) -> str:
    return f"WebDatasetSource({len(self.shards)} shards, {len(self)} records)"

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_files"] = {}
    del state["_lock"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def close(self) -> None:
    """Closes the shard files; they reopen on the next read."""
    with self._lock:
      files, self._files = self._files, {}
    for fd in files.values():
      os.close(fd)

  def __del__(self):
    if getattr(self, "_files", None):
      self.close()

  def _read(self, shard_id: int, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of a shard, without moving any shared file position."""
    with self._lock:
      fd = self._files.get(shard_id)
      if fd is None:
        fd = self._files[shard_id] = os.open(self.shards[shard_id], os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
      raise OSError(f"Shard {self.shards[shard_id]!r} is shorter than its index says "
                    f"({len(data)} of {size} bytes at offset {offset}); was it rewritten?")
    return data

  def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < len(self._records):
      raise IndexError(f"Index {index} is out of range for {len(self._records)} records")
    shard_id, key, members = self._records[index]
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
      return {"error": f"no image member (has: {', '.join(sorted(members))})", "key": key}
    json_fields = [f for f in self.fields if f in JSON_FIELDS]
    wanted = [image_ext] + [e for e in self.caption_keys if e in members and "caption" in self.fields]
    if json_fields and "json" in members and "json" not in wanted:
      wanted.append("json")
    data = {e: self._read(shard_id, *members[e]) for e in wanted}
    record: dict[str, Any] = {"key": key}
    if "caption" in self.fields:
      caption = _caption(data, self.caption_keys, self.json_caption_field)
      if caption is None:
        looked = ", ".join(f".{e}" for e in self.caption_keys)
        return {"error": f"missing or empty caption (looked in {looked})", "key": key}
      record["caption"] = caption
    if json_fields:
      try:
        value = json.loads(data["json"].decode("utf-8", errors="replace")) if "json" in data else {}
      except ValueError:
        value = {}
      for field in json_fields:
        if not isinstance(value, dict) or value.get(field) in (None, "", []):
          if field in ("question_type", "system"):  # optional
            continue
          return {"error": f"missing or empty {field} (looked in .json)", "key": key}
        record[field] = value[field]
    image = decode_rgb(data[image_ext], self.image_size, self.exif_transpose)
    if isinstance(image, str):
      return {"error": image, "key": key}
    return {"image": image, **record}
