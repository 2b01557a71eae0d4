"""Grid-cell embeddings of image codes: the right cell for every code, zero start, every forward path agrees."""

from __future__ import annotations

import pytest
import torch

from mars.data.sequences import build_i2t, build_t2i, collate_i2t, collate_t2i
from mars.model.semvie import KVCache, SemVIE
from mars.train.losses import t2i_loss
from tests.conftest import random_tiny_model


def test_each_code_gets_its_cells_row_and_column_and_nothing_else_changes():
    model = random_tiny_model(3, image_grid_embed=True)
    vocab, G = model.vocab, model.config.image_grid
    codes = torch.arange(G * G) % vocab.image_size
    t2i = collate_t2i([build_t2i(vocab, [5, 6, 7], codes), build_t2i(vocab, [9], codes)], pad_id=0)
    i2t = collate_i2t([build_i2t(vocab, codes, [1, 2], [3, 4], 0)], pad_id=0)
    for ids in (t2i.input_ids, i2t.input_ids):
        term = model._grid_term(ids, torch.arange(ids.shape[1]), None)  # (B, T, C)
        for b in range(ids.shape[0]):
            boi = int((ids[b] == vocab.boi_id).nonzero())
            for t in range(ids.shape[1]):
                cell = t - boi - 1
                if 0 <= cell < G * G:
                    expected = model.grid_embed.rows[cell // G] + model.grid_embed.cols[cell % G]
                else:  # prompt, padding, <img>, </img>, caption
                    expected = torch.zeros(model.config.hidden_size)
                torch.testing.assert_close(term[b, t], expected)


def test_zero_grid_embeddings_compute_exactly_the_model_without_them():
    plain = random_tiny_model(4)
    grid = SemVIE(type(plain.config)(**{**plain.config.to_dict(), "image_grid_embed": True})).eval()
    grid.load_state_dict({**plain.state_dict(), **{k: torch.zeros_like(v) for k, v in grid.state_dict().items()
                                                    if k.startswith("grid_embed.")}})
    vocab = plain.vocab
    batch = collate_t2i([build_t2i(vocab, [5, 6, 7], torch.arange(16) * 3)], pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(grid(batch.input_ids, batch.image_mask), plain(batch.input_ids, batch.image_mask))


def test_prefix_cache_decode_and_full_forward_agree_with_grid_embeddings():
    model = random_tiny_model(5, image_grid_embed=True)
    vocab = model.vocab
    g = torch.Generator().manual_seed(5)
    seqs = [build_t2i(vocab, torch.randint(0, 256, (n,), generator=g).tolist(),
                      torch.randint(0, vocab.image_size, (model.config.image_tokens,), generator=g)) for n in (7, 3, 0)]
    batch = collate_t2i(seqs, pad_id=256)
    with torch.no_grad():
        cached, n = t2i_loss(model, batch, prefix_no_grad=True)  # prefix into a KV cache, then the image
        full, m = t2i_loss(model, batch, prefix_no_grad=False)
        assert n == m and float(cached) == pytest.approx(float(full), rel=1e-5)
        # token by token through a KVCache: the cache remembers <img> for the codes after it
        ids, T = batch.input_ids, batch.input_ids.shape[1]
        cache = KVCache(model.config, ids.shape[0], T, pad_lengths=batch.pad_lengths)
        P = batch.prefix_len
        steps = [model.forward_hidden(ids[:, :P + 1], model.image_mask(ids[:, :P + 1]), torch.arange(P + 1), cache)]
        for t in range(P + 1, T):
            steps.append(model.forward_hidden(ids[:, t:t + 1], True, torch.tensor([t]), cache))
        stepwise = torch.cat(steps, dim=1)
        whole = model.forward_hidden(ids, model.image_mask(ids), pad_lengths=batch.pad_lengths)
    torch.testing.assert_close(stepwise[:, P:], whole[:, P:], atol=1e-4, rtol=1e-4)
