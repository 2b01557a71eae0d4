import json

import pytest

from mars.errors import MarsError
from mars.text_tokenizer import ByteTokenizer, QwenTokenizer, load_text_tokenizer


def test_qwen_tokenizer_matches_published_ids():
    tok = load_text_tokenizer("qwen")
    assert isinstance(tok, QwenTokenizer)
    assert tok.encode("杭州是个好地方") == [104130, 104104, 52801, 100371]
    assert tok.eos_id == 151643
    assert tok.decode(tok.encode("a red circle 和一个蓝色的正方形")) == "a red circle 和一个蓝色的正方形"


def test_qwen_special_strings_in_user_text_stay_text():
    tok = load_text_tokenizer("qwen")
    ids = tok.encode("<|endoftext|>")
    assert tok.eos_id not in ids and len(ids) > 1


def test_byte_tokenizer_round_trip_chinese():
    tok = ByteTokenizer()
    text = "一个红色的圆形 and a star"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.eos_id < tok.vocab_size


def test_hf_tokenizer_json_and_save_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<unk>"])
    hf.train_from_iterator(["a red circle", "a blue square", "一个红色的圆形"] * 20, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = load_text_tokenizer(tmp_path)
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    ids = tok.encode("a red square")
    assert tok.decode(ids + [tok.eos_id]) == "a red square"
    saved = tmp_path / "saved"
    tok.save(saved)
    assert json.loads((saved / "mars_tokenizer.json").read_text())["kind"] == "hf"
    assert load_text_tokenizer(saved).encode("a red square") == ids


def test_saved_builtin_kinds_reload(tmp_path):
    for kind in ("qwen", "bytes"):
        load_text_tokenizer(kind).save(tmp_path / kind)
        assert load_text_tokenizer(tmp_path / kind).kind == kind


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(MarsError, match="no text tokenizer found"):
        load_text_tokenizer(tmp_path / "nothing")


def test_trained_bpe_tokenizer_is_bilingual_and_reloads(tmp_path):
    from mars.text_tokenizer import train_bpe_tokenizer

    corpus = ["a red circle to the left of a blue square", "一个红色的圆形在一个蓝色的正方形的左边"] * 50
    tok = train_bpe_tokenizer(corpus, vocab_size=400, directory=tmp_path)
    assert tok.eos_id == 0 and tok.vocab_size <= 400
    for text in ("a red circle", "一个蓝色的正方形", "an unseen word: zebra 斑马"):
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("a red circle to the left of a blue square")) < 12  # merges were learned
    assert load_text_tokenizer(tmp_path).encode("a red circle") == tok.encode("a red circle")
