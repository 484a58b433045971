"""The tokenizer of a Hugging Face model directory, giving the ids transformers'
`AutoTokenizer.from_pretrained(dir)` gives, without torch or transformers.

`tokenizer.json` is read with the `tokenizers` library and set up as transformers (5.x) sets up
its generic `TokenizersBackend` (`PreTrainedTokenizerFast`): no truncation or padding, the
special tokens of `tokenizer_config.json` / `special_tokens_map.json` added where the file lacks
them, bos / eos placed by the file's post-processor (transformers 5 then ignores the config's
`add_bos_token` / `add_eos_token`), special tokens split when `split_special_tokens`, and
decoding cleaned up as `clean_up_tokenization_spaces` says. A directory with only a
SentencePiece `tokenizer.model` is read with `sentencepiece` as transformers converts it (where
no model-specific tokenizer class rebuilds it); `add_bos_token` / `add_eos_token`, default
False, apply there.

`HFTokenizer` also has the interface of `vljax.data.tokenizer.Tokenizer` that the data views use
(`tokenize`, batch `encode` / `decode`, `pad_id`, `token_id`, `added_tokens`, ...), so either
can feed them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence, overload

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"

# transformers' named special tokens.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
_EXTRA_KEYS = ("extra_special_tokens", "additional_special_tokens")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# What transformers' `clean_up_tokenization` undoes: spaces a WordPiece decode leaves before
# punctuation and English contractions.
_CLEAN_UPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _read_json_object(path: str) -> dict[str, Any]:
  """The JSON object in `path`, or {} when there is no such file."""
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
  return value


def _added_token(value: Any, *, special: bool | None = None) -> AddedToken:
  """A token of a tokenizer config (a string, or a dict of AddedToken fields) as an AddedToken;
  `special` overrides its flag."""
  if isinstance(value, AddedToken):
    token = AddedToken(value.content, **{flag: getattr(value, flag) for flag in _ADDED_TOKEN_FLAGS})
  elif isinstance(value, str):
    token = AddedToken(value, special=True)
  elif isinstance(value, dict) and isinstance(value.get("content"), str):
    token = AddedToken(value["content"], **{flag: value[flag] for flag in _ADDED_TOKEN_FLAGS
                                            if flag in value})
  else:
    raise ValueError(f"Not a token in a tokenizer config: {value!r}")
  if special is not None:
    token.special = special
  return token


def _content(value: Any) -> str:
  """The text of a token given as a string or as a dict of AddedToken fields."""
  return value if isinstance(value, str) else _added_token(value).content


def _token_list(value: Any) -> list[Any]:
  """The tokens of an extra / additional special tokens entry (a list, or a dict name -> token)."""
  if isinstance(value, dict):
    return list(value.values())
  return list(value or [])


def _special_tokens(tokenizer_config: dict[str, Any],
                    special_tokens_map: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
  """The named special tokens (key -> token) and the extra ones, as transformers resolves them:
  special_tokens_map.json only counts for configs without an `added_tokens_decoder` (older
  saves), and then overrides tokenizer_config.json."""
  named = {key: tokenizer_config[key] for key in _SPECIAL_KEYS
           if tokenizer_config.get(key) is not None}
  extra = next((_token_list(tokenizer_config[key]) for key in _EXTRA_KEYS
                if tokenizer_config.get(key)), [])
  if "added_tokens_decoder" not in tokenizer_config:
    for key, value in special_tokens_map.items():
      if key in _SPECIAL_KEYS and value is not None:
        named[key] = value
      elif key in _EXTRA_KEYS:
        extra += [token for token in _token_list(value) if token not in extra]
  return named, extra


class HFTokenizer:
  """The tokenizer of a Hugging Face model directory (`tokenizer.json`, or a SentencePiece
  `tokenizer.model`), with the ids of transformers' AutoTokenizer.

  Special ids (`bos_id`, `eos_id`, `pad_id`, `unk_id`) come from tokenizer_config.json /
  special_tokens_map.json, else from generation_config.json, else are None. `pad_token` names
  the token to pad with when the files name none (LLaVA pads LLaMA with "<unk>"); the batch
  `encode` and the data views need one. Pickles (grain workers rebuild it).
  """

  def __init__(self, path: str | os.PathLike[str], *, pad_token: str | None = None):
    directory = os.fspath(path)
    if not os.path.isdir(directory):
      raise FileNotFoundError(f"No tokenizer directory at {directory}")
    tokenizer_config = _read_json_object(os.path.join(directory, TOKENIZER_CONFIG))
    special_tokens_map = _read_json_object(os.path.join(directory, SPECIAL_TOKENS_MAP))
    generation_config = _read_json_object(os.path.join(directory, GENERATION_CONFIG))
    named, extra = _special_tokens(tokenizer_config, special_tokens_map)
    json_path = os.path.join(directory, TOKENIZER_JSON)
    model_path = os.path.join(directory, SENTENCEPIECE_MODEL)
    if os.path.isfile(json_path):
      self._backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend.load(
          json_path, tokenizer_config, named, extra)
    elif os.path.isfile(model_path):
      self._backend = _SentencePieceBackend.load(model_path, tokenizer_config, named, extra)
      named = self._backend.named
    else:
      raise FileNotFoundError(f"{directory} has neither {TOKENIZER_JSON} nor "
                              f"{SENTENCEPIECE_MODEL}; cannot build its tokenizer")
    self._special_ids: dict[str, int | None] = {}
    for key in ("bos", "eos", "pad", "unk"):
      token = named.get(f"{key}_token")
      token_id = None if token is None else self._backend.token_to_id(_content(token))
      if token_id is None:
        token_id = generation_config.get(f"{key}_token_id")
        if isinstance(token_id, list):  # Several eos ids: the first is the one a text ends with.
          token_id = token_id[0] if token_id else None
      self._special_ids[key] = token_id if isinstance(token_id, int) else None
    if pad_token is not None:
      self._special_ids["pad"] = self.token_id(pad_token)

  @property
  def vocab_size(self) -> int:
    """The number of token ids (the largest id + 1), added tokens included; transformers'
    `len(tokenizer)`, not its `vocab_size`, which leaves added tokens out."""
    return self._backend.num_ids

  @property
  def bos_id(self) -> int | None:
    """Beginning-of-sequence id, or None."""
    return self._special_ids["bos"]

  @property
  def eos_id(self) -> int | None:
    """End-of-sequence id, or None."""
    return self._special_ids["eos"]

  @property
  def pad_id(self) -> int | None:
    """Padding id, or None (see `pad_token`)."""
    return self._special_ids["pad"]

  @property
  def unk_id(self) -> int | None:
    """Unknown-token id, or None."""
    return self._special_ids["unk"]

  @property
  def added_tokens(self) -> tuple[str, ...]:
    """The texts of the tokens added to the model's vocabulary (special ones included), by id."""
    return self._backend.added_tokens

  def token_id(self, name: str) -> int:
    """The id of a token (an added token or a piece of the vocabulary) given by its text."""
    token_id = self._backend.token_to_id(name)
    if token_id is None:
      raise KeyError(f"{name!r} is not a token of this tokenizer; add it with "
                     "HFTokenizer.with_added_tokens")
    return token_id

  def with_added_tokens(self, tokens: Sequence[str]) -> HFTokenizer:
    """This tokenizer with `tokens` added as special tokens (as transformers'
    `add_special_tokens`): a token already in the vocabulary keeps its id, the others get the
    next ids in order."""
    if isinstance(tokens, str) or not all(isinstance(t, str) and t for t in tokens):
      raise TypeError(f"tokens must be a sequence of non-empty strings, got {tokens!r}")
    new = object.__new__(HFTokenizer)
    new._backend = self._backend.with_added_tokens(list(dict.fromkeys(tokens)))
    new._special_ids = dict(self._special_ids)
    return new

  def tokenize(self, text: str) -> list[int]:
    """The ids of one text without bos, eos or other template tokens; added tokens' texts
    become their ids."""
    if not isinstance(text, str):
      raise TypeError(f"tokenize() takes one string, got {type(text).__name__}")
    return self._backend.encode(text, add_special_tokens=False)

  @overload
  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    ...

  @overload
  def encode(self, text: Sequence[str], max_len: int, *, bos: bool = False,
             eos: bool = True) -> np.ndarray:
    ...

  def encode(self, text, *args, **kwargs):
    """`encode(text, add_special_tokens=True) -> list[int]`: the ids of one text, as
    transformers' `tokenizer.encode(text)` (with the template's bos / eos).

    `encode(texts, max_len, *, bos=False, eos=True) -> int32 [len(texts), max_len]`: a batch as
    `vljax.data.tokenizer.Tokenizer.encode` makes it: each text's ids (see `tokenize`; unlike
    there, added tokens' texts are recognised), bos and eos as asked, truncated (eos kept last)
    and right-padded with `pad_id`.
    """
    if isinstance(text, str):
      return self._encode_one(text, *args, **kwargs)
    return self._encode_batch(text, *args, **kwargs)

  def _encode_one(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(add_special_tokens, (bool, np.bool_)):
      raise TypeError(f"encode(text, add_special_tokens) takes a bool, got "
                      f"{add_special_tokens!r}; to encode to a length, pass a list of texts")
    return self._backend.encode(text, add_special_tokens=add_special_tokens)

  def _encode_batch(self, texts: Sequence[str], max_len: int, *, bos: bool = False,
                    eos: bool = True) -> np.ndarray:
    if not all(isinstance(text, str) for text in texts):
      raise TypeError("encode() takes a string or a sequence of strings")
    for wanted, name in ((bos, "bos"), (eos, "eos"), (True, "pad")):
      if wanted and self._special_ids[name] is None:
        hint = (" (name one with HFTokenizer(path, pad_token=...), e.g. the eos or unk token)"
                if name == "pad" else "")
        raise ValueError(f"This tokenizer has no {name} token{hint}")
    if max_len < int(bos) + int(eos) + 1:
      raise ValueError(f"max_len={max_len} leaves no room for text after bos/eos")
    ids_nl = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    for row, text in enumerate(texts):
      ids = ([self.bos_id] if bos else []) + self.tokenize(text)
      ids = ids[:max_len - 1] + [self.eos_id] if eos else ids[:max_len]
      ids_nl[row, :len(ids)] = ids
    return ids_nl

  @overload
  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    ...

  @overload
  def decode(self, ids: np.ndarray | Sequence[Sequence[int]]) -> list[str]:
    ...

  def decode(self, ids, *args, **kwargs):
    """`decode(ids, skip_special_tokens=True) -> str`: the text of one sequence of ids, as
    transformers' `tokenizer.decode(ids, skip_special_tokens=...)` (whose default is False).

    `decode(ids_nl) -> list[str]`: each row of a [N, L] batch as
    `vljax.data.tokenizer.Tokenizer.decode` reads it: up to the first eos, without pad and bos;
    other special tokens, such as "<image>", as their text.
    """
    if _is_batch(ids):
      return self._decode_batch(ids, *args, **kwargs)
    return self._decode_one(ids, *args, **kwargs)

  def _decode_one(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self._backend.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                                skip_special_tokens=skip_special_tokens)

  def _decode_batch(self, ids_nl: Any) -> list[str]:
    skipped = {self.pad_id, self.bos_id} - {None}
    texts = []
    for row in ids_nl:
      row = [int(i) for i in np.asarray(row).reshape(-1)]
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      texts.append(self._backend.decode([i for i in row if i not in skipped],
                                        skip_special_tokens=False))
    return texts

  def __getstate__(self) -> dict[str, Any]:
    return {"backend": self._backend, "special_ids": self._special_ids}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._backend = state["backend"]
    self._special_ids = state["special_ids"]


def _is_batch(ids: Any) -> bool:
  """Whether `ids` is a batch of rows ([N, L]) rather than one sequence of ids."""
  ndim = getattr(ids, "ndim", None)
  if ndim is not None:
    if ndim not in (1, 2):
      raise ValueError(f"decode() takes ids [L] or a batch [N, L], got {ndim} dimensions")
    return ndim == 2
  return any(not isinstance(i, (int, np.integer)) for i in ids)


class _TokenizersBackend:
  """A `tokenizers.Tokenizer` set up as transformers sets up its generic fast tokenizer."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, clean_up: bool):
    self._tokenizer = tokenizer
    self._clean_up = clean_up
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.num_ids = max(vocab.values(), default=-1) + 1
    decoder = tokenizer.get_added_tokens_decoder()
    self.added_tokens = tuple(decoder[i].content for i in sorted(decoder))

  @classmethod
  def load(cls, path: str, tokenizer_config: dict[str, Any], named: dict[str, Any],
           extra: list[Any]) -> _TokenizersBackend:
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises a bare Exception for unreadable files.
      raise ValueError(f"{path} is not a tokenizers file it can read: {e}") from e
    # transformers' encode neither truncates nor pads by default, whatever the file says.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    _add_missing_tokens(tokenizer, tokenizer_config, named, extra)
    tokenizer.encode_special_tokens = bool(tokenizer_config.get("split_special_tokens", False))
    # The file's post-processor places bos / eos: transformers 5 ignores the config's
    # add_bos_token / add_eos_token when there is a tokenizer.json.

    # transformers skips the clean-up for BPE models, which it would corrupt, unless forced.
    clean_up = bool(tokenizer_config.get("clean_up_tokenization_spaces", False)) and (
        type(tokenizer.model).__name__ != "BPE" or bool(tokenizer_config.get(
            "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)))
    return cls(tokenizer, clean_up)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if self._clean_up:
      for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text

  def with_added_tokens(self, tokens: list[str]) -> _TokenizersBackend:
    tokenizer = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
    tokenizer.encode_special_tokens = self._tokenizer.encode_special_tokens
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return _TokenizersBackend(tokenizer, self._clean_up)

  def __getstate__(self) -> dict[str, Any]:
    return {"json": self._tokenizer.to_str(), "clean_up": self._clean_up,
            "encode_special_tokens": self._tokenizer.encode_special_tokens}

  def __setstate__(self, state: dict[str, Any]) -> None:
    tokenizer = tokenizers.Tokenizer.from_str(state["json"])
    tokenizer.encode_special_tokens = state["encode_special_tokens"]
    self.__init__(tokenizer, state["clean_up"])


def _add_missing_tokens(tokenizer: tokenizers.Tokenizer, tokenizer_config: dict[str, Any],
                        named: dict[str, Any], extra: list[Any]) -> None:
  """Adds, as transformers does on loading, the config's added tokens that the file lacks (or
  has with other flags), then the named and extra special tokens it lacks."""
  present = {repr(token) for token in tokenizer.get_added_tokens_decoder().values()}
  declared = tokenizer_config.get("added_tokens_decoder") or {}
  to_add = []
  for _, value in sorted(declared.items(), key=lambda item: int(item[0])):
    token = _added_token(value)
    if repr(token) not in present:
      to_add.append(token)
  contents = ({token.content for token in tokenizer.get_added_tokens_decoder().values()}
              | {token.content for token in to_add})
  # Named special tokens are always special; extra ones keep the flags the config gives them.
  candidates = ([_added_token(value, special=True) for value in named.values()]
                + [_added_token(value) for value in extra])
  for token in candidates:
    if token.content not in contents:
      to_add.append(token)
      contents.add(token.content)
  if to_add:
    tokenizer.add_tokens(to_add)


class _SentencePieceBackend:
  """A SentencePiece model with the added tokens of its tokenizer config, encoding and decoding
  as transformers' conversion of it to a fast tokenizer does."""

  def __init__(self, model_proto: bytes, added: list[AddedToken], add_bos: bool, add_eos: bool,
               named: dict[str, Any]):
    self._model_proto = model_proto
    self._processor = spm.SentencePieceProcessor()
    self._processor.LoadFromSerializedProto(model_proto)
    self._add_bos, self._add_eos = add_bos, add_eos
    self.named = named
    self._added_ids: dict[str, int] = {}
    self._special: set[int] = set()
    next_id = self._processor.vocab_size()
    for token in added:
      if token.content in self._added_ids:
        continue
      piece_id = self._processor.piece_to_id(token.content)
      if self._processor.id_to_piece(piece_id) != token.content:
        piece_id, next_id = next_id, next_id + 1
      self._added_ids[token.content] = piece_id
      if token.special:
        self._special.add(piece_id)
    self._added_texts = {token_id: text for text, token_id in self._added_ids.items()}
    self._added_list = added
    self.num_ids = next_id
    self.added_tokens = tuple(self._added_texts[i] for i in sorted(self._added_texts))
    by_length = sorted(self._added_ids, key=len, reverse=True)
    self._pattern = (re.compile("(" + "|".join(map(re.escape, by_length)) + ")")
                     if by_length else None)
    # Whether pieces carry a leading "▁" for the start of a text, which decoding removes.
    self._dummy_prefix = self._processor.encode("a", out_type=str)[:1] in (["▁a"], ["▁"])

  @classmethod
  def load(cls, path: str, tokenizer_config: dict[str, Any], named: dict[str, Any],
           extra: list[Any]) -> _SentencePieceBackend:
    with open(path, "rb") as f:
      model_proto = f.read()
    processor = spm.SentencePieceProcessor()
    try:
      processor.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from e
    named = dict(named)
    # transformers names the model's own bos, eos and unk pieces when the config names none.
    for key, piece_id in (("bos_token", processor.bos_id()), ("eos_token", processor.eos_id()),
                          ("unk_token", processor.unk_id())):
      if key not in named and piece_id >= 0:
        named[key] = processor.id_to_piece(piece_id)
    declared = tokenizer_config.get("added_tokens_decoder") or {}
    added = [_added_token(value) for _, value in sorted(declared.items(),
                                                        key=lambda item: int(item[0]))]
    added += [_added_token(value, special=True) for value in [*named.values(), *extra]]
    backend = cls(model_proto, added, bool(tokenizer_config.get("add_bos_token", False)),
                  bool(tokenizer_config.get("add_eos_token", False)), named)
    for token_id, value in declared.items():
      if backend.token_to_id(_content(value)) != int(token_id):
        raise ValueError(f"{path}: the tokenizer config gives {_content(value)!r} the id "
                         f"{token_id}, but the SentencePiece model makes it "
                         f"{backend.token_to_id(_content(value))}")
    return backend

  def token_to_id(self, token: str) -> int | None:
    if token in self._added_ids:
      return self._added_ids[token]
    piece_id = self._processor.piece_to_id(token)
    return piece_id if self._processor.id_to_piece(piece_id) == token else None

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    ids = []
    # Each stretch of text between added tokens is encoded on its own (with its own dummy
    # prefix), as transformers matches added tokens on the raw text.
    for chunk in (self._pattern.split(text) if self._pattern else [text]):
      if chunk in self._added_ids:
        ids.append(self._added_ids[chunk])
      elif chunk:
        ids.extend(self._processor.encode(chunk))
    if add_special_tokens:
      bos, eos = (self.token_to_id(_content(self.named[key])) if key in self.named else None
                  for key in ("bos_token", "eos_token"))
      ids = ([bos] if self._add_bos and bos is not None else []) + ids + (
          [eos] if self._add_eos and eos is not None else [])
    return ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # As the converted tokenizer's decoder: pieces with "▁" as space, byte pieces joined into
    # UTF-8, added tokens as their text, then one leading space (the dummy prefix) removed.
    parts: list[str] = []
    pending_bytes = bytearray()
    for token_id in ids:
      if token_id in self._added_texts or token_id >= self._processor.vocab_size():
        text = self._added_texts.get(token_id)
        if text is None or (skip_special_tokens and token_id in self._special):
          continue
      elif self._processor.is_byte(token_id):
        pending_bytes.append(int(self._processor.id_to_piece(token_id)[1:-1], 16))
        continue
      elif self._processor.is_control(token_id):
        if skip_special_tokens:
          continue
        text = self._processor.id_to_piece(token_id)
      else:
        text = self._processor.id_to_piece(token_id).replace("▁", " ")
      if pending_bytes:
        parts.append(pending_bytes.decode("utf-8", errors="replace"))
        pending_bytes.clear()
      parts.append(text)
    if pending_bytes:
      parts.append(pending_bytes.decode("utf-8", errors="replace"))
    text = "".join(parts)
    return text[1:] if self._dummy_prefix and text.startswith(" ") else text

  def with_added_tokens(self, tokens: list[str]) -> _SentencePieceBackend:
    added = self._added_list + [AddedToken(t, special=True, normalized=False) for t in tokens]
    return _SentencePieceBackend(self._model_proto, added, self._add_bos, self._add_eos,
                                 self.named)

  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._model_proto, "added": [
        {"content": t.content, **{flag: getattr(t, flag) for flag in _ADDED_TOKEN_FLAGS}}
        for t in self._added_list], "add_bos": self._add_bos, "add_eos": self._add_eos,
            "named": {key: _content(value) for key, value in self.named.items()}}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"], [_added_token(t) for t in state["added"]],
                  state["add_bos"], state["add_eos"], state["named"])
