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
import string
from typing import Any, Sequence, overload

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
SIGLIP_SENTENCEPIECE_MODEL = "spiece.model"  # The name SiglipTokenizer saves its model under.
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"

# transformers' named special tokens.
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
_EXTRA_KEYS = ("extra_special_tokens", "additional_special_tokens")
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# The classes transformers rebuilds a tokenizer for, whatever the file's pipeline says, and their
# default special tokens.
_CLIP_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
_CLIP_DEFAULTS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
# CLIP's pre-tokenizer: special tokens, English contractions, letter runs, single digits and
# punctuation runs, as the original `SimpleTokenizer`'s regular expression.
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
               r"""|[^\s\p{L}\p{N}]+""")
_SIGLIP_CLASSES = ("SiglipTokenizer",)
_SIGLIP_DEFAULTS = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"}
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
    tokenizer_class = str(tokenizer_config.get("tokenizer_class") or "")
    self._model_max_length = tokenizer_config.get("model_max_length")
    if tokenizer_class in _CLIP_CLASSES:
      named = {**_CLIP_DEFAULTS, **named}
    if tokenizer_class in _SIGLIP_CLASSES:
      model_path = next((path for path in (os.path.join(directory, SIGLIP_SENTENCEPIECE_MODEL),
                                           model_path) if os.path.isfile(path)), model_path)
      if not os.path.isfile(model_path):
        raise FileNotFoundError(f"{directory} names SiglipTokenizer but has neither "
                                f"{SIGLIP_SENTENCEPIECE_MODEL} nor {SENTENCEPIECE_MODEL}")
      self._backend = _SiglipBackend.load(model_path, tokenizer_config, named, extra)
      named = self._backend.named
    elif os.path.isfile(json_path):
      self._backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend.load(
          json_path, tokenizer_config, named, extra,
          clip=tokenizer_class in _CLIP_CLASSES)
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
  def model_max_length(self) -> int | None:
    """The text length the model was trained with (`model_max_length` of the tokenizer
    config: 77 for CLIP, 64 for SigLIP), or None when the config gives none."""
    value = self._model_max_length
    # transformers writes a huge int (1e30) for "no limit".
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None

  def encode_padded(self, texts: Sequence[str],
                    max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ids and attention mask, int32 [len(texts), max_len], as transformers'
    `tokenizer(texts, padding="max_length", truncation=True, max_length=max_len)` gives them:
    the template's special tokens (CLIP: bos ... eos; SigLIP: ... eos) kept when a long text is
    cut, right-padded with `pad_id` (CLIP and SigLIP pad with their eos id, so pool at
    `eot_positions`, never at a search for the pad id). `max_len` defaults to
    `model_max_length`."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
      raise TypeError("encode_padded() takes a sequence of strings")
    max_len = self.model_max_length if max_len is None else max_len
    if not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f"encode_padded() needs max_len >= 1 (the tokenizer config gives no "
                       f"model_max_length), got {max_len!r}")
    if self.pad_id is None:
      raise ValueError("This tokenizer has no pad token (name one with "
                       "HFTokenizer(path, pad_token=...))")
    ids_nl = np.full((len(texts), max_len), self.pad_id, dtype=np.int32)
    mask_nl = np.zeros((len(texts), max_len), dtype=np.int32)
    for row, ids in enumerate(self._backend.encode_truncated(list(texts), max_len)):
      ids_nl[row, :len(ids)] = ids
      mask_nl[row, :len(ids)] = 1
    return ids_nl, mask_nl

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
    new._model_max_length = self._model_max_length
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
    return {"backend": self._backend, "special_ids": self._special_ids,
            "model_max_length": self._model_max_length}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self._backend = state["backend"]
    self._special_ids = state["special_ids"]
    self._model_max_length = state.get("model_max_length")


