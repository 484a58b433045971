"""HFTokenizer gives the ids and texts of transformers' AutoTokenizer on tokenizers built here
(GPT-2 byte-level BPE, LLaMA byte-fallback BPE in two conventions, a WordPiece, a bare
SentencePiece model), and the batch interface of vljax's own Tokenizer."""
from __future__ import annotations

import io
import json
import os
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers,
                        pre_tokenizers, processors, trainers)

from vljax.convert.hf_tokenizer import HFTokenizer, eot_positions
from vljax.data import tokenizer as vljax_tokenizer
from vljax.data import views

TRAIN_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve façade; don't stop.",
    "日本語のテキストと中文文本。",
    "tabs\tand\nnewlines   with multiple spaces",
    "numbers 12345 and symbols #@$%",
] * 10

# Unicode (accents, CJK, emoji and characters never seen in training), runs of spaces, leading
# and trailing whitespace, tabs and newlines, empty texts, special tokens' texts inside text.
TEXTS = [
    "Hello world!",
    "The quick brown fox.",
    "Café crème brûlée — naïve façade.",
    "日本語のテキスト、中文文本。",
    "emoji 😀🎉 and 🦜 unseen ✓",
    "Ünïcödé Ωμέγα Ελληνικά",
    "two  spaces and   three",
    "   leading and trailing   ",
    " x",
    "x ",
    "tabs\tinside\tand\nnewlines\n\nblank",
    "\t\n",
    "",
    " ",
    "don't stop , it 's fine .",
    "a<s>b</s> c <unk> d<|endoftext|>e",
    "<s>",
    "[CLS] wordpiece [SEP] [MASK]",
    "A PHOTO of a Cat.", "x</s>y </s>", "<|startoftext|>hi", "▁lead",
]
# Long texts, cut to the model's length with the end-of-text token kept.
LONG_TEXTS = ["a photo of a " * 40, "Café crème brûlée — naïve façade. " * 12,
              "don't stop, it's fine! " * 20]


def _save(tokenizer: Tokenizer, directory, **kwargs) -> str:
  """Saves a tokenizers Tokenizer the way a transformers model repository holds it."""
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **kwargs).save_pretrained(
      str(directory))
  return str(directory)


def _gpt2_tokenizer() -> Tokenizer:
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(TRAIN_CORPUS, trainer)
  return tokenizer


def _clip_tokenizer(tmp) -> str:
  """A CLIP tokenizer directory as transformers saves one: a byte-level BPE with "</w>" word
  ends trained here, wrapped in CLIPTokenizer (77 tokens)."""
  bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>",
                             unk_token="<|endoftext|>"))
  bpe.normalizer = normalizers.Lowercase()
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(TRAIN_CORPUS, trainers.BpeTrainer(
      vocab_size=500, special_tokens=["<|startoftext|>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
      show_progress=False))
  model = json.loads(bpe.to_str())["model"]
  merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
  transformers.CLIPTokenizer(vocab=model["vocab"], merges=merges,
                             model_max_length=77).save_pretrained(str(tmp))
  return str(tmp)


def _sentencepiece_model(**overrides) -> bytes:
  """A LLaMA-like SentencePiece model: BPE with byte fallback, no normalisation."""
  settings = dict(vocab_size=400, model_type="bpe", byte_fallback=True,
                  normalization_rule_name="identity", remove_extra_whitespaces=False,
                  split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                  pad_id=-1, num_threads=1, minloglevel=2)
  settings.update(overrides)
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TRAIN_CORPUS), model_writer=writer,
                                 **settings)
  return writer.getvalue()


def _write(directory, name: str, content) -> None:
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, name)
  if isinstance(content, bytes):
    with open(path, "wb") as f:
      f.write(content)
  else:
    with open(path, "w", encoding="utf-8") as f:
      json.dump(content, f)


