"""Speculative Jacobi decoding (`mars.jacobi`) against one-code-per-step decoding and exact probabilities."""

from collections import Counter

import pytest
import torch

import mars.jacobi
from mars.errors import MarsError
from mars.generate import (
    SampleConfig,
    generate_image_and_text,
    generate_image_tokens,
    guide,
    image_rows,
    left_pad,
    make_generators,
    sample,
    top_k_filter,
)
from mars.jacobi import (
    Candidates,
    candidates,
    decode_images_jacobi,
    generate_image_and_text_jacobi,
    generate_image_tokens_jacobi,
    verify,
)
from mars.text_tokenizer import ByteTokenizer

TOK = ByteTokenizer()
PROMPTS = [TOK.encode(p) for p in ("a red circle", "一个蓝色的正方形在左边", "two stars")]


def exact_guided_logits(model, prompt, codes, cfg_scale):
    """The guided logits (N, K) of each code of `codes` (N,) after the prompt and the codes before
    it, from one uncached forward of the whole sequence."""
    rows = image_rows(model, [prompt], guided=True)
    ids, pad = left_pad(rows, "cpu")
    fed = codes[:-1].expand(len(rows), -1) + model.vocab.image_offset
    seq = torch.cat([ids, fed], dim=1)
    hidden = model.forward_hidden(seq, model.image_mask(seq), pad_lengths=pad)[:, ids.shape[1] - 1 :]
    return guide(model.logits(hidden, rows=model.vocab.image_ids).float(), cfg_scale)[0]


def reference_probs(logits, sampling):
    """(..., K) -> the top-k distribution at the sampling's temperature, dense (top_p 1)."""
    return (top_k_filter(logits, sampling.top_k) / sampling.temperature).softmax(-1)


def test_verify_yields_codes_distributed_as_p():
    """Accepted drafts and residual draws together follow p, whatever q the drafts came from (q over
    other codes, listed in another order)."""
    p = Candidates(torch.tensor([[0, 1, 2], [3, 0, 1]]), torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]]))  # L + 1 = 2
    q = Candidates(torch.tensor([[3, 2, 1, 0]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]))  # the guess of the one draft
    gen = torch.Generator().manual_seed(0)
    n = 8000
    drafts = q.ids[0, torch.multinomial(q.probs.expand(n, -1), 1, replacement=True, generator=gen)]  # (n, 1)
    firsts, lengths = Counter(), Counter()
    for draft in drafts:
        out = verify(draft, q, p, gen)
        firsts[int(out[0])] += 1
        lengths[len(out)] += 1
    freq = torch.tensor([firsts[k] / n for k in range(4)])
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.02, rtol=0)
    assert firsts[3] == 0  # p gives code 3 nothing: never emitted, though q drafts it most
    torch.testing.assert_close(lengths[2] / n, 0.1 + 0.2 + 0.2, atol=0.02, rtol=0)  # sum of min(p, q)


def test_candidates_are_what_sample_draws_among():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4))
    dist = candidates(logits, SampleConfig(temperature=0.7, top_k=5, top_p=0.8))
    assert torch.equal(dist.ids, torch.topk(logits, 5).indices)  # largest first, as `sample` takes them
    kept = dist.probs > 0
    assert bool(kept[:, 0].all()) and bool((dist.probs.sum(-1) - 1).abs().max() < 1e-6)
    for row, keep in zip(range(3), kept):  # the kept ones: softmax of logits / T over them alone
        values = logits[row, dist.ids[row, keep]] / 0.7
        torch.testing.assert_close(dist.probs[row, keep], values.softmax(-1))
    drawn = torch.stack([sample(logits, 0.7, 5, 0.8, make_generators(range(3 * r, 3 * r + 3))) for r in range(50)])
    assert all(bool(dist.prob_of(d).gt(0).all()) for d in drawn)
    greedy = candidates(logits, SampleConfig(temperature=0.0))
    assert torch.equal(greedy.ids[:, 0], logits.argmax(-1)) and bool((greedy.probs == 1).all())


@torch.no_grad()
@pytest.mark.parametrize("image_positions", ["1d", "2d"])
@pytest.mark.parametrize("cpu_step", [True, False])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_greedy_jacobi_decoding_is_the_greedy_image(tiny_builders, monkeypatch, image_positions, cpu_step, window):
    model = tiny_builders.model(image_positions=image_positions)
    if not cpu_step:
        monkeypatch.setattr(mars.jacobi, "uses_cpu_step", lambda model, cache: False)
    greedy = SampleConfig(temperature=0.0, cfg_scale=2.0)
    n = model.config.image_tokens
    expected = generate_image_tokens(model, PROMPTS, make_generators([0, 1, 2]), n, greedy)
    got = generate_image_tokens_jacobi(model, PROMPTS, make_generators([0, 1, 2]), n, greedy, window)
    assert torch.equal(got, expected)


@torch.no_grad()
@pytest.mark.parametrize("num_tokens", [1, 2, 5])
def test_short_images_and_unguided_decoding(tiny_builders, num_tokens):
    """Fewer codes than a window (the window shrinks to what is left) and cfg_scale 1 (one row per image)."""
    model = tiny_builders.model()
    for cfg_scale in (1.0, 2.0):
        greedy = SampleConfig(temperature=0.0, cfg_scale=cfg_scale)
        expected = generate_image_tokens(model, PROMPTS, make_generators([0, 1, 2]), num_tokens, greedy)
        got = generate_image_tokens_jacobi(model, PROMPTS, make_generators([0, 1, 2]), num_tokens, greedy, 4)
        assert torch.equal(got, expected)


