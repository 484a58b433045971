"""Tests of the SentencePiece wrapper and the cached, deterministically trained shapes tokenizer."""
import os
import pickle

import numpy as np
import pytest

from vljax.data import captions, shapes, tokenizer


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
  return tokenizer.shapes_tokenizer(cache_dir=str(tmp_path_factory.mktemp("tokenizer_cache")),
                                    added_tokens=tokenizer.VISION_TOKENS)


def _scene_captions(num_scenes):
  texts = []
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split, seed=5)
    for index in range(num_scenes):
      texts.extend(captions.captions(world.scene(index)))
  return texts


def test_captions_round_trip_and_fit_in_32_tokens(shapes_tok):
  texts = _scene_captions(150)
  ids = shapes_tok.encode(texts, max_len=48)
  assert ids.dtype == np.int32 and ids.shape == (len(texts), 48)
  assert shapes_tok.decode(ids) == texts
  lengths = (ids != shapes_tok.pad_id).sum(axis=1)
  assert lengths.max() <= 32  # eos included
  prompts = [t.format(name) for t in captions.ZEROSHOT_TEMPLATES for name in captions.class_names()]
  assert shapes_tok.decode(shapes_tok.encode(prompts, max_len=16)) == prompts


def test_corpus_encodes_without_unk_and_words_are_single_tokens(shapes_tok):
  corpus = captions.text_corpus()
  ids = shapes_tok.encode(corpus, max_len=96)
  assert not (ids == shapes_tok.unk_id).any()
  words = tokenizer.corpus_words(corpus)
  for word in ("circle", "cross", "purple", "bottom", "objects", "nine"):
    assert word in words
  assert all(row[1] == shapes_tok.eos_id for row in shapes_tok.encode(words, max_len=3))
  assert (shapes_tok.pad_id, shapes_tok.unk_id, shapes_tok.bos_id, shapes_tok.eos_id) == (
      0, 1, 2, 3)
  assert shapes_tok.vocab_size < 256


def test_padding_bos_and_truncation_keep_eos(shapes_tok):
  text = "a large red circle at the top left and a small blue star in the center."
  full = shapes_tok.encode([text], max_len=40, bos=True)[0]
  num_tokens = int((full != shapes_tok.pad_id).sum())
  assert full[0] == shapes_tok.bos_id and full[num_tokens - 1] == shapes_tok.eos_id
  assert (full[num_tokens:] == shapes_tok.pad_id).all()
  truncated = shapes_tok.encode([text], max_len=6, bos=True)[0]
  np.testing.assert_array_equal(truncated[:5], full[:5])
  assert truncated[-1] == shapes_tok.eos_id
  no_eos = shapes_tok.encode([text], max_len=6, eos=False)[0]
  np.testing.assert_array_equal(no_eos, full[1:7])
  with pytest.raises(TypeError):
    shapes_tok.encode(text, max_len=8)


def test_decode_stops_at_eos_and_skips_pad_and_bos(shapes_tok):
  (a, b, c), = shapes_tok.encode(["red circle star"], max_len=3, eos=False).tolist()
  pad, bos, eos = shapes_tok.pad_id, shapes_tok.bos_id, shapes_tok.eos_id
  rows = np.array([[bos, a, b, eos, c, pad], [a, pad, c, pad, pad, pad]])
  assert shapes_tok.decode(rows) == ["red circle", "red star"]


def test_tokenizer_pickles(shapes_tok):
  restored = pickle.loads(pickle.dumps(shapes_tok))
  texts = _scene_captions(3)
  np.testing.assert_array_equal(restored.encode(texts, 40), shapes_tok.encode(texts, 40))
  assert restored.vocab_size == shapes_tok.vocab_size


