"""Sampling filters and the decoding engine, against brute-force references and invariants."""

import numpy as np
import pytest
import torch

from mars.errors import MarsError
from mars.generate import (
    SampleConfig,
    caption_prefix,
    generate_image_and_text,
    generate_image_tokens,
    generate_text,
    guide_text,
    make_generators,
    prefill,
    sample,
    top_k_filter,
    top_p_filter,
)
from mars.text_tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = ["a red circle", "一个蓝色的正方形在左边", "x"]  # mixed lengths, English and Chinese


def encode(prompts):
    return [TOK.encode(p) for p in prompts]


@pytest.fixture(params=["1d", "2d"])
def tiny_model(request, tiny_builders):
    """Every decoding test runs with 1-D and with 2-D image positions (`image_positions`)."""
    return tiny_builders.model(image_positions=request.param)


# --- reference implementations (plain numpy / full forward passes) -----------------------------


def ref_top_k(row: np.ndarray, k: int) -> np.ndarray:
    keep = np.argsort(-row)[:k]
    out = np.full_like(row, -np.inf)
    out[keep] = row[keep]
    return out


def ref_top_p(row: np.ndarray, p: float) -> np.ndarray:
    """Sort by probability, keep tokens until the cumulative probability reaches p."""
    probs = np.exp(row - row[np.isfinite(row)].max())
    probs = probs / probs.sum()
    out = np.full_like(row, -np.inf)
    total = 0.0
    for i in np.argsort(-probs):
        out[i] = row[i]
        total += probs[i]
        if total >= p:
            break
    return out


def full_image_logits(model, ids):
    """Logits of the image rows after the last token of a single unpadded sequence (list of ids)."""
    x = torch.tensor([ids])
    return model(x, model.image_mask(x))[0, -1, model.vocab.image_ids].float()


# --- filters and sampling ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 17])
def test_top_k_filter_matches_reference_and_is_pure(k):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(k))
    before = logits.clone()
    out = top_k_filter(logits, k)
    assert torch.equal(logits, before)
    for row, got in zip(logits.numpy(), out.numpy()):
        np.testing.assert_array_equal(got, ref_top_k(row, k))
    assert top_k_filter(logits, 0) is logits and torch.equal(top_k_filter(logits, 50), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.75, 0.95])
def test_top_p_filter_matches_reference_and_is_pure(p):
    logits = 2 * torch.randn(6, 40, generator=torch.Generator().manual_seed(int(p * 100)))
    before = logits.clone()
    out = top_p_filter(logits, p)
    assert torch.equal(logits, before)
    for row, got in zip(logits.numpy().astype(np.float64), out.numpy()):
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref_top_p(row, p)))
        np.testing.assert_allclose(got[np.isfinite(got)], row[np.isfinite(got)], rtol=1e-6)