def _converted_llama(tmp, model_proto: bytes) -> Tokenizer:
  """The tokenizers Tokenizer transformers converts a SentencePiece model into."""
  _write(tmp, "tokenizer.model", model_proto)
  return transformers.AutoTokenizer.from_pretrained(str(tmp)).backend_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, str]:
  """Tokenizer directories by name, each as transformers saves it."""
  root = tmp_path_factory.mktemp("tokenizers")
  dirs = {}
  dirs["gpt2"] = _save(_gpt2_tokenizer(), root / "gpt2", bos_token="<|endoftext|>",
                       eos_token="<|endoftext|>", unk_token="<|endoftext|>")

  model_proto = _sentencepiece_model()
  # LLaMA 3 / recent conversions: Metaspace pre-tokenizer, bos from a template.
  llama = _converted_llama(root / "spm_source", model_proto)
  llama.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
  dirs["llama_metaspace"] = _save(llama, root / "llama_metaspace", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
  # LLaMA 2's tokenizer.json: a normaliser that prepends "▁" and replaces spaces, no
  # pre-tokenizer; bos and eos through add_bos_token / add_eos_token in the config.
  legacy = Tokenizer.from_str(llama.to_str())
  legacy.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                            normalizers.Replace(" ", "▁")])
  legacy.pre_tokenizer = None
  dirs["llama_legacy"] = _save(legacy, root / "llama_legacy", bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>")
  config_path = os.path.join(dirs["llama_legacy"], "tokenizer_config.json")
  with open(config_path, encoding="utf-8") as f:
    config = json.load(f)
  config.update(add_bos_token=True, add_eos_token=True)
  _write(dirs["llama_legacy"], "tokenizer_config.json", config)

  # A bare SentencePiece model, as older repositories hold it.
  dirs["sentencepiece"] = str(root / "sentencepiece")
  _write(dirs["sentencepiece"], "tokenizer.model", model_proto)
  dirs["sentencepiece_bos"] = str(root / "sentencepiece_bos")
  _write(dirs["sentencepiece_bos"], "tokenizer.model", model_proto)
  _write(dirs["sentencepiece_bos"], "tokenizer_config.json",
         {"add_bos_token": True, "tokenizer_class": "TokenizersBackend"})

  # BERT-like WordPiece, whose decoding transformers cleans up.
  wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
  wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  wordpiece.decoder = decoders.WordPiece()
  wordpiece.train_from_iterator(TRAIN_CORPUS, trainers.WordPieceTrainer(
      vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
      show_progress=False))
  wordpiece.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  dirs["wordpiece"] = _save(wordpiece, root / "wordpiece", unk_token="[UNK]", sep_token="[SEP]",
                            pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                            clean_up_tokenization_spaces=True)

  # What transformers fixes on loading: truncation and padding saved in tokenizer.json, a pad
  # token the file lacks (given in the legacy special_tokens_map.json), a split of special
  # tokens, and eos added through the config.
  quirky = _gpt2_tokenizer()
  quirky.enable_truncation(max_length=4)
  quirky.enable_padding(length=12, pad_id=0, pad_token="<|endoftext|>")
  quirky.add_tokens([AddedToken("<sep>", normalized=False)])
  dirs["quirky"] = str(root / "quirky")
  os.makedirs(dirs["quirky"])
  quirky.save(os.path.join(dirs["quirky"], "tokenizer.json"))
  _write(dirs["quirky"], "tokenizer_config.json",
         {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
          "add_eos_token": True})
  _write(dirs["quirky"], "special_tokens_map.json",
         {"pad_token": {"content": "<pad>", "lstrip": False, "rstrip": False,
                        "normalized": False, "single_word": False},
          "bos_token": "<|endoftext|>"})
  dirs["split_special"] = str(root / "split_special")
  os.makedirs(dirs["split_special"])
  _gpt2_tokenizer().save(os.path.join(dirs["split_special"], "tokenizer.json"))
  _write(dirs["split_special"], "tokenizer_config.json",
         {"eos_token": "<|endoftext|>", "split_special_tokens": True})

  dirs["clip"] = _clip_tokenizer(root / "clip")
  # A file whose pipeline is not CLIP's (no lower-casing, no split): transformers 5 rebuilds
  # CLIPTokenizer's own from the vocabulary and merges, and so must HFTokenizer.
  dirs["clip_other_pipeline"] = str(root / "clip_other_pipeline")
  other = Tokenizer.from_file(os.path.join(dirs["clip"], "tokenizer.json"))
  other.normalizer = None
  other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
  os.makedirs(dirs["clip_other_pipeline"])
  other.save(os.path.join(dirs["clip_other_pipeline"], "tokenizer.json"))
  _write(dirs["clip_other_pipeline"], "tokenizer_config.json",
         {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77})
  # SigLIP: a T5-like unigram model (pad 0, eos 1, unk 2), saved by SiglipTokenizer as
  # spiece.model (64 tokens, lower-cased).
  _write(root / "siglip_source", "spiece.model", _sentencepiece_model(
      vocab_size=75, model_type="unigram", byte_fallback=False, normalization_rule_name="nmt_nfkc",
      remove_extra_whitespaces=True, split_digits=False, pad_id=0, eos_id=1, unk_id=2,
      bos_id=-1))
  dirs["siglip"] = str(root / "siglip")
  transformers.SiglipTokenizer(vocab_file=str(root / "siglip_source" / "spiece.model")
                               ).save_pretrained(dirs["siglip"])
  return dirs


TOKENIZER_NAMES = ["gpt2", "llama_metaspace", "llama_legacy", "sentencepiece",
                   "sentencepiece_bos", "wordpiece", "quirky", "split_special", "clip",
                   "clip_other_pipeline", "siglip"]


@pytest.mark.parametrize("name", TOKENIZER_NAMES)
def test_ids_and_texts_match_transformers(tokenizer_dirs, name):
  directory = tokenizer_dirs[name]
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  tokenizer = HFTokenizer(directory)
  for text in TEXTS:
    ids = reference.encode(text)
    assert tokenizer.encode(text) == ids, text
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(
        text, add_special_tokens=False), text
    assert tokenizer.tokenize(text) == reference.encode(text, add_special_tokens=False), text
    for skip in (True, False):
      assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
          ids, skip_special_tokens=skip), (text, skip)
  assert tokenizer.vocab_size == len(reference)
  assert tokenizer.bos_id == reference.bos_token_id
  assert tokenizer.eos_id == reference.eos_token_id
  assert tokenizer.pad_id == reference.pad_token_id
  assert tokenizer.unk_id == reference.unk_token_id
  assert set(tokenizer.added_tokens) == set(reference.added_tokens_encoder)