def test_cache_is_reused_rebuilt_when_missing_or_corrupt(shapes_tok, tmp_path, monkeypatch):
  train_calls = []
  real_train = tokenizer._train_model_proto

  def counting_train(*args, **kwargs):
    train_calls.append(args[1])
    return real_train(*args, **kwargs)

  monkeypatch.setattr(tokenizer, "_train_model_proto", counting_train)
  monkeypatch.setenv("VLJAX_CACHE", str(tmp_path))
  first = tokenizer.shapes_tokenizer()
  (model_file,) = [p for p in tmp_path.iterdir() if p.suffix == ".model"]
  assert train_calls and first.model_proto == model_file.read_bytes()
  assert first.model_proto == shapes_tok.model_proto  # Deterministic across cache dirs.

  num_calls = len(train_calls)
  assert tokenizer.shapes_tokenizer().model_proto == first.model_proto
  assert len(train_calls) == num_calls

  for damage in ("delete", "garbage", "truncate"):
    if damage == "delete":
      model_file.unlink()
    elif damage == "garbage":
      model_file.write_bytes(b"not a sentencepiece model" * 10)
    else:
      model_file.write_bytes(first.model_proto[: len(first.model_proto) // 2])
    num_calls = len(train_calls)
    assert tokenizer.shapes_tokenizer().model_proto == first.model_proto
    assert len(train_calls) > num_calls, damage
    assert model_file.read_bytes() == first.model_proto
  assert sorted(os.listdir(tmp_path)) == [model_file.name]  # No temp files left behind.


def test_explicit_vocab_size(tmp_path):
  tok = tokenizer.shapes_tokenizer(vocab_size=64, cache_dir=str(tmp_path),
                                   added_tokens=tokenizer.VISION_TOKENS)
  assert tok.vocab_size == 64 + len(tokenizer.VISION_TOKENS)  # the added tokens come after
  assert tokenizer.shapes_tokenizer(vocab_size=64, cache_dir=str(tmp_path)).vocab_size == 64
  text = ["a small cyan diamond at the bottom right."]
  assert tok.decode(tok.encode(text, max_len=64)) == text
  with pytest.raises(ValueError, match="vocab_size=100000"):
    tokenizer.shapes_tokenizer(vocab_size=100_000, cache_dir=str(tmp_path))


def test_from_file_loads_models_and_names_bad_paths(shapes_tok, tmp_path):
  path = tmp_path / "good.model"
  path.write_bytes(shapes_tok.model_proto)
  loaded = tokenizer.Tokenizer.from_file(path)
  texts = _scene_captions(2)
  np.testing.assert_array_equal(loaded.encode(texts, 40), shapes_tok.encode(texts, 40))
  missing = tmp_path / "missing.model"
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizer.Tokenizer.from_file(missing)
  corrupt = tmp_path / "corrupt.model"
  corrupt.write_bytes(b"\x00\x01garbage")
  with pytest.raises(ValueError, match="corrupt.model"):
    tokenizer.Tokenizer.from_file(corrupt)
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="empty.model"):
    tokenizer.Tokenizer.from_file(empty)


def test_added_tokens_come_after_the_vocabulary_and_keep_every_id(shapes_tok):
  bare = tokenizer.Tokenizer(shapes_tok.model_proto)
  assert shapes_tok.added_tokens == tokenizer.VISION_TOKENS and bare.added_tokens == ()
  num_pieces = bare.vocab_size
  assert shapes_tok.vocab_size == num_pieces + len(tokenizer.VISION_TOKENS)
  assert [shapes_tok.token_id(t) for t in tokenizer.VISION_TOKENS] == list(
      range(num_pieces, shapes_tok.vocab_size))
  texts = _scene_captions(5) + ["<image> a red circle"]  # encode() reads text as plain text
  for bos in (False, True):
    np.testing.assert_array_equal(shapes_tok.encode(texts, 40, bos=bos),
                                  bare.encode(texts, 40, bos=bos))
  assert shapes_tok.decode(bare.encode(texts, 40)) == bare.decode(bare.encode(texts, 40))
  assert shapes_tok.token_id("</s>") == shapes_tok.eos_id  # pieces are found by their text too
  with pytest.raises(KeyError, match="<image>"):
    bare.token_id("<image>")


def test_tokenize_and_decode_added_tokens(shapes_tok):
  image, end = shapes_tok.token_id("<image>"), shapes_tok.token_id("<|endofchunk|>")
  red_circle = shapes_tok.tokenize("a red circle")
  assert red_circle == shapes_tok.encode(["a red circle"], 8, eos=False)[0][:3].tolist()
  ids = shapes_tok.tokenize("<image>a red circle<|endofchunk|><image> a red circle")
  assert ids == [image] + red_circle + [end, image] + red_circle
  pad, bos, eos = shapes_tok.pad_id, shapes_tok.bos_id, shapes_tok.eos_id
  rows = [[bos, image] + red_circle + [end, pad, eos, image], [image, pad, end, pad] + [pad] * 5]
  assert shapes_tok.decode(np.array(rows)) == ["<image>a red circle<|endofchunk|>",
                                               "<image><|endofchunk|>"]
  assert shapes_tok.tokenize("") == [] and shapes_tok.decode([[]]) == [""]
  with pytest.raises(TypeError):
    shapes_tok.tokenize(["a red circle"])


def test_added_tokens_pickle_and_extend(shapes_tok):
  restored = pickle.loads(pickle.dumps(shapes_tok))
  assert restored.added_tokens == shapes_tok.added_tokens
  assert restored.vocab_size == shapes_tok.vocab_size
  text = "<ref>a red circle</ref><box>"
  assert restored.tokenize(text) == shapes_tok.tokenize(text)
  bare = tokenizer.Tokenizer(shapes_tok.model_proto)
  extended = bare.with_added_tokens(["<image>", "<extra>"]).with_added_tokens(["<extra>", "<b>"])
  assert extended.added_tokens == ("<image>", "<extra>", "<b>")
  assert extended.token_id("<b>") == bare.vocab_size + 2 == extended.vocab_size - 1
  # A token that already is a piece keeps that piece's id and does not grow the vocabulary.
  with_piece = bare.with_added_tokens(["red", "<x>"])
  assert with_piece.token_id("red") == bare.token_id("red")
  assert with_piece.tokenize("red") == [bare.token_id("red")]
  assert with_piece.vocab_size == bare.vocab_size + 1
  for bad, error in (((("<a>", "<a>")), ValueError), (("",), TypeError), ("<a>", TypeError)):
    with pytest.raises(error):
      tokenizer.Tokenizer(shapes_tok.model_proto, added_tokens=bad)


def test_train_tokenizer_covers_its_corpus():
  corpus = ["question: how many objects? answer: 2", "(0,1,2,3,4,5,6,7,8,9)"]
  tok = tokenizer.train_tokenizer(corpus)
  text = "<box>(250,907),(13,999)</box>"
  ids = tok.tokenize(text)
  assert tok.unk_id not in ids and tok.decode([ids]) == [text]
  with pytest.raises(ValueError, match="vocab_size=5"):
    tokenizer.train_tokenizer(corpus, vocab_size=5)
