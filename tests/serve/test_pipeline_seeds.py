"""`MarsPipeline.generate(seed=[...])`: one seed per image, which the server's batches rely on."""

from __future__ import annotations

import numpy as np
import pytest

from mars.errors import MarsError


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.int16) for im in images]


def test_a_seed_list_gives_each_image_its_own_seed(tiny_pipeline):
    prompts = ["a red circle", "一个蓝色的正方形", "a red circle"]
    together = tiny_pipeline.generate(prompts, seed=[11, 3, 12], batch_size=2, top_k=50)
    for got, prompt, seed in zip(pixels(together), prompts, [11, 3, 12]):
        alone = pixels(tiny_pipeline.generate(prompt, seed=seed, top_k=50))[0]
        assert np.abs(got - alone).max() <= 1  # same codes; the VQ decoder may round one level apart
    assert np.abs(pixels(together)[0] - pixels(together)[2]).max() > 10  # same prompt, other seed


def test_an_int_seed_means_seed_plus_i(tiny_pipeline):
    prompts = ["a", "b"]
    as_int = pixels(tiny_pipeline.generate(prompts, seed=5, num_images_per_prompt=2))
    as_list = pixels(tiny_pipeline.generate(prompts, seed=[5, 6, 7, 8], num_images_per_prompt=2))
    for a, b in zip(as_int, as_list):
        np.testing.assert_array_equal(a, b)


def test_a_seed_list_must_have_one_seed_per_image(tiny_pipeline):
    with pytest.raises(MarsError, match="3 seeds given for 2 images"):
        tiny_pipeline.generate(["a", "b"], seed=[1, 2, 3])
