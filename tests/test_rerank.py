"""Best-of-N by self-captioning (mars.rerank, `MarsPipeline.generate(rerank=N)`, `--rerank`)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mars import MarsPipeline
from mars.cli import main
from mars.errors import MarsError
from mars.generate import RerankConfig, SampleConfig, caption_prefix, generate_image_tokens, make_generators
from mars.pipeline import RERANK_SEED_STRIDE
from mars.rerank import (best_candidates, caption_as_prompt, caption_ids, caption_log_likelihood,
                         caption_log_likelihoods, caption_scores, continuation_log_likelihoods,
                         drawing_log_likelihoods, image_log_likelihood, one_token_edits, prompt_language,
                         refine_caption)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return MarsPipeline.from_pretrained(tiny_model_dir, device="cpu")


def pixels(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def drawn_log_likelihood(model, prompt: list[int], codes: torch.Tensor) -> float:
    """log p(codes | prompt <img>) by one unpadded forward, each code normalised among image codes
    only, as images are drawn."""
    vocab = model.vocab
    image = vocab.codes_to_ids(codes.flatten()).tolist()
    ids = torch.tensor([[*prompt, vocab.boi_id, *image]])
    with torch.inference_mode():
        logits = model(ids[:, :-1], model.image_mask(ids[:, :-1]))[0, -len(image):]
    log_probs = F.log_softmax(logits[:, vocab.image_ids].double(), dim=-1)
    return sum(float(log_probs[t, ids[0, -len(image) + t] - vocab.image_offset]) for t in range(len(image)))


def test_prompt_language_picks_the_caption_language():
    assert prompt_language("a red circle to the left of a blue square") == "en"
    assert prompt_language("一个红色的圆形") == "zh"
    assert prompt_language("a 红色 circle") == "zh"


def test_caption_log_likelihood_equals_the_token_by_token_definition(pipe):
    model, tok = pipe.model, pipe.tokenizer
    torch.manual_seed(0)
    codes = torch.randint(0, model.config.image_vocab_size, (3, 4, 4))
    instruction, caption = caption_ids(tok, "a red circle")
    assert caption[-1] == tok.eos_id and tok.decode(caption[:-1]) == " a red circle"
    got = caption_log_likelihood(model, codes, instruction, caption)
    with torch.inference_mode():
        for row, c in enumerate(codes):
            prefix = caption_prefix(model, c, instruction)
            total = 0.0
            for t, token in enumerate(caption):  # one forward per token over the sequence so far
                ids = torch.tensor([prefix + caption[:t]])
                logits = model(ids, model.image_mask(ids))[0, -1].float()
                total += F.log_softmax(logits, -1)[token].item()
            assert got[row].item() == pytest.approx(total, abs=1e-3)


def test_caption_log_likelihoods_of_different_captions_equal_one_row_at_a_time(pipe):
    model, tok = pipe.model, pipe.tokenizer
    torch.manual_seed(2)
    codes = torch.randint(0, model.config.image_vocab_size, (3, 4, 4))
    captions = [caption_ids(tok, p) for p in ("a red circle to the left of a blue square", "一个红色的圆形", "a star")]
    assert len({len(c) for _, c in captions}) == 3  # right padding is exercised
    got = caption_log_likelihoods(model, codes, captions)
    for row in range(3):
        alone = caption_log_likelihood(model, codes[row : row + 1], *captions[row])
        assert got[row].item() == pytest.approx(alone.item(), abs=1e-4)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        caption_log_likelihoods(model, codes, captions[:2])


def test_best_candidates_keeps_each_prompts_likeliest_caption(pipe):
    model, tok = pipe.model, pipe.tokenizer
    torch.manual_seed(1)
    prompts = ["a red circle", "一个蓝色的正方形"]
    codes = torch.randint(0, model.config.image_vocab_size, (6, 4, 4))  # 3 candidates per prompt
    kept = best_candidates(model, tok, prompts, codes, per_image=3)
    for i, prompt in enumerate(prompts):
        scores = caption_log_likelihood(model, codes[3 * i : 3 * i + 3], *caption_ids(tok, prompt))
        assert torch.equal(kept[i], codes[3 * i + int(scores.argmax())])


def test_best_candidates_adds_the_weighted_drawing_term(pipe):
    model, tok = pipe.model, pipe.tokenizer
    torch.manual_seed(4)
    prompts = ["a red circle", "一个蓝色的正方形"]
    codes = torch.randint(0, model.config.image_vocab_size, (8, 4, 4))  # 4 candidates per prompt
    changed = False
    for i, prompt in enumerate(prompts):
        candidates = codes[4 * i : 4 * i + 4]
        reading = caption_log_likelihood(model, candidates, *caption_ids(tok, prompt))
        drawing = torch.tensor([drawn_log_likelihood(model, tok.encode(prompt), c) for c in candidates])
        for weight in (0.5, 100.0):
            kept = best_candidates(model, tok, prompts, codes, per_image=4, drawing_weight=weight)
            best = int((reading.double() + weight * drawing).argmax())
            assert torch.equal(kept[i], candidates[best])
            changed |= best != int(reading.argmax())
    assert changed  # the drawing term changed a choice


def test_pipeline_rerank_keeps_the_best_of_the_seeded_candidates(pipe):
    prompt, seed, n = "a red circle", 6, 3
    settings = pipe.sampling_settings(cfg_scale=2.0, top_k=20)
    got = pixels(pipe.generate(prompt, seed=seed, rerank=n, **settings))[0]
    # the same candidates made one by one, scored, the best decoded
    ids = pipe.encode_prompts([prompt], 16)
    candidates = torch.cat([generate_image_tokens(pipe.model, ids, make_generators([seed + k * RERANK_SEED_STRIDE]),
                                                  16, SampleConfig(**settings)) for k in range(n)]).view(n, 4, 4)
    scores = caption_log_likelihood(pipe.model, candidates, *caption_ids(pipe.tokenizer, prompt))
    assert int(scores.argmax()) != 0  # a seed where reranking changes the image
    best = pixels(pipe.decode_codes(candidates[int(scores.argmax())][None]))[0]
    assert np.abs(got - best).max() <= 1
    # candidate 0 is the image rerank=1 makes
    first = pixels(pipe.decode_codes(candidates[:1]))[0]
    assert np.abs(pixels(pipe.generate(prompt, seed=seed, **settings))[0] - first).max() <= 1


def test_pipeline_rerank_is_the_same_alone_or_in_a_batch(pipe):
    prompts = ["a red circle", "一个蓝色的正方形"]
    together = pixels(pipe.generate(prompts, seed=3, rerank=2, batch_size=3, top_k=20))
    for i, prompt in enumerate(prompts):
        alone = pixels(pipe.generate(prompt, seed=3 + i, rerank=2, batch_size=1, top_k=20))[0]
        assert np.abs(together[i] - alone).max() <= 1


def test_rerank_drawing_weight_is_the_models_default_and_overridable(pipe, tmp_path):
    weighted = MarsPipeline(pipe.model, pipe.tokenizer, pipe.vq, rerank_config=RerankConfig(drawing_weight=100.0))
    assert pipe.rerank_config == RerankConfig()  # a folder without the entry: reading alone
    images = {}
    for seed in range(6):
        images[seed] = [pixels(p.generate("a red circle", seed=seed, rerank=4, top_k=20, **kw))[0]
                        for p, kw in ((weighted, {}), (pipe, {"rerank_drawing_weight": 100.0}), (pipe, {}),
                                      (weighted, {"rerank_drawing_weight": 0.0}))]
        by_default, given, reading, given_zero = images[seed]
        assert np.abs(by_default - given).max() <= 1 and np.abs(reading - given_zero).max() <= 1
    assert any(np.abs(a - c).max() > 1 for a, _, c, _ in images.values())  # the weight changed a choice
    weighted.save_pretrained(tmp_path / "copy")  # the default travels with the model
    config = json.loads((tmp_path / "copy" / "generation_config.json").read_text())
    assert config["rerank"] == {"drawing_weight": 100.0}
    assert MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu").rerank_config == weighted.rerank_config
    for bad, message in (('{"rerank": {"drawing_weight": -1}}', "drawing_weight must be a finite number >= 0"),
                         ('{"rerank": {"drawing_weight": NaN}}', "drawing_weight must be a finite number >= 0"),
                         ('{"rerank": {"weight": 1}}', "unknown key 'rerank.weight'"),
                         ('{"rerank": 0.1}', "rerank must be a mapping")):
        (tmp_path / "copy" / "generation_config.json").write_text(bad)
        with pytest.raises(MarsError, match=message):
            MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    with pytest.raises(MarsError, match="drawing_weight"):
        pipe.generate("a red circle", rerank=2, rerank_drawing_weight=float("inf"))


def test_rerank_must_be_positive_and_fit_the_context(pipe):
    with pytest.raises(MarsError, match="rerank"):
        pipe.generate("a red circle", rerank=0)
    limit = pipe.model.config.max_seq_len - pipe.image_tokens() - 2  # the longest prompt generation takes
    prompt = "a" * limit
    assert len(pipe.encode_prompts([prompt], pipe.image_tokens())[0]) == limit
    pipe.generate(prompt, temperature=0.0)  # fits to generate ...
    with pytest.raises(MarsError, match="too long to rerank"):  # ... not beside the caption instruction
        pipe.generate(prompt, temperature=0.0, rerank=2)


def test_cli_rerank_records_the_setting(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    assert main(["generate", "a red circle", "--out-dir", str(out), "--model", str(tiny_model_dir),
                 "--device", "cpu", "--rerank", "2"]) == 0
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert line["settings"]["rerank"] == 2 and line["settings"]["rerank_drawing_weight"] == 0.0  # the model's
    assert main(["generate", "a red circle", "--out-dir", str(out), "--model", str(tiny_model_dir), "--overwrite",
                 "--device", "cpu", "--rerank", "2", "--rerank-drawing-weight", "0.5"]) == 0
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["settings"]["rerank_drawing_weight"] == 0.5
    for bad in (["--rerank", "0"], ["--rerank", "2", "--rerank-drawing-weight", "-1"]):
        assert main(["generate", "a red circle", "-o", str(tmp_path / "x.png"), "--model", str(tiny_model_dir),
                     "--device", "cpu", *bad]) != 0


# --- captions reranked by the text-to-image direction ------------------------------------------


def test_image_log_likelihood_equals_a_forward_per_prompt(pipe):
    model = pipe.model
    codes = torch.randint(0, model.config.image_vocab_size, (4, 4), generator=torch.Generator().manual_seed(1))
    prompts = [pipe.tokenizer.encode(t) for t in ("a red circle", "一个蓝色的正方形在左边", "")]  # padding
    got = image_log_likelihood(model, prompts, codes)
    for score, prompt in zip(got, prompts):
        assert float(score) == pytest.approx(drawn_log_likelihood(model, prompt, codes), abs=1e-3)


def test_drawing_log_likelihoods_of_different_images_equal_a_forward_each(pipe):
    model = pipe.model
    codes = torch.randint(0, model.config.image_vocab_size, (3, 4, 4), generator=torch.Generator().manual_seed(2))
    prompts = [pipe.tokenizer.encode(t) for t in ("a red circle", "一个蓝色的正方形在左边", "")]
    got = drawing_log_likelihoods(model, prompts, codes)
    for score, prompt, c in zip(got, prompts, codes):
        assert float(score) == pytest.approx(drawn_log_likelihood(model, prompt, c), abs=1e-3)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        drawing_log_likelihoods(model, prompts[:2], codes)


def test_caption_rerank_keeps_the_candidate_that_best_explains_the_image(pipe):
    from mars.generate import CAPTION_INSTRUCTIONS, generate_text

    images = pipe.generate(["a red circle", "一个蓝色的正方形", "x"], seed=2)
    kwargs = dict(lang="en", max_new_tokens=6, cfg_scale=2.0, plausibility=0.05)
    kept = pipe.caption(images, rerank=4, **kwargs)
    # independently: candidate 0 is the rerank=1 caption (greedy), candidate k is drawn at
    # temperature 1 with seed i + k * stride; each is scored alone
    instruction = pipe.tokenizer.encode(CAPTION_INSTRUCTIONS["en"])
    tok = pipe.tokenizer
    changed = 0
    for i, c in enumerate(pipe.encode_images(images)):
        prefix = caption_prefix(pipe.model, c, instruction)
        candidates = [generate_text(pipe.model, [prefix], make_generators([i + k * RERANK_SEED_STRIDE]), tok.eos_id,
                                    tok.vocab_size, 6, SampleConfig(temperature=float(k > 0), cfg_scale=2.0),
                                    [instruction], plausibility=0.05)[0] for k in range(4)]
        scores = [float(image_log_likelihood(pipe.model, [ids], c)[0]) for ids in candidates]
        assert kept[i] == tok.decode(candidates[int(np.argmax(scores))]).strip()
        changed += int(np.argmax(scores)) != 0
    assert changed > 0  # the check above is not only candidate 0
    assert pipe.caption(images, rerank=1, **kwargs) == pipe.caption(images, **kwargs)
    assert pipe.caption(images[1], seed=1, rerank=4, **kwargs) == kept[1:2]  # alone == in a batch
    with pytest.raises(MarsError, match="rerank"):
        pipe.caption(images, rerank=0)


# --- captions refined by one-token edits ---------------------------------------------------------


@pytest.fixture(scope="module")
def edit_case(pipe):
    """(codes (h, w), instruction ids, caption ids) of one drawn image and a caption of it."""
    from mars.generate import CAPTION_INSTRUCTIONS

    (codes,) = pipe.encode_images(pipe.generate("a red circle", seed=3))
    instruction = pipe.tokenizer.encode(CAPTION_INSTRUCTIONS["en"])
    return codes, instruction, pipe.tokenizer.encode(" a red circle")


def test_one_token_edits_are_the_top_words_at_each_place(pipe, edit_case):
    codes, instruction, caption = edit_case
    tok, model = pipe.tokenizer, pipe.model
    top_k, floor = 3, 0.05
    got = one_token_edits(model, tok, codes, instruction, caption, top_k, floor)
    want = []
    prefix = caption_prefix(model, codes, instruction)
    with torch.inference_mode():
        for j in range(len(caption)):  # one forward per place, over the caption so far
            ids = torch.tensor([prefix + caption[:j]])
            log_probs = F.log_softmax(model(ids, model.image_mask(ids))[0, -1, : tok.vocab_size].double(), -1)
            ranked = log_probs.argsort(descending=True).tolist()
            best = log_probs[ranked[0]].item()
            words = [t for t in ranked[: top_k + 1] if log_probs[t].item() >= best + np.log(floor)
                     and t not in (caption[j], tok.eos_id)][:top_k]
            want.extend(caption[:j] + [t] + caption[j + 1 :] for t in words)
    assert got == want and got  # every edit changes exactly one token
    assert all(sum(a != b for a, b in zip(e, caption)) == 1 and len(e) == len(caption) for e in got)
    assert one_token_edits(model, tok, codes, instruction, [], top_k, floor) == []


def test_caption_scores_add_drawing_and_reading_per_caption(pipe, edit_case):
    codes, instruction, caption = edit_case
    tok, model = pipe.tokenizer, pipe.model
    captions = [caption, tok.encode(" a blue star"), tok.encode("一个红色的圆形")]
    with pytest.raises(ValueError, match="not a prompt"):
        caption_scores(model, tok, codes, instruction, [caption, tok.encode("红")[:1]])
    got = caption_scores(model, tok, codes, instruction, captions, chunk=2)  # chunks of 2 and 1
    for score, c in zip(got, captions):
        drawn = image_log_likelihood(model, [tok.encode(tok.decode(c).strip())], codes)[0]
        read = caption_log_likelihood(model, codes[None], instruction, [*c, tok.eos_id])[0]
        assert score.item() == pytest.approx((drawn + read).item(), abs=1e-3)
    assert caption_as_prompt(tok, tok.encode(" a red circle")) == tok.encode("a red circle")
    assert caption_as_prompt(tok, tok.encode("红")[:1]) == []  # a split multi-byte character is not text
    assert caption_as_prompt(tok, tok.encode("  ")) == []


def test_refine_caption_climbs_to_a_caption_no_edit_improves(pipe, edit_case):
    codes, instruction, caption = edit_case
    tok, model = pipe.tokenizer, pipe.model
    top_k, floor = 4, 0.01

    def score(c):
        return caption_scores(model, tok, codes, instruction, [c])[0].item()

    assert refine_caption(model, tok, codes, instruction, caption, 0, top_k, floor) == caption
    path, current = [caption], caption
    for rounds in range(1, 40):  # each further round makes at most one more edit, and only an improving one
        current = refine_caption(model, tok, codes, instruction, caption, rounds, top_k, floor)
        assert current == path[-1] or sum(a != b for a, b in zip(current, path[-1])) == 1
        if current == path[-1]:
            break
        assert score(current) > score(path[-1])
        path.append(current)
    else:
        pytest.fail("no local optimum within 40 edits")
    assert len(path) > 1  # the given caption is not already the random model's best
    for edit in one_token_edits(model, tok, codes, instruction, current, top_k, floor):  # a local optimum
        if caption_as_prompt(tok, edit):
            assert score(edit) <= score(current) + 1e-4


def test_pipeline_refine_edits_each_caption(pipe, edit_recorder):
    from mars.generate import CAPTION_INSTRUCTIONS

    images = pipe.generate(["a red circle", "一个蓝色的正方形"], seed=2)
    kwargs = dict(lang="zh", max_new_tokens=6, cfg_scale=2.0, plausibility=0.05)
    plain = pipe.caption(images, **kwargs)
    assert pipe.caption(images, refine=0, **kwargs) == plain and not edit_recorder
    assert pipe.caption(images, refine=2, **kwargs) == ["edited 2", "edited 2"]
    instruction = pipe.tokenizer.encode(CAPTION_INSTRUCTIONS["zh"])
    assert len(edit_recorder) == 2
    for (codes, given, text, rounds), want, want_codes in zip(edit_recorder, plain, pipe.encode_images(images)):
        assert torch.equal(codes, want_codes) and given == instruction and text == want and rounds == 2
    with pytest.raises(MarsError, match="refine must be an integer >= 0"):
        pipe.caption(images, refine=-1)


def test_continuation_log_likelihoods_equal_full_forwards(pipe, edit_case):
    codes, instruction, _ = edit_case
    tok, model = pipe.tokenizer, pipe.model
    continuations = [tok.encode(t) + [tok.eos_id] for t in (" a red circle", " 两个", " a blue star and a square")]
    got = continuation_log_likelihoods(model, caption_prefix(model, codes, instruction), continuations)
    images = codes[None].expand(3, *codes.shape)
    want = caption_log_likelihoods(model, images, [(instruction, c) for c in continuations])
    assert torch.allclose(got, want, atol=1e-3)
