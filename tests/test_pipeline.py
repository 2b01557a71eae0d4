"""MarsPipeline end to end on the tiny model folder: load, generate, caption, joint, save, errors."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mars import MarsPipeline
from mars.errors import MarsError
from mars.generate import (
    CAPTION_INSTRUCTIONS,
    CaptionConfig,
    SampleConfig,
    caption_prefix,
    generate_image_and_text,
    generate_text,
    make_generators,
)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return MarsPipeline.from_pretrained(tiny_model_dir, device="cpu")


def pixels(images):
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_english_and_chinese_prompts_give_images_of_the_model_size(pipe):
    images = pipe.generate(["a red circle", "一个蓝色的正方形"], cfg_scale=4.0, seed=0)
    assert len(images) == 2
    for im in images:
        assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (64, 64)
    small = pipe.generate("a red circle", image_size=32, cfg_scale=1.0)
    assert len(small) == 1 and small[0].size == (32, 32)


def test_image_i_uses_seed_plus_i_whatever_the_batching(pipe):
    prompts = ["a red circle", "一个蓝色的正方形"]
    together = pipe.generate(prompts, seed=7, num_images_per_prompt=2, batch_size=3, top_k=50)
    assert len(together) == 4
    expected = [("a red circle", 7), ("a red circle", 8), ("一个蓝色的正方形", 9), ("一个蓝色的正方形", 10)]
    for got, (prompt, seed) in zip(pixels(together), expected):
        alone = pixels(pipe.generate(prompt, seed=seed, top_k=50, batch_size=1))[0]
        assert np.abs(got - alone).max() <= 1  # same codes; the VQ decoder may round one level apart
    assert np.abs(pixels(together)[0] - pixels(together)[1]).max() > 10  # different seeds, different images


def test_a_list_of_seeds_gives_one_seed_per_image(pipe):
    listed = pixels(pipe.generate(["a red circle", "x"], seed=[11, 4]))
    assert np.abs(listed[0] - pixels(pipe.generate("a red circle", seed=11))[0]).max() <= 1
    assert np.abs(listed[1] - pixels(pipe.generate("x", seed=4))[0]).max() <= 1
    with pytest.raises(MarsError):
        pipe.generate(["a red circle", "x"], seed=[1])


def test_caption_reads_images_and_paths_in_both_languages(pipe, tmp_path):
    images = pipe.generate(["a red circle", "x"], seed=1)
    path = tmp_path / "img.png"
    images[0].save(path)
    en = pipe.caption([images[0], path, images[1]], max_new_tokens=8)
    assert len(en) == 3 and all(isinstance(t, str) for t in en)
    assert en[0] == en[1]  # a PNG round trip keeps the pixels
    # the caption is the greedy continuation of `<img> codes </img> instruction`
    instruction = pipe.tokenizer.encode(CAPTION_INSTRUCTIONS["zh"])
    prefix = caption_prefix(pipe.model, pipe.encode_images([images[1]])[0], instruction)
    ids = generate_text(pipe.model, [prefix], None, pipe.tokenizer.eos_id, pipe.tokenizer.vocab_size, 8,
                        SampleConfig(temperature=0.0, cfg_scale=1.0))[0]
    assert pipe.caption(images[1], lang="zh", max_new_tokens=8) == [pipe.tokenizer.decode(ids).strip()]


def test_generate_with_text_gives_an_image_and_text(pipe):
    image, text = pipe.generate_with_text("a red circle", seed=3, max_new_tokens=6)
    assert image.size == (64, 64) and isinstance(text, str)
    (same,) = pipe.generate("a red circle", seed=3)
    assert np.abs(pixels([image])[0] - pixels([same])[0]).max() <= 1


def test_generate_with_text_reads_an_instruction(pipe):
    """The text is what joint generation writes after `</img>` and the instruction's tokens."""
    _, text = pipe.generate_with_text("a red circle", seed=3, max_new_tokens=6, instruction=CAPTION_INSTRUCTIONS["en"])
    assert text != pipe.generate_with_text("a red circle", seed=3, max_new_tokens=6)[1]  # the instruction is read
    settings = pipe.sampling_settings()
    ids = pipe.encode_prompts(["a red circle"], pipe.image_tokens(None))
    _, texts = generate_image_and_text(pipe.model, ids, make_generators([3]), pipe.image_tokens(None),
                                       pipe.tokenizer.eos_id, pipe.tokenizer.vocab_size, 6, SampleConfig(**settings),
                                       SampleConfig(temperature=0.0, top_k=settings["top_k"], top_p=settings["top_p"],
                                                    cfg_scale=1.0),
                                       instruction=pipe.tokenizer.encode(CAPTION_INSTRUCTIONS["en"]))
    assert text == pipe.tokenizer.decode(texts[0]).strip()
    with pytest.raises(MarsError, match="instruction is empty"):
        pipe.generate_with_text("a red circle", instruction=" ")
    with pytest.raises(MarsError, match="instruction is too long"):
        pipe.generate_with_text("a red circle", instruction="describe " * 200)