@pytest.mark.parametrize("name", ["gpt2", "llama_metaspace", "llama_legacy", "sentencepiece"])
def test_decode_round_trips(tokenizer_dirs, name):
  tokenizer = HFTokenizer(tokenizer_dirs[name])
  for text in TEXTS:
    if "<" in text or "▁" in text:  # Special tokens' texts are dropped by
      continue  # skip_special_tokens; SentencePiece decodes its "▁" as a space.
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", ["clip", "clip_other_pipeline", "siglip", "llama_legacy",
                                  "wordpiece", "gpt2"])
def test_padded_batches_match_transformers(tokenizer_dirs, name):
  directory = tokenizer_dirs[name]
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  if reference.pad_token is None:
    reference.pad_token = reference.eos_token
  tokenizer = HFTokenizer(directory, pad_token=reference.pad_token)
  texts = TEXTS + LONG_TEXTS
  for max_len in ([None] if tokenizer.model_max_length else []) + [5, 16]:
    expected = reference(texts, padding="max_length", truncation=True,
                         max_length=max_len or reference.model_max_length)
    ids_nl, mask_nl = tokenizer.encode_padded(texts, max_len)
    assert ids_nl.dtype == mask_nl.dtype == np.int32
    for row, text in enumerate(texts):
      assert ids_nl[row].tolist() == expected["input_ids"][row], (text, max_len)
      assert mask_nl[row].tolist() == expected["attention_mask"][row], (text, max_len)