@torch.no_grad()
def test_joint_generation_with_a_window_is_the_same_image_and_text(tiny_builders):
    """Greedy image and text: the image by Jacobi decoding, then the text from a prefill of the
    whole sequence, equal code for code and token for token to the one-sequence decoding."""
    model = tiny_builders.model()
    greedy = SampleConfig(temperature=0.0, cfg_scale=2.0)
    n, eos, limit = model.config.image_tokens, TOK.eos_id, TOK.vocab_size
    expected = generate_image_and_text(model, PROMPTS, make_generators([0, 1, 2]), n, eos, limit, 8, greedy)
    got = generate_image_and_text_jacobi(model, PROMPTS, make_generators([0, 1, 2]), n, eos, limit, 3, 8, greedy)
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert any(len(text) > 0 for text in got[1])
    instruction = TOK.encode("Describe the image.")
    expected = generate_image_and_text(model, PROMPTS, make_generators([0, 1, 2]), n, eos, limit, 8, greedy,
                                       instruction=instruction)
    got = generate_image_and_text_jacobi(model, PROMPTS, make_generators([0, 1, 2]), n, eos, limit, 3, 8, greedy,
                                         instruction=instruction)
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_joint_generation_refuses_bad_text_settings_before_drawing(tiny_builders, monkeypatch):
    model = tiny_builders.model()
    monkeypatch.setattr(mars.jacobi, "generate_image_tokens_jacobi", lambda *args, **kwargs: pytest.fail("drew"))
    n, eos, limit, greedy = model.config.image_tokens, TOK.eos_id, TOK.vocab_size, SampleConfig(temperature=0.0)
    generators = make_generators([0, 1, 2])
    with pytest.raises(MarsError, match="not guided"):
        generate_image_and_text_jacobi(model, PROMPTS, generators, n, eos, limit, 3, 8, greedy,
                                       text_sampling=SampleConfig(temperature=0.0, cfg_scale=2.0))
    with pytest.raises(MarsError, match="max_new_tokens"):
        generate_image_and_text_jacobi(model, PROMPTS, generators, n, eos, limit, 3, 0, greedy)
    with pytest.raises(MarsError, match="does not fit"):
        generate_image_and_text_jacobi(model, PROMPTS, generators, n, eos, model.vocab.text_size + 1, 3, 8, greedy)


@torch.no_grad()
def test_each_code_comes_from_its_exact_context_and_images_do_not_depend_on_the_batch(tiny_builders):
    model = tiny_builders.model()
    sampling = SampleConfig(temperature=1.0, top_k=4, cfg_scale=2.0)
    n = model.config.image_tokens
    codes, logits = generate_image_tokens_jacobi(model, PROMPTS, make_generators([5, 6, 7]), n, sampling, 4,
                                                 return_logits=True)
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(logits[b], exact_guided_logits(model, prompt, codes[b], 2.0), atol=1e-4, rtol=1e-4)
        alone, _, forwards = decode_images_jacobi(model, [prompt], make_generators([5 + b]), n, sampling, 4)
        assert torch.equal(alone[0], codes[b])
        assert -(-(n - 1) // 5) <= forwards <= n - 1  # each forward yields 1 to window + 1 codes
    drawn = torch.topk(logits, 4, dim=-1).indices
    assert bool((drawn == codes[..., None]).any(-1).all())  # every code is one of its top 4


@torch.no_grad()
def test_sequences_follow_the_models_distribution(tiny_builders):
    """The first four codes of many seeds: their frequencies against the exact probability of
    each sequence (top-k 2: at most 16 of them), which one-code-per-step sampling also follows."""
    model = tiny_builders.model()
    sampling = SampleConfig(temperature=1.5, top_k=2, cfg_scale=2.0)
    prompt, n, draws = PROMPTS[0], 4, 600
    codes = generate_image_tokens_jacobi(model, [prompt] * draws, make_generators(range(draws)), n, sampling, 3)
    seen = Counter(tuple(row.tolist()) for row in codes)
    first = reference_probs(exact_guided_logits(model, prompt, codes[0], 2.0), sampling)[0]
    exact = {}
    for head in first.nonzero()[:, 0].tolist():
        # every sequence of top-2 codes, its probability as the product of its codes' probabilities
        stack = [((head,), float(first[head]))]
        for _ in range(n - 1):
            grown = []
            for seq, prob in stack:
                probs = reference_probs(exact_guided_logits(model, prompt, torch.tensor(seq + (0,)), 2.0), sampling)[-1]
                grown += [(seq + (c,), prob * float(probs[c])) for c in probs.nonzero()[:, 0].tolist()]
            stack = grown
        exact.update(stack)
    assert set(seen) <= set(exact)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-5)
    distance = 0.5 * sum(abs(seen[s] / draws - prob) for s, prob in exact.items())
    assert distance < 0.08, distance


def test_bad_settings_are_refused_by_name(tiny_builders):
    model = tiny_builders.model()
    sampling = SampleConfig(cfg_scale=2.0)
    for window in (0, -1, True, 2.5):
        with pytest.raises(MarsError, match="Jacobi window"):
            generate_image_tokens_jacobi(model, PROMPTS[:1], make_generators([0]), 4, sampling, window)
    with pytest.raises(MarsError, match="generators"):
        generate_image_tokens_jacobi(model, PROMPTS[:2], make_generators([0]), 4, sampling, 2)
    with pytest.raises(MarsError, match="negative prompts"):
        generate_image_tokens_jacobi(model, PROMPTS[:2], make_generators([0, 1]), 4, sampling, 2,
                                     negative_prompts=[[1]])
    with pytest.raises(MarsError, match="at most 16 codes"):
        generate_image_tokens_jacobi(tiny_builders.model(image_positions="2d"), PROMPTS[:1], make_generators([0]), 17,
                                     sampling, 2)