def test_generate_with_text_by_jacobi_decoding(pipe):
    image, text = pipe.generate_with_text("a red circle", seed=3, max_new_tokens=6, jacobi_window=3)
    (same,) = pipe.generate("a red circle", seed=3, jacobi_window=3)
    assert np.abs(pixels([image])[0] - pixels([same])[0]).max() <= 1 and isinstance(text, str)
    with pytest.raises(MarsError, match="Jacobi window"):
        pipe.generate_with_text("a red circle", jacobi_window=-1)


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "copy")
    again = MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu")
    a = pipe.generate("a red circle", seed=5)
    b = again.generate("a red circle", seed=5)
    assert np.array_equal(pixels(a)[0], pixels(b)[0])


def test_negative_prompts_one_for_all_or_one_each(pipe):
    prompts = ["a red circle", "一个蓝色的正方形"]
    plain = pipe.generate(prompts, seed=3, cfg_scale=3)
    same = pipe.generate(prompts, seed=3, cfg_scale=3, negative_prompt="")  # "" is the null prompt
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, same))
    one = pipe.generate(prompts, seed=3, cfg_scale=3, negative_prompt="a green star")
    each = pipe.generate(prompts, seed=3, cfg_scale=3, negative_prompt=["a green star", "a green star"])
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one, each))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(one, plain))
    two = pipe.generate(prompts[0], seed=3, cfg_scale=3, negative_prompt="a green star", num_images_per_prompt=2)
    assert np.array_equal(np.asarray(two[0]), np.asarray(one[0]))  # image i: seed 3 + i, same negative


@pytest.mark.parametrize("kwargs", [
    dict(prompts="ok", negative_prompt=["a", "b"]), dict(prompts="ok", negative_prompt="x" * 300),
    dict(prompts="ok", negative_prompt="a", cfg_scale=1.0),
])
def test_bad_negative_prompts_raise_one_line_errors(pipe, kwargs):
    with pytest.raises(MarsError) as err:
        pipe.generate(**kwargs)
    assert "\n" not in str(err.value)


def test_a_bad_negative_prompt_is_named_by_its_prompts_index(pipe):
    with pytest.raises(MarsError, match="negative prompt 2 is too long"):
        pipe.generate(["a", "b", "c"], negative_prompt=["", "a green star", "x" * 300])


@pytest.mark.parametrize("kwargs", [
    dict(prompts=""), dict(prompts=["ok", "   "]), dict(prompts=[]), dict(prompts="x" * 300),
    dict(prompts="ok", temperature=-1.0), dict(prompts="ok", top_p=0.0), dict(prompts="ok", top_p=1.01),
    dict(prompts="ok", cfg_scale=-0.5), dict(prompts="ok", top_k=-2), dict(prompts="ok", num_images_per_prompt=0),
    dict(prompts="ok", image_size=30), dict(prompts="ok", batch_size=0),
])
def test_bad_requests_raise_one_line_errors(pipe, kwargs):
    with pytest.raises(MarsError) as err:
        pipe.generate(**kwargs)
    assert "\n" not in str(err.value)


