import pytest
import torch

from mars.vq.config import VQConfig
from mars.vq.model import VQModel


def tiny_config(**overrides) -> VQConfig:
    """An f4 tokenizer small enough for CPU unit tests (taming layout, attention at 8x8)."""
    fields = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=32,
                  z_channels=16, norm_groups=8, codebook_size=32, codebook_embed_dim=4, codebook_l2_norm=True)
    fields.update(overrides)
    return VQConfig(**fields)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> VQModel:
    torch.manual_seed(0)
    return VQModel(tiny_config()).eval()
