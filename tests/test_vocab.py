import pytest
import torch

from mars.config import SemVIEConfig
from mars.errors import MarsError
from mars.vocab import MultimodalVocab


def test_qwen_7b_layout():
    vocab = MultimodalVocab.from_config(SemVIEConfig.from_name("qwen-7b"))
    assert vocab.size == 160136
    assert (vocab.image_offset, vocab.special_offset) == (151936, 160128)
    assert (vocab.boi_id, vocab.eoi_id) == (160128, 160129)
    assert vocab.special_name(160128) == "<img>" and vocab.special_name(160129) == "</img>"
    assert vocab.special_name(160135) == "<reserved_5>"
    assert vocab.image_ids == slice(151936, 160128)


def test_code_id_round_trip_and_masks():
    vocab = MultimodalVocab(text_size=100, image_size=16, num_special=8)
    codes = torch.arange(16).view(4, 4)
    ids = vocab.codes_to_ids(codes)
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    assert vocab.is_image_code(ids).all() and vocab.is_visual(ids).all() and not vocab.is_text(ids).any()
    specials = torch.tensor([vocab.boi_id, vocab.eoi_id])
    assert vocab.is_visual(specials).all() and not vocab.is_image_code(specials).any()
    text = torch.tensor([0, 99])
    assert vocab.is_text(text).all() and not vocab.is_visual(text).any()
    with pytest.raises(MarsError):
        vocab.codes_to_ids(torch.tensor([16]))
    with pytest.raises(MarsError):
        vocab.ids_to_codes(torch.tensor([5]))


def test_new_rows_start_at_the_mean_of_text_rows():
    vocab = MultimodalVocab(text_size=10, image_size=4, num_special=2)
    text_rows = torch.randn(10, 3)
    new = vocab.new_rows_init(text_rows)
    assert new.shape == (6, 3)
    assert torch.allclose(new, text_rows.mean(0).expand(6, 3))