def test_sample_draws_from_topk_temperature_topp_distribution():
    """Empirical frequencies match the reference distribution filtered in the DESIGN order."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    k, temperature, p = 6, 2.0, 0.7
    ref = ref_top_p(ref_top_k(logits.double().numpy(), k) / temperature, p)
    ref_probs = np.exp(ref - ref[np.isfinite(ref)].max())
    ref_probs /= ref_probs.sum()
    n = 20000
    torch.manual_seed(0)
    draws = sample(logits.expand(n, -1), temperature, k, p, generators=None)
    freq = np.bincount(draws.numpy(), minlength=8) / n
    np.testing.assert_allclose(freq, ref_probs, atol=0.015)
    assert freq[ref_probs == 0].sum() == 0
    # applying temperature after top-p would keep a different set of tokens
    assert np.isfinite(ref_top_p(ref_top_k(logits.double().numpy(), k), p)).sum() < np.isfinite(ref).sum()


def test_top_k_one_and_temperature_zero_are_greedy():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(-1)
    assert torch.equal(sample(logits, 0.0), greedy)
    assert torch.equal(sample(logits, 1.3, top_k=1, generators=make_generators(range(5))), greedy)


def test_each_row_uses_its_own_generator():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))
    batch = sample(logits, 1.0, generators=make_generators([10, 11, 12, 13]))
    alone = [int(sample(logits[i : i + 1], 1.0, generators=make_generators([10 + i]))) for i in range(4)]
    assert batch.tolist() == alone


def test_top_k_draws_stay_among_the_k_candidates_and_rows_are_independent():
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3))
    allowed = torch.topk(logits, 5, dim=-1).indices
    draws = torch.stack([sample(logits, 1.5, top_k=5, top_p=0.9, generators=make_generators(range(6 * r, 6 * r + 6)))
                         for r in range(50)])  # (50, 6)
    assert all(bool(torch.isin(draws[:, b], allowed[b]).all()) for b in range(6))
    assert all(len(set(draws[:, b].tolist())) > 1 for b in range(6))  # sampled, not greedy
    alone = [int(sample(logits[b : b + 1], 1.5, top_k=5, top_p=0.9, generators=make_generators([b]))) for b in range(6)]
    assert draws[0].tolist() == alone


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(cfg_scale=-1.0), dict(temperature=float("nan"))])
def test_bad_settings_raise(bad):
    with pytest.raises(MarsError):
        SampleConfig(**bad)


# --- text-to-image decoding -------------------------------------------------------------------


def test_cached_equals_uncached(tiny_model):
    prompts = encode(PROMPTS)
    settings = SampleConfig(temperature=0.0, cfg_scale=3.0)
    n = tiny_model.config.image_tokens
    cached, cached_logits = generate_image_tokens(tiny_model, prompts, None, n, settings, return_logits=True)
    plain, plain_logits = generate_image_tokens(tiny_model, prompts, None, n, settings, use_cache=False,
                                                return_logits=True)
    assert torch.equal(cached, plain)
    torch.testing.assert_close(cached_logits, plain_logits, atol=1e-4, rtol=1e-4)
    assert len(set(cached.flatten().tolist())) > 3  # a real sequence, not one repeated code


def test_guidance_combines_independent_cond_and_uncond_passes(tiny_model):
    prompts = encode(PROMPTS[:2])
    scale = 2.5
    codes, logits = generate_image_tokens(tiny_model, prompts, make_generators([0, 1]), 6,
                                          SampleConfig(cfg_scale=scale), return_logits=True)
    vocab = tiny_model.vocab
    for b, prompt in enumerate(prompts):
        ids = vocab.codes_to_ids(codes[b]).tolist()
        for t in range(6):
            cond = full_image_logits(tiny_model, prompt + [vocab.boi_id] + ids[:t])
            uncond = full_image_logits(tiny_model, [vocab.boi_id] + ids[:t])
            torch.testing.assert_close(logits[b, t], uncond + scale * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_cfg_scale_one_equals_unguided_sampling(tiny_model):
    """cfg_scale 1 runs no unconditional rows and samples exactly the conditional model."""
    prompts = encode(PROMPTS)
    settings = SampleConfig(temperature=1.0, top_k=40, top_p=0.9, cfg_scale=1.0)
    codes = generate_image_tokens(tiny_model, prompts, make_generators([5, 6, 7]), 10, settings)
    vocab = tiny_model.vocab
    for b, prompt in enumerate(prompts):
        gen = make_generators([5 + b])
        ids = prompt + [vocab.boi_id]
        for t in range(10):
            code = int(sample(full_image_logits(tiny_model, ids)[None], 1.0, 40, 0.9, gen))
            assert code == int(codes[b, t])
            ids.append(code + vocab.image_offset)


def test_image_mode_never_emits_a_non_image_id(tiny_model):
    vocab = tiny_model.vocab
    with torch.no_grad():  # a head that strongly prefers text rows and the specials
        head = tiny_model.lm_head
        head.text_weight.copy_(torch.randn(head.text_weight.shape, generator=torch.Generator().manual_seed(0)) * 3)
        head.new_weight[vocab.image_size:] = head.text_weight[:vocab.num_special] * 2
    prompt = encode(["a red circle"])
    x = torch.tensor([prompt[0] + [vocab.boi_id]])
    full = tiny_model(x, tiny_model.image_mask(x))[0, -1]
    assert not vocab.is_image_code(full.argmax())  # the bias works: the full head would leave the image
    codes = generate_image_tokens(tiny_model, prompt * 4, make_generators(range(4)), 16,
                                  SampleConfig(temperature=1.5, cfg_scale=2.0))
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < vocab.image_size


def test_seeds_reproduce_and_differ(tiny_model):
    prompts = encode(PROMPTS[:2])
    settings = SampleConfig(temperature=1.0, cfg_scale=4.0)
    a = generate_image_tokens(tiny_model, prompts, make_generators([3, 4]), 16, settings)
    b = generate_image_tokens(tiny_model, prompts, make_generators([3, 4]), 16, settings)
    c = generate_image_tokens(tiny_model, prompts, make_generators([30, 40]), 16, settings)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_negative_prompt_replaces_the_null_prompt_in_guidance(tiny_model):
    prompts, negatives = encode(PROMPTS[:2]), encode(["a blue square", "四个"])
    scale = 2.5
    settings = SampleConfig(cfg_scale=scale)
    codes, logits = generate_image_tokens(tiny_model, prompts, make_generators([0, 1]), 6, settings,
                                          return_logits=True, negative_prompts=negatives)
    vocab = tiny_model.vocab
    for b, (prompt, negative) in enumerate(zip(prompts, negatives)):
        ids = vocab.codes_to_ids(codes[b]).tolist()
        for t in range(6):
            cond = full_image_logits(tiny_model, prompt + [vocab.boi_id] + ids[:t])
            away = full_image_logits(tiny_model, negative + [vocab.boi_id] + ids[:t])
            torch.testing.assert_close(logits[b, t], away + scale * (cond - away), atol=1e-4, rtol=1e-4)
    # empty negative prompts are the null prompt; the cache changes nothing
    greedy = SampleConfig(temperature=0.0, cfg_scale=scale)
    n = tiny_model.config.image_tokens
    assert torch.equal(generate_image_tokens(tiny_model, prompts, None, n, greedy, negative_prompts=[[], []]),
                       generate_image_tokens(tiny_model, prompts, None, n, greedy))
    assert torch.equal(generate_image_tokens(tiny_model, prompts, None, n, greedy, negative_prompts=negatives),
                       generate_image_tokens(tiny_model, prompts, None, n, greedy, use_cache=False,
                                             negative_prompts=negatives))


def test_a_negative_prompt_needs_guidance_and_one_per_prompt(tiny_model):
    with pytest.raises(MarsError, match="cfg_scale != 1"):
        generate_image_tokens(tiny_model, encode(PROMPTS[:1]), None, 4, SampleConfig(cfg_scale=1.0),
                              negative_prompts=encode(["x"]))
    with pytest.raises(MarsError, match="1 negative prompts for 2 prompts"):
        generate_image_tokens(tiny_model, encode(PROMPTS[:2]), None, 4, SampleConfig(), negative_prompts=encode(["x"]))


def test_batch_equals_one_by_one(tiny_model):
    prompts = encode(PROMPTS)
    settings = SampleConfig(temperature=1.0, top_k=100, top_p=0.95, cfg_scale=3.0)
    n = tiny_model.config.image_tokens
    batch = generate_image_tokens(tiny_model, prompts, make_generators([0, 1, 2]), n, settings)
    for b, prompt in enumerate(prompts):
        alone = generate_image_tokens(tiny_model, [prompt], make_generators([b]), n, settings)
        assert torch.equal(alone[0], batch[b])


# --- text decoding ----------------------------------------------------------------------------


def greedy_text_reference(model, prefix, eos, limit, max_new):
    ids, out = list(prefix), []
    for _ in range(max_new):
        x = torch.tensor([ids])
        token = int(model(x, model.image_mask(x))[0, -1, :limit].argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
    return out


def test_caption_decoding_stops_at_eos_per_row(tiny_model):
    gen = torch.Generator().manual_seed(0)
    instruction = TOK.encode("Describe the image.")
    prefixes = [caption_prefix(tiny_model, torch.randint(0, 256, (4, 4), generator=gen), instruction)
                for _ in range(4)]
    eos, limit, max_new = TOK.eos_id, TOK.vocab_size, 12
    # make eos win wherever the token the first caption writes third would have won
    third = greedy_text_reference(tiny_model, prefixes[0], eos, limit, 3)[2]
    with torch.no_grad():
        tiny_model.lm_head.text_weight[eos] = 1.3 * tiny_model.lm_head.text_weight[third]
    texts = generate_text(tiny_model, prefixes, None, eos, limit, max_new)
    refs = [greedy_text_reference(tiny_model, p, eos, limit, max_new) for p in prefixes]
    assert texts == refs
    assert len(texts[0]) <= 2 and max(len(t) for t in texts) > len(texts[0])  # rows stop independently
    assert all(eos not in t and max(t, default=0) < limit for t in texts)


def guided_text_reference(model, prefix, uncond, eos, limit, max_new, scale, plausibility):
    """Greedy image-guided text by two independent full forwards per token (no cache, no batch)."""
    ids, free, out = list(prefix), list(uncond), []
    for _ in range(max_new):
        c = model(torch.tensor([ids]), model.image_mask(torch.tensor([ids])))[0, -1, :limit].double()
        u = model(torch.tensor([free]), model.image_mask(torch.tensor([free])))[0, -1, :limit].double()
        guided = u + scale * (c - u)
        probs = c.softmax(-1)
        guided[probs < plausibility * probs.max()] = float("-inf")
        token = int(guided.argmax())
        if token == eos:
            break
        out.append(token)
        ids.append(token)
        free.append(token)
    return out


def test_guide_text_weighs_the_image_and_keeps_only_plausible_tokens():
    cond = torch.tensor([[2.0, 1.0, -1.0, 0.0]]).log_softmax(-1)
    uncond = torch.tensor([[3.0, -2.0, -9.0, 0.0]]).log_softmax(-1)
    logits = torch.cat([cond, uncond])
    assert torch.allclose(guide_text(logits, 2.0, 0.0), uncond + 2.0 * (cond - uncond))
    guided = guide_text(logits, 2.0, 0.1)
    # token 2 gains most from the image, but the image itself makes it < 0.1 x as likely as token 0
    assert guide_text(logits, 2.0, 0.0).argmax() == 2
    assert torch.isinf(guided[0, 2]) and guided.argmax() == 1
    assert torch.equal(guide_text(logits, 1.0, 0.1).argmax(-1), cond.argmax(-1))  # scale 1 = the image alone


def test_guided_captions_equal_independent_forwards_alone_or_batched(tiny_model):
    gen = torch.Generator().manual_seed(3)
    instruction = TOK.encode("Describe the image.")
    prefixes = [caption_prefix(tiny_model, torch.randint(0, 256, (4, 4), generator=gen), instruction)
                for _ in range(3)]
    unconditional = [instruction, TOK.encode("x"), instruction]  # different lengths: left padding
    eos, limit, max_new = TOK.eos_id, TOK.vocab_size, 10
    greedy = SampleConfig(temperature=0.0, cfg_scale=3.0)
    texts = generate_text(tiny_model, prefixes, None, eos, limit, max_new, greedy, unconditional, plausibility=0.05)
    refs = [guided_text_reference(tiny_model, p, u, eos, limit, max_new, 3.0, 0.05)
            for p, u in zip(prefixes, unconditional)]
    assert texts == refs
    assert texts != [greedy_text_reference(tiny_model, p, eos, limit, max_new) for p in prefixes]  # guidance acts
    alone = [generate_text(tiny_model, [p], None, eos, limit, max_new, greedy, [u], plausibility=0.05)[0]
             for p, u in zip(prefixes, unconditional)]
    assert alone == texts
    plain = generate_text(tiny_model, prefixes, None, eos, limit, max_new, SampleConfig(temperature=0.0, cfg_scale=1.0),
                          unconditional, plausibility=0.05)
    assert plain == [greedy_text_reference(tiny_model, p, eos, limit, max_new) for p in prefixes]


def test_a_split_prefill_fills_the_same_cache_as_one_prefill(tiny_model):
    gen = torch.Generator().manual_seed(5)
    instruction = TOK.encode("Describe the image.")
    rows = [caption_prefix(tiny_model, torch.randint(0, 256, (4, 4), generator=gen), instruction) for _ in range(2)]
    rows += [instruction, TOK.encode("a")]  # short rows: the split prefill runs them over 19 slots, not 37
    whole, hidden, slot = prefill(tiny_model, rows, 4)
    split, split_hidden, split_slot = prefill(tiny_model, rows, 4, split=2)
    assert slot == split_slot and torch.allclose(hidden, split_hidden, atol=1e-5)
    for layer in range(tiny_model.config.num_layers):
        for b, row in enumerate(rows):  # every row's real slots hold the same keys and values
            filled = slice(slot - len(row), slot)
            assert torch.allclose(whole.k[layer][b, :, filled], split.k[layer][b, :, filled], atol=1e-5)
            assert torch.allclose(whole.v[layer][b, :, filled], split.v[layer][b, :, filled], atol=1e-5)


def test_copies_continue_each_prefix_from_one_prefill_as_repeated_prefixes_would(tiny_model):
    prefixes = encode(PROMPTS[:2])
    unconditional = encode(["x", "yz"])
    drawn = SampleConfig(temperature=1.0, top_k=20, cfg_scale=2.0)
    seeds = [3, 4, 5, 6, 7, 8]  # three copies of each prefix
    copies = generate_text(tiny_model, prefixes, make_generators(seeds), TOK.eos_id, TOK.vocab_size, 8, drawn,
                           unconditional, plausibility=0.05, copies=3)
    repeated = generate_text(tiny_model, [p for p in prefixes for _ in range(3)], make_generators(seeds), TOK.eos_id,
                             TOK.vocab_size, 8, drawn, [u for u in unconditional for _ in range(3)], plausibility=0.05)
    assert copies == repeated
    assert len({tuple(t) for t in copies[:3]}) > 1  # the copies draw differently


def test_guided_text_needs_one_unconditional_prefix_each(tiny_model):
    prefixes = encode(PROMPTS[:2])
    guided = SampleConfig(temperature=0.0, cfg_scale=2.0)
    with pytest.raises(MarsError, match="unconditional prefix per prefix"):
        generate_text(tiny_model, prefixes, None, TOK.eos_id, TOK.vocab_size, 4, guided)
    with pytest.raises(MarsError, match="unconditional prefix per prefix"):
        generate_text(tiny_model, prefixes, None, TOK.eos_id, TOK.vocab_size, 4, guided, prefixes[:1])
    with pytest.raises(MarsError, match="plausibility"):
        generate_text(tiny_model, prefixes, None, TOK.eos_id, TOK.vocab_size, 4, guided, prefixes, plausibility=1.0)
    with pytest.raises(MarsError, match="not guided"):
        generate_image_and_text(tiny_model, prefixes, None, 16, TOK.eos_id, TOK.vocab_size, 4,
                                text_sampling=guided)


def test_joint_generation_writes_image_then_text(tiny_model):
    prompts = encode(PROMPTS[:2])
    vocab = tiny_model.vocab
    eos, limit = TOK.eos_id, TOK.vocab_size
    codes, texts = generate_image_and_text(tiny_model, prompts, make_generators([0, 1]), 16, eos, limit,
                                           max_new_tokens=8, sampling=SampleConfig(cfg_scale=3.0))
    assert codes.shape == (2, 16) and codes.max() < vocab.image_size
    alone = generate_image_tokens(tiny_model, prompts, make_generators([0, 1]), 16, SampleConfig(cfg_scale=3.0))
    assert torch.equal(codes, alone)
    for b, prompt in enumerate(prompts):
        prefix = prompt + [vocab.boi_id] + vocab.codes_to_ids(codes[b]).tolist() + [vocab.eoi_id]
        assert texts[b] == greedy_text_reference(tiny_model, prefix, eos, limit, 8)
        assert len(texts[b]) > 0


def test_joint_generation_reads_an_instruction_before_writing(tiny_model):
    """With an instruction, the text is what the model writes after `</img> instruction`, the
    instruction's tokens read by the language expert in the same sequence."""
    prompts, instruction = encode(PROMPTS[:2]), TOK.encode("Describe the image.")
    vocab, eos, limit = tiny_model.vocab, TOK.eos_id, TOK.vocab_size
    codes, texts = generate_image_and_text(tiny_model, prompts, make_generators([0, 1]), 16, eos, limit,
                                           max_new_tokens=8, sampling=SampleConfig(cfg_scale=3.0),
                                           instruction=instruction)
    assert torch.equal(codes, generate_image_tokens(tiny_model, prompts, make_generators([0, 1]), 16,
                                                    SampleConfig(cfg_scale=3.0)))
    for b, prompt in enumerate(prompts):
        prefix = prompt + caption_prefix(tiny_model, codes[b], instruction)
        assert texts[b] == greedy_text_reference(tiny_model, prefix, eos, limit, 8)
    without = generate_image_and_text(tiny_model, prompts, make_generators([0, 1]), 16, eos, limit,
                                      max_new_tokens=8, sampling=SampleConfig(cfg_scale=3.0))[1]
    assert texts != without  # the instruction is read, not ignored