def test_bad_caption_requests(pipe, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for kwargs in (dict(images=tmp_path / "broken.png"), dict(images=[]), dict(images=tmp_path / "missing.png"),
                   dict(images=Image.new("RGB", (64, 64)), lang="fr"),
                   dict(images=Image.new("RGB", (64, 64)), max_new_tokens=10_000)):
        with pytest.raises(MarsError) as err:
            pipe.caption(**kwargs)
        assert "\n" not in str(err.value)


def test_generation_config_sets_the_models_sampling_defaults(tmp_path, tiny_model_dir):
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"cfg_scale": 2.5, "top_k": 7, "temperature": 0.8}')
    tuned = MarsPipeline.from_pretrained(folder, device="cpu")
    assert tuned.sampling_settings() == {"cfg_scale": 2.5, "top_k": 7, "top_p": 1.0, "temperature": 0.8}
    assert tuned.sampling_settings(cfg_scale=1.0)["cfg_scale"] == 1.0  # a given setting wins
    implicit = tuned.generate("a red circle", seed=3)
    explicit = tuned.generate("a red circle", seed=3, cfg_scale=2.5, top_k=7, top_p=1.0, temperature=0.8)
    assert np.array_equal(pixels(implicit)[0], pixels(explicit)[0])
    tuned.save_pretrained(tmp_path / "copy")  # the defaults travel with the model
    assert MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu").generation_config == tuned.generation_config
    for bad, message in (('{"cfg": 2}', "unknown key 'cfg'"), ('{"top_k": 1.5}', "top_k: expected an integer"),
                         ('{"top_p": 0}', "top_p must lie"), ("{oops", "cannot parse")):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(MarsError, match=message):
            MarsPipeline.from_pretrained(folder, device="cpu")


def test_guided_captions_follow_the_models_caption_defaults(tmp_path, tiny_model_dir, pipe):
    folder = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"cfg_scale": 2.5, "caption": {"cfg_scale": 3.0, '
                                                   '"plausibility": 0.05}}')
    tuned = MarsPipeline.from_pretrained(folder, device="cpu")
    assert tuned.caption_config == CaptionConfig(cfg_scale=3.0, plausibility=0.05)
    assert tuned.generation_config.cfg_scale == 2.5
    images = tuned.generate(["a red circle", "一个蓝色的正方形"], seed=1)
    # a guided caption: `<img> codes </img> instruction` against the instruction alone
    instruction = tuned.tokenizer.encode(CAPTION_INSTRUCTIONS["zh"])
    prefixes = [caption_prefix(tuned.model, c, instruction) for c in tuned.encode_images(images)]
    ids = generate_text(tuned.model, prefixes, None, tuned.tokenizer.eos_id, tuned.tokenizer.vocab_size, 8,
                        SampleConfig(temperature=0.0, cfg_scale=3.0), [instruction] * 2, plausibility=0.05)
    expected = [tuned.tokenizer.decode(t).strip() for t in ids]
    assert tuned.caption(images, lang="zh", max_new_tokens=8) == expected
    assert pipe.caption(images, lang="zh", max_new_tokens=8, cfg_scale=3.0, plausibility=0.05) == expected
    assert pipe.caption_config == CaptionConfig()  # a folder without the entry: no guidance
    assert tuned.caption(images, lang="zh", max_new_tokens=8, cfg_scale=1.0) == pipe.caption(images, lang="zh",
                                                                                              max_new_tokens=8)
    tuned.save_pretrained(tmp_path / "copy")  # the defaults travel with the model
    assert MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu").caption_config == tuned.caption_config
    (folder / "generation_config.json").write_text('{"caption": {"refine": 2}}')  # edit rounds by default
    edited = MarsPipeline.from_pretrained(folder, device="cpu")
    assert edited.caption_config == CaptionConfig(refine=2)
    assert edited.caption(images, lang="zh", max_new_tokens=8) == pipe.caption(images, lang="zh", max_new_tokens=8,
                                                                               refine=2)
    assert edited.caption(images, lang="zh", max_new_tokens=8, refine=0) == pipe.caption(images, lang="zh",
                                                                                         max_new_tokens=8)
    for bad, message in (('{"caption": {"scale": 2}}', "unknown key 'caption.scale'"),
                         ('{"caption": {"refine": -1}}', "refine must be an integer >= 0"),
                         ('{"caption": {"plausibility": 1.5}}', "plausibility must lie"),
                         ('{"caption": 2}', "caption must be a mapping")):
        (folder / "generation_config.json").write_text(bad)
        with pytest.raises(MarsError, match=message):
            MarsPipeline.from_pretrained(folder, device="cpu")


