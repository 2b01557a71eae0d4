"""Shared fixtures: a tiny random MARS model, in memory and as a complete model folder.

`tiny_model_dir` is a folder laid out like a real model (mars/model_dir.py): config.json +
model.safetensors (the `debug` preset: byte-level text, 64 px images = 4 x 4 codes of 256), a
`tokenizer/` (bytes) and a `vq/` (a tiny random VQ-GAN with the same codebook size and f16).
Build it once per session; copy it before changing anything in it. `tiny_builders` hands out the
functions that build them (tests run in importlib mode and cannot import this file).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mars.config import SemVIEConfig
from mars.model.semvie import SemVIE
from mars.text_tokenizer import ByteTokenizer
from mars.vq import VQConfig, VQModel

# Tiny models gain nothing from intra-op threads, and on a busy shared machine OpenMP workers
# spinning for a core make each small matmul ~20x slower: run the test process on one thread.
torch.set_num_threads(1)

TINY_VQ = dict(ch=8, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(), z_channels=8,
               norm_groups=4, codebook_size=256, codebook_embed_dim=4)


def random_tiny_model(seed: int = 0, **overrides) -> SemVIE:
    """A `debug` SemVIE whose visual side and new vocabulary rows are random.

    The MARS initialisation copies the language expert and gives every image code the same
    embedding and head row, so every code would get the same logit; the noise added here makes
    image logits spread (std ~1.5), so greedy and sampled decoding have something to choose.
    """
    torch.manual_seed(seed)
    model = SemVIE(SemVIEConfig.from_name("debug", **overrides))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".visual." in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            elif name.endswith("new_weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def random_tiny_vq(seed: int = 0, codebook_size: int = 256) -> VQModel:
    torch.manual_seed(seed)
    return VQModel(VQConfig(**{**TINY_VQ, "codebook_size": codebook_size})).eval()


def write_model_dir(directory: Path, model: SemVIE, vq: VQModel) -> Path:
    """A complete model folder: weights + config, tokenizer/ (bytes), vq/."""
    model.save_pretrained(directory)
    ByteTokenizer().save(directory / "tokenizer")
    vq.save_pretrained(directory / "vq")
    return directory


@pytest.fixture
def tiny_model() -> SemVIE:
    """A fresh tiny random model (CPU, fp32, eval mode); free to modify."""
    return random_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A complete tiny model folder (read-only by convention: copy it before changing it)."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-model"), random_tiny_model(), random_tiny_vq())


@pytest.fixture
def drawn_batches(monkeypatch) -> list[int]:
    """The number of images in each batch the pipeline draws (`generate_image_tokens` calls,
    candidates included), appended as they are drawn."""
    import mars.pipeline

    batches = []
    draw = mars.pipeline.generate_image_tokens

    def recorded(model, prompts, *args, **kwargs):
        batches.append(len(prompts))
        return draw(model, prompts, *args, **kwargs)

    monkeypatch.setattr(mars.pipeline, "generate_image_tokens", recorded)
    return batches


@pytest.fixture(scope="session")
def tiny_builders() -> SimpleNamespace:
    """`.model(seed, **config_overrides)`, `.vq(seed, codebook_size)`, `.write_dir(path, model, vq)`."""
    return SimpleNamespace(model=random_tiny_model, vq=random_tiny_vq, write_dir=write_model_dir)


@pytest.fixture
def edit_recorder(monkeypatch) -> list[tuple]:
    """Replaces the caption edits (`mars.rerank.refine_caption`, as the pipeline calls it) with a
    stand-in that records (codes, instruction ids, caption text, rounds) and returns the caption
    "edited R" for R rounds, so a test can see a `refine` setting reach the search: the tiny random
    model's captions are not whole text, which the real search keeps unchanged."""
    import mars.pipeline

    calls: list[tuple] = []

    def stand_in(model, tokenizer, codes, instruction, caption, rounds):
        calls.append((codes, instruction, tokenizer.decode(caption).strip(), rounds))
        return tokenizer.encode(f" edited {rounds}")

    monkeypatch.setattr(mars.pipeline, "refine_caption", stand_in)
    return calls