def eot_positions(mask_nl: np.ndarray) -> np.ndarray:
  """The position of each row's last real token, int32 [N]: the end-of-text token where
  `encode_padded` keeps it last (CLIP pools there), from the mask alone, as the pad id may
  equal the end-of-text id. Rows without a real token give 0."""
  mask_nl = np.asarray(mask_nl)
  return np.maximum(mask_nl.astype(np.int32).sum(axis=-1) - 1, 0).astype(np.int32)


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

  def __init__(self, tokenizer: tokenizers.Tokenizer, clean_up: bool,
               word_suffix: str | None = None):
    self._tokenizer = tokenizer
    self._clean_up = clean_up
    # CLIP's decode turns its BPE end-of-word suffix ("</w>") into spaces and strips the text.
    self._word_suffix = word_suffix
    self._padded: dict[int, tokenizers.Tokenizer] = {}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.num_ids = max(vocab.values(), default=-1) + 1
    decoder = tokenizer.get_added_tokens_decoder()
    self.added_tokens = tuple(decoder[i].content for i in sorted(decoder))

  @classmethod
  def load(cls, path: str, tokenizer_config: dict[str, Any], named: dict[str, Any],
           extra: list[Any], clip: bool = False) -> _TokenizersBackend:
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # The library raises a bare Exception for unreadable files.
      raise ValueError(f"{path} is not a tokenizers file it can read: {e}") from e
    if clip:
      tokenizer = _clip_tokenizer(tokenizer, named, path)
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
    if clip:
      eos, bos = (_content(named[key]) for key in ("eos_token", "bos_token"))
      tokenizer.post_processor = tokenizers.processors.RobertaProcessing(
          (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)),
          trim_offsets=False, add_prefix_space=False)
    return cls(tokenizer, clean_up, "</w>" if clip else None)

  def token_to_id(self, token: str) -> int | None:
    return self._tokenizer.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_truncated(self, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text's ids with the template's special tokens, cut to max_len as transformers'
    fast tokenizers cut them (`longest_first`, from the right, special tokens kept)."""
    if max_len not in self._padded:
      tokenizer = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
      tokenizer.encode_special_tokens = self._tokenizer.encode_special_tokens
      added = self._tokenizer.post_processor.num_special_tokens_to_add(False) if (
          self._tokenizer.post_processor is not None) else 0
      if max_len < added:
        raise ValueError(f"max_len={max_len} leaves no room for the {added} special tokens")
      tokenizer.enable_truncation(max_len, stride=0, strategy="longest_first",
                                  direction="right")
      self._padded[max_len] = tokenizer
    return [encoding.ids for encoding in self._padded[max_len].encode_batch(texts)]

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    text = self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if self._word_suffix:
      text = text.replace(self._word_suffix, " ").strip()
    if self._clean_up:
      for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text

  def with_added_tokens(self, tokens: list[str]) -> _TokenizersBackend:
    tokenizer = tokenizers.Tokenizer.from_str(self._tokenizer.to_str())
    tokenizer.encode_special_tokens = self._tokenizer.encode_special_tokens
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
    return _TokenizersBackend(tokenizer, self._clean_up, self._word_suffix)

  def __getstate__(self) -> dict[str, Any]:
    return {"json": self._tokenizer.to_str(), "clean_up": self._clean_up,
            "encode_special_tokens": self._tokenizer.encode_special_tokens,
            "word_suffix": self._word_suffix}

  def __setstate__(self, state: dict[str, Any]) -> None:
    tokenizer = tokenizers.Tokenizer.from_str(state["json"])
    tokenizer.encode_special_tokens = state["encode_special_tokens"]
    self.__init__(tokenizer, state["clean_up"], state.get("word_suffix"))


def _clip_tokenizer(file_tokenizer: tokenizers.Tokenizer, named: dict[str, Any],
                    path: str) -> tokenizers.Tokenizer:
  """CLIP's tokenizer as transformers 5 rebuilds it from a file: the file's BPE vocabulary and
  merges and its added tokens, with CLIPTokenizer's own pipeline (NFC, whitespace runs to one
  space, lower-casing; CLIP's split then byte-level; "</w>" ending each word), whatever
  pipeline the file holds."""
  state = json.loads(file_tokenizer.to_str())
  model = state.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"{path}: a CLIPTokenizer needs a BPE model, the file holds "
                     f"{model.get('type')!r}")
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab=model["vocab"], merges=merges, dropout=None, continuing_subword_prefix="",
      end_of_word_suffix="</w>", fuse_unk=False, unk_token=_content(named["unk_token"])))
  tokenizer.normalizer = tokenizers.normalizers.Sequence([
      tokenizers.normalizers.NFC(),
      tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
      tokenizers.normalizers.Lowercase()])
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(_CLIP_SPLIT), behavior="removed",
                                      invert=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  added = file_tokenizer.get_added_tokens_decoder()
  tokenizer.add_tokens([added[i] for i in sorted(added)])
  return tokenizer


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
    return self._with_special(ids) if add_special_tokens else ids

  def encode_truncated(self, texts: list[str], max_len: int) -> list[list[int]]:
    """Each text's ids, cut to max_len as transformers cuts them: the text's ids first, so
    that bos / eos stay."""
    special = int(self._add_bos and "bos_token" in self.named) + int(
        self._add_eos and "eos_token" in self.named)
    if max_len < special:
      raise ValueError(f"max_len={max_len} leaves no room for the {special} special tokens")
    rows = []
    for text in texts:
      content = self.encode(text, add_special_tokens=False)[:max_len - special]
      rows.append(self._with_special(content))
    return rows

  def _with_special(self, ids: list[int]) -> list[int]:
    bos, eos = (self.token_to_id(_content(self.named[key])) if key in self.named else None
                for key in ("bos_token", "eos_token"))
    return ([bos] if self._add_bos and bos is not None else []) + ids + (
        [eos] if self._add_eos and eos is not None else [])

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


class _SiglipBackend(_SentencePieceBackend):
  """SigLIP's SentencePiece tokenizer as transformers' `SiglipTokenizer` (the slow, Python
  one; there is no fast one): big_vision's canonicalisation of each stretch of text between
  special tokens (lower-cased where `do_lower_case`, ASCII punctuation removed, whitespace runs
  to one space, stripped), special tokens matched on the raw text and eating the whitespace
  around them, and "</s>" appended unless the ids already end with it."""

  def __init__(self, model_proto: bytes, added: list[AddedToken], add_bos: bool, add_eos: bool,
               named: dict[str, Any], do_lower_case: bool = True):
    super().__init__(model_proto, added, add_bos, add_eos, named)
    self._do_lower_case = do_lower_case
    self._flags = {token.content: token for token in added}
    self._unk = _content(named["unk_token"])
    self._unk_length = len(self._processor.encode(self._unk, out_type=str))

  @classmethod
  def load(cls, path: str, tokenizer_config: dict[str, Any], named: dict[str, Any],
           extra: list[Any]) -> _SiglipBackend:
    named = dict(named)
    for key, default in _SIGLIP_DEFAULTS.items():
      # SiglipTokenizer's own special tokens strip the whitespace on either side, whatever
      # flags the saved config gives them.
      named[key] = AddedToken(_content(named.get(key, default)), lstrip=True, rstrip=True,
                              normalized=False, special=True)
    base = _SentencePieceBackend.load(path, {**tokenizer_config, "add_bos_token": False,
                                             "add_eos_token": True}, named, extra)
    return cls(base._model_proto, base._added_list, False, True, base.named,
               bool(tokenizer_config.get("do_lower_case", True)))

  def _canonical_pieces(self, text: str) -> list[str]:
    if self._do_lower_case:
      text = text.lower()
    text = text.translate(_ASCII_PUNCTUATION)
    text = re.sub(r"\s+", " ", text).strip()
    pieces = self._processor.encode(self._unk + text, out_type=str)
    return pieces[self._unk_length:] if len(pieces) >= self._unk_length else pieces

  def encode(self, text: str, add_special_tokens: bool) -> list[int]:
    text = "▁" + text.replace("▁", " ")
    chunks = self._pattern.split(text) if self._pattern else [text]
    for i, chunk in enumerate(chunks):
      token = self._flags.get(chunk) if i % 2 else None
      if token is None:
        continue
      if token.rstrip and i + 1 < len(chunks) and chunks[i + 1]:
        chunks[i + 1] = chunks[i + 1].lstrip()
      if token.lstrip and i > 0 and chunks[i - 1]:
        chunks[i - 1] = chunks[i - 1].rstrip()
    pieces: list[str] = []
    for i, chunk in enumerate(chunks):
      if not chunk:
        continue
      pieces.extend([chunk] if i % 2 else self._canonical_pieces(chunk))
    if len(pieces) > 1 and pieces[0] == "▁" and pieces[1] in self._added_ids:
      pieces = pieces[1:]
    ids = [self._added_ids[piece] if piece in self._added_ids
           else self._processor.piece_to_id(piece) for piece in pieces]
    return self._with_special(ids) if add_special_tokens else ids

  def _with_special(self, ids: list[int]) -> list[int]:
    eos = self.token_to_id(_content(self.named["eos_token"]))
    return ids if ids and ids[-1] == eos else ids + [eos]

  def encode_truncated(self, texts: list[str], max_len: int) -> list[list[int]]:
    if max_len < 1:
      raise ValueError(f"max_len={max_len} leaves no room for the eos token")
    return [self._with_special(self.encode(text, add_special_tokens=False)[:max_len - 1])
            for text in texts]

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # As SiglipTokenizer.convert_tokens_to_string: stretches of pieces decoded by the model,
    # special tokens as their text with a space before a run of them, the whole stripped.
    text, pieces, previous_special = "", [], False
    for token_id in ids:
      if skip_special_tokens and token_id in self._special:
        continue
      token = self._added_texts.get(token_id)
      if token is None and 0 <= token_id < self._processor.vocab_size():
        token = self._processor.id_to_piece(token_id)
      if token is None:
        continue
      if token_id in self._special:
        text += ("" if previous_special else " ") + self._processor.decode(pieces) + token
        pieces, previous_special = [], True
      else:
        pieces.append(token)
        previous_special = False
    return (text + self._processor.decode(pieces)).strip()

  def with_added_tokens(self, tokens: list[str]) -> _SiglipBackend:
    added = self._added_list + [AddedToken(t, special=True, normalized=False) for t in tokens]
    return _SiglipBackend(self._model_proto, added, False, True, self.named,
                          self._do_lower_case)

  def __getstate__(self) -> dict[str, Any]:
    return {**super().__getstate__(), "do_lower_case": self._do_lower_case}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"], [_added_token(t) for t in state["added"]],
                  state["add_bos"], state["add_eos"], state["named"], state["do_lower_case"])


_ASCII_PUNCTUATION = str.maketrans("", "", string.punctuation)