# --- compiled decoding and CUDA (off by default: `-m slow`, `-m gpu`) --------------------------


@pytest.mark.slow
def test_compiled_decode_step_equals_eager(tiny_model):
    prompts = encode(PROMPTS)
    settings = SampleConfig(temperature=0.0, cfg_scale=3.0)
    eager = generate_image_tokens(tiny_model, prompts, None, 16, settings)
    assert torch.equal(generate_image_tokens(tiny_model, prompts, None, 16, settings, compile=True), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("image_positions", ["1d", "2d"])
def test_cuda_cached_uncached_and_cuda_graph_agree(tiny_builders, image_positions):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_builders.model(image_positions=image_positions).to("cuda")  # fp32: equalities are exact there
    prompts = encode(PROMPTS)
    greedy = SampleConfig(temperature=0.0, cfg_scale=3.0)
    plain, plain_logits = generate_image_tokens(model, prompts, None, 16, greedy, use_cache=False, return_logits=True)
    for options in (dict(), dict(cuda_graph=True), dict(compile=True, cuda_graph=True)):
        cached, logits = generate_image_tokens(model, prompts, None, 16, greedy, return_logits=True, **options)
        assert torch.equal(cached, plain), options
        torch.testing.assert_close(logits, plain_logits, atol=1e-4, rtol=1e-4)
    negatives = encode(["a blue square"] * len(prompts))
    eager = generate_image_tokens(model, prompts, None, 16, greedy, negative_prompts=negatives)
    graphed = generate_image_tokens(model, prompts, None, 16, greedy, negative_prompts=negatives, cuda_graph=True)
    assert torch.equal(graphed, eager)
    sampled = SampleConfig(temperature=1.0, top_k=50, top_p=0.95, cfg_scale=3.0)
    batch = generate_image_tokens(model, prompts, make_generators([0, 1, 2], "cuda"), 16, sampled, cuda_graph=True)
    for b, prompt in enumerate(prompts):
        alone = generate_image_tokens(model, [prompt], make_generators([b], "cuda"), 16, sampled)
        assert torch.equal(alone[0], batch[b])
    texts = generate_image_and_text(model, prompts, make_generators([0, 1, 2], "cuda"), 16, TOK.eos_id,
                                    TOK.vocab_size, max_new_tokens=5, sampling=sampled, compile=True)[1]
    assert len(texts) == 3 and all(len(t) <= 5 for t in texts)