def test_clip_and_siglip_conventions(tokenizer_dirs):
  clip = HFTokenizer(tokenizer_dirs["clip"])
  assert clip.model_max_length == 77
  assert clip.pad_id == clip.eos_id == clip.token_id("<|endoftext|>")
  ids_nl, mask_nl = clip.encode_padded(["a photo of a cat", "", LONG_TEXTS[0]])
  assert ids_nl.shape == (3, 77)
  eot = eot_positions(mask_nl)
  # The end-of-text token is the last real one, also when the text was cut; padding repeats
  # its id, so only the mask tells where it is.
  assert (ids_nl[np.arange(3), eot] == clip.eos_id).all()
  assert eot[1] == 1 and eot[2] == 76 and ids_nl[0, 0] == clip.bos_id
  assert clip.encode("HELLO   World") == clip.encode("hello world")
  siglip = HFTokenizer(tokenizer_dirs["siglip"])
  assert siglip.model_max_length == 64
  assert siglip.pad_id == siglip.eos_id == 1
  assert siglip.encode("A photo, of a CAT!") == siglip.encode("a photo of a cat")
  ids_nl, mask_nl = siglip.encode_padded(["a cat", LONG_TEXTS[0]])
  assert ids_nl.shape == (2, 64) and ids_nl[1, -1] == siglip.eos_id and mask_nl[1].all()
  with pytest.raises(ValueError, match="max_len"):
    HFTokenizer(tokenizer_dirs["gpt2"], pad_token="<|endoftext|>").encode_padded(["a"])
  with pytest.raises(TypeError, match="sequence of strings"):
    clip.encode_padded("a cat")
  restored = pickle.loads(pickle.dumps(siglip))
  assert restored.encode_padded(["A cat."])[0].tolist() == siglip.encode_padded(["A cat."])[0].tolist()


def test_what_transformers_fixes_on_loading(tokenizer_dirs):
  tokenizer = HFTokenizer(tokenizer_dirs["quirky"])
  long_text = "a long text that the saved truncation would cut"
  # Neither truncated nor padded, and no eos: with a tokenizer.json, transformers 5 ignores
  # add_eos_token.
  assert tokenizer.encode(long_text) == tokenizer.tokenize(long_text)
  assert len(tokenizer.tokenize(long_text)) > 12
  assert tokenizer.pad_id == tokenizer.vocab_size - 1  # "<pad>" was added after the vocab.
  assert tokenizer.tokenize("x<pad>y")[1] == tokenizer.pad_id
  assert tokenizer.token_id("<sep>") in tokenizer.tokenize("x<sep>y")
  split = HFTokenizer(tokenizer_dirs["split_special"])
  assert split.eos_id not in split.tokenize("a<|endoftext|>b")


def test_generation_config_gives_missing_special_ids(tokenizer_dirs, tmp_path):
  directory = tmp_path / "tokenizer"
  os.makedirs(directory)
  _gpt2_tokenizer().save(str(directory / "tokenizer.json"))
  tokenizer = HFTokenizer(directory)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (None, None, None)
  _write(directory, "generation_config.json",
         {"bos_token_id": 0, "eos_token_id": [5, 6], "pad_token_id": 7})
  tokenizer = HFTokenizer(directory)
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 5, 7)
  # The tokenizer's own files come first.
  _write(directory, "tokenizer_config.json", {"eos_token": "<|endoftext|>"})
  assert HFTokenizer(directory).eos_id == 0


@pytest.mark.parametrize("name", ["llama_metaspace", "sentencepiece"])
def test_batch_interface_of_vljax_tokenizer(tokenizer_dirs, name):
  directory = tokenizer_dirs[name]
  with pytest.raises(ValueError, match="no pad token.*pad_token="):
    HFTokenizer(directory).encode(["a"], 8)
  tokenizer = HFTokenizer(directory, pad_token="<unk>")
  assert tokenizer.pad_id == tokenizer.unk_id
  texts = ["Hello world!", "", "a much longer text that is cut short by max_len"]
  ids_nl = tokenizer.encode(texts, 10, bos=True, eos=True)
  assert ids_nl.shape == (3, 10) and ids_nl.dtype == np.int32
  hello = tokenizer.tokenize("Hello world!")
  assert ids_nl[0].tolist() == ([tokenizer.bos_id] + hello + [tokenizer.eos_id]
                                + [tokenizer.pad_id] * (8 - len(hello)))
  assert ids_nl[1, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id]
  assert ids_nl[2, -1] == tokenizer.eos_id
  assert tokenizer.decode(ids_nl)[:2] == ["Hello world!", ""]
  assert tokenizer.encode(["Hello world!"], 10, eos=False)[0, :len(hello)].tolist() == hello
  with pytest.raises(TypeError, match="pass a list of texts"):
    tokenizer.encode("one text", 10)