def test_loading_checks_the_folder(tmp_path, tiny_model_dir, tiny_builders):
    with pytest.raises(MarsError, match="model not found"):
        MarsPipeline.from_pretrained(tmp_path / "nothing")
    no_vq = tmp_path / "no-vq"
    shutil.copytree(tiny_model_dir, no_vq)
    shutil.rmtree(no_vq / "vq")
    with pytest.raises(MarsError, match="vq/"):
        MarsPipeline.from_pretrained(no_vq)
    wrong = tiny_builders.write_dir(tmp_path / "wrong-vq", tiny_builders.model(),
                                    tiny_builders.vq(codebook_size=128))
    with pytest.raises(MarsError, match="128 codes"):
        MarsPipeline.from_pretrained(wrong)


def test_default_dtype_and_device():
    from mars.pipeline import resolve_device, resolve_dtype

    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(MarsError):
        resolve_dtype("int3", torch.device("cpu"))
    if not torch.cuda.is_available():
        assert resolve_device(None).type == "cpu"
        with pytest.raises(MarsError):
            resolve_device("cuda")


@pytest.mark.gpu
def test_pipeline_on_cuda_in_bf16(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pipe = MarsPipeline.from_pretrained(tiny_model_dir)  # default: CUDA, bf16
    assert pipe.device.type == "cuda" and pipe.model.norm.weight.dtype == torch.bfloat16
    images = pipe.generate(["a red circle", "一个蓝色的正方形"], seed=0, compile=True)
    assert [im.size for im in images] == [(64, 64)] * 2
    # the default path on CUDA: eager step replayed as a CUDA graph, negative prompts included
    graphed = pipe.generate(["a red circle", "一个蓝色的正方形"], seed=0, cfg_scale=3.0,
                           negative_prompt="a blue square")
    assert [im.size for im in graphed] == [(64, 64)] * 2
    assert len(pipe.caption(images, max_new_tokens=4)) == 2
    # best of 3 keeps one of the three seeded candidates (scored in bf16 on the GPU)
    from mars.pipeline import RERANK_SEED_STRIDE
    kept = np.asarray(pipe.generate("a red circle", seed=4, rerank=3)[0], dtype=np.int16)
    options = [np.asarray(im, dtype=np.int16) for im in
               pipe.generate(["a red circle"] * 3, seed=[4 + k * RERANK_SEED_STRIDE for k in range(3)])]
    assert min(np.abs(kept - o).max() for o in options) <= 1


def test_prompt_order_reading_restates_position_prompts_before_the_model_reads_them(tmp_path, tiny_model_dir, pipe):
    folder = tmp_path / "reading"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "generation_config.json").write_text('{"cfg_scale": 2.0, "prompt_order": "reading"}')
    reading = MarsPipeline.from_pretrained(folder, device="cpu")
    assert (pipe.prompt_order, reading.prompt_order) == ("as-written", "reading")
    asked = ["a red circle to the right of a blue square", "一个红色的圆形在一个蓝色的正方形的下方", "a red circle"]
    restated = ["a blue square to the left of a red circle", "一个蓝色的正方形在一个红色的圆形的上方", "a red circle"]
    assert [reading.model_prompt(p) for p in asked] == restated
    assert [pipe.model_prompt(p) for p in asked] == asked
    # the same images as the restated prompts written out, and a different one for the prompt as written
    via_reading = pixels(reading.generate(asked, seed=5, cfg_scale=2.0))
    written_out = pixels(pipe.generate(restated, seed=5, cfg_scale=2.0))
    as_written = pixels(pipe.generate(asked[:1], seed=5, cfg_scale=2.0))
    assert all(np.array_equal(a, b) for a, b in zip(via_reading, written_out))
    assert not np.array_equal(via_reading[0], as_written[0])
    reading.save_pretrained(tmp_path / "copy")  # the convention travels with the model
    assert MarsPipeline.from_pretrained(tmp_path / "copy", device="cpu").prompt_order == "reading"
    (folder / "generation_config.json").write_text('{"prompt_order": "alphabetical"}')
    with pytest.raises(MarsError, match="prompt_order must be one of as-written, reading"):
        MarsPipeline.from_pretrained(folder, device="cpu")


def test_greedy_images_by_jacobi_decoding_are_the_greedy_images(pipe):
    prompts = ["a red circle", "一个蓝色的正方形"]
    want = pipe.generate(prompts, temperature=0.0, cfg_scale=2.0, negative_prompt=["", "a red star"])
    got = pipe.generate(prompts, temperature=0.0, cfg_scale=2.0, negative_prompt=["", "a red star"], jacobi_window=4)
    assert [np.asarray(a).tolist() for a in got] == [np.asarray(b).tolist() for b in want]
