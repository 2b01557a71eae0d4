"""`CPUImageStep` against the model's own cached image step (`mars.generate.image_step`)."""

import copy

import pytest
import torch

import mars.generate
import mars.model.cpu_decode
from mars.generate import (
    SampleConfig,
    cache_rows,
    cache_window,
    generate_image_tokens,
    image_rows,
    image_step,
    make_generators,
    prefill,
)
from mars.model.cpu_decode import CPUImageStep
from mars.text_tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = ["a red circle", "一个蓝色的正方形在左边"]  # two lengths: the rows are padded differently


def with_random_norms(model):
    """Random RMS-norm scales, so that folding them into the products is tested (they start at 1)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model


@torch.no_grad()
@pytest.mark.parametrize("weight_first", [False, True])
@pytest.mark.parametrize("overrides", [
    {"image_positions": "1d"},
    {"image_positions": "2d"},
    {"image_positions": "2d", "blend": 0.4},  # a trainer ramping 1-D into 2-D positions
    {"num_kv_heads": 4, "qkv_bias": False, "tie_word_embeddings": True},  # no GQA, no bias, tied head
])
def test_steps_give_the_models_logits_and_cache(tiny_builders, monkeypatch, overrides, weight_first):
    overrides = dict(overrides)
    blend = overrides.pop("blend", 1.0)
    model = with_random_norms(tiny_builders.model(**overrides))
    model.image_position_blend = blend
    monkeypatch.setattr(mars.model.cpu_decode, "WEIGHT_FIRST_ROWS", 64 if weight_first else 0)
    rows = image_rows(model, [TOK.encode(p) for p in PROMPTS], guided=True)  # 2 prompts + 2 null rows
    cache, _, slot = prefill(model, rows, 12)
    own_cache = copy.deepcopy(cache)
    step = CPUImageStep(model, own_cache, slot)
    layouts = set()
    linear = mars.model.cpu_decode.linear
    monkeypatch.setattr(mars.model.cpu_decode, "linear", lambda *a: layouts.add(a[-1]) or linear(*a))
    positions = torch.arange(slot, cache.max_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.image_vocab_size, (len(rows), 1), generator=gen) + model.vocab.image_offset
    for t in range(1, 10):
        expected = image_step(model, ids, positions[t - 1 : t], cache_window(cache, slot + t), 1.0)  # (R, K)
        got = step(ids, t)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        ids = torch.multinomial(expected.softmax(-1), 1, generator=gen) + model.vocab.image_offset
    for ours, theirs in zip(own_cache.k + own_cache.v, cache.k + cache.v):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert layouts == {weight_first}


@torch.no_grad()
@pytest.mark.parametrize("image_positions", ["1d", "2d"])
@pytest.mark.parametrize("weight_first", [False, True])
def test_a_window_of_codes_gives_the_models_logits_for_each(tiny_builders, monkeypatch, image_positions, weight_first):
    """Codes fed T at a time (speculative Jacobi decoding's drafts) see the codes before them only."""
    model = with_random_norms(tiny_builders.model(image_positions=image_positions))
    monkeypatch.setattr(mars.model.cpu_decode, "WEIGHT_FIRST_ROWS", 64 if weight_first else 0)
    rows = image_rows(model, [TOK.encode(p) for p in PROMPTS], guided=True)
    cache, _, slot = prefill(model, rows, 12)
    own_cache = copy.deepcopy(cache)
    step = CPUImageStep(model, own_cache, slot)
    gen = torch.Generator().manual_seed(1)
    t = 1
    for width in (3, 1, 4):  # codes t .. t + width - 1, fed together
        ids = torch.randint(0, model.config.image_vocab_size, (len(rows), width), generator=gen) + model.vocab.image_offset
        positions = torch.arange(slot + t - 1, slot + t - 1 + width)
        hidden = model.forward_hidden(ids, True, positions, cache)  # (R, T, C)
        expected = model.logits(hidden, rows=model.vocab.image_ids).float()  # (R, T, K)
        torch.testing.assert_close(step.window(ids, t), expected, atol=1e-4, rtol=1e-4)
        t += width
    for ours, theirs in zip(own_cache.k + own_cache.v, cache.k + cache.v):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("image_positions", ["1d", "2d"])
def test_rows_at_different_codes_each_get_the_models_logits(tiny_builders, image_positions):
    """A window with one first code per row (images of a batch that accepted different numbers of
    drafts): each row as the model's forward of that row alone at its own slots."""
    model = with_random_norms(tiny_builders.model(image_positions=image_positions))
    rows = image_rows(model, [TOK.encode(p) for p in PROMPTS], guided=True)
    cache, _, slot = prefill(model, rows, 12)
    own_cache = copy.deepcopy(cache)
    step = CPUImageStep(model, own_cache, slot)
    gen = torch.Generator().manual_seed(2)
    for firsts, width in (([1, 4, 2, 6], 3), ([4, 5, 2, 9], 2)):
        t = torch.tensor(firsts)
        ids = torch.randint(0, model.config.image_vocab_size, (len(rows), width), generator=gen) + model.vocab.image_offset
        got = step.window(ids, t)  # (R, T, K)
        for r, first in enumerate(firsts):
            positions = torch.arange(slot + first - 1, slot + first - 1 + width)
            hidden = model.forward_hidden(ids[r : r + 1], True, positions, cache_rows(cache, slice(r, r + 1)))
            expected = model.logits(hidden, rows=model.vocab.image_ids).float()[0]
            torch.testing.assert_close(got[r], expected, atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(own_cache.k + own_cache.v, cache.k + cache.v):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_positions", ["1d", "2d"])
def test_generation_on_the_cpu_draws_what_the_models_step_draws(tiny_builders, monkeypatch, image_positions):
    model = with_random_norms(tiny_builders.model(image_positions=image_positions))
    prompts = [TOK.encode(p) for p in PROMPTS]
    settings = SampleConfig(cfg_scale=2.0, top_k=8)
    n = model.config.image_tokens

    def draw():
        return generate_image_tokens(model, prompts, make_generators([3, 4]), n, settings, return_logits=True)

    built = []
    monkeypatch.setattr(mars.generate, "CPUImageStep", lambda *a: built.append(1) or CPUImageStep(*a))
    codes, logits = draw()
    assert built  # the CPU step ran
    monkeypatch.setattr(mars.generate, "uses_cpu_step", lambda model, cache: False)
    model_codes, model_logits = draw()
    assert torch.equal(codes, model_codes)
    torch.testing.assert_close(logits, model_logits, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_only_fp32_cpu_decoding_uses_it(tiny_builders):
    model = tiny_builders.model()
    cache, _, _ = prefill(model, [TOK.encode("a")], 4)
    assert mars.model.cpu_decode.uses_cpu_step(model, cache)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not mars.model.cpu_decode.uses_cpu_step(half, prefill(half, [TOK.encode("a")], 4)[0])