@pytest.mark.parametrize("name", ["gpt2", "llama_legacy", "sentencepiece"])
def test_added_tokens_match_transformers(tokenizer_dirs, name):
  directory = tokenizer_dirs[name]
  reference = transformers.AutoTokenizer.from_pretrained(directory)
  reference.add_tokens(["<image>", "<box>", "Hello"], special_tokens=True)
  tokenizer = HFTokenizer(directory).with_added_tokens(["<image>", "<box>", "Hello", "<image>"])
  assert tokenizer.vocab_size == len(reference)
  for text in ["<image>a red circle<box>", "Hello<image> Hello", "<image>"]:
    ids = reference.encode(text)
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
  assert tokenizer.token_id("<image>") == reference.convert_tokens_to_ids("<image>")
  assert "<box>" in tokenizer.added_tokens
  # The views render added tokens and stop at eos.
  tokenizer = HFTokenizer(directory, pad_token=reference.unk_token or "<|endoftext|>")
  tokenizer = tokenizer.with_added_tokens(["<image>"])
  ids = [tokenizer.token_id("<image>")] + tokenizer.tokenize("a cat")
  batch = np.array([ids + [tokenizer.eos_id] + ids + [tokenizer.pad_id]])
  assert tokenizer.decode(batch) == [tokenizer.decode(ids, skip_special_tokens=False)]
  assert tokenizer.decode(batch)[0].startswith("<image>")
  assert tokenizer.decode(batch)[0].endswith("a cat")


@pytest.mark.parametrize("name", ["gpt2", "sentencepiece"])
def test_pickles(tokenizer_dirs, name):
  tokenizer = HFTokenizer(tokenizer_dirs[name]).with_added_tokens(["<image>"])
  restored = pickle.loads(pickle.dumps(tokenizer))
  for text in TEXTS + ["<image>x"]:
    assert restored.encode(text) == tokenizer.encode(text)
  assert restored.added_tokens == tokenizer.added_tokens
  assert (restored.bos_id, restored.eos_id, restored.vocab_size) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size)


def test_refusals(tmp_path):
  with pytest.raises(FileNotFoundError, match="No tokenizer directory"):
    HFTokenizer(tmp_path / "absent")
  with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor tokenizer.model"):
    HFTokenizer(tmp_path)
  _write(tmp_path, "tokenizer.json", b"{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    HFTokenizer(tmp_path)
  os.remove(tmp_path / "tokenizer.json")
  _write(tmp_path, "tokenizer.model", b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    HFTokenizer(tmp_path)
  _write(tmp_path, "tokenizer.model", _sentencepiece_model())
  _write(tmp_path, "tokenizer_config.json", b"[1, 2")
  with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
    HFTokenizer(tmp_path)
  _write(tmp_path, "tokenizer_config.json", {})
  with pytest.raises(KeyError, match="not a token"):
    HFTokenizer(tmp_path, pad_token="<no such token>")
  with pytest.raises(ValueError, match="has no pad token"):
    HFTokenizer(tmp_path).encode(["a"], 4)


def test_data_views_take_an_hf_tokenizer(tokenizer_dirs):
  tokenizer = HFTokenizer(tokenizer_dirs["llama_legacy"], pad_token="<unk>")
  tokenizer = tokenizer.with_added_tokens(vljax_tokenizer.VISION_TOKENS)
  image = np.zeros((8, 8, 3), np.uint8)
  caption = views.CaptionView(tokenizer, 16, image_size=8).map(
      {"image": image, "caption": "Hello world!"})
  expected = [tokenizer.bos_id] + tokenizer.tokenize("Hello world!") + [tokenizer.eos_id]
  assert caption["text"].tolist() == expected + [tokenizer.pad_id] * (16 - len(expected))
  assert caption["mask_loss"].sum() == len(expected) - 1
  chat = views.ChatView(tokenizer, 256, image_size=8).map({"image": image, "conversations": [
      {"from": "human", "value": "<image>\nHello?"}, {"from": "gpt", "value": "world!"}]})
  assert (chat["text"] == tokenizer.token_id("<image>")).sum() == 1
  assert tokenizer.decode(chat["text"][None])[0].endswith("world!")
