"""2-D image positions (`image_positions: 2d`): codes rotate by row and column, text exactly as in 1-D."""

import pytest
import torch

from mars import MarsPipeline
from mars.config import SemVIEConfig
from mars.data.sequences import build_t2i, collate_t2i
from mars.errors import MarsError
from mars.generate import SampleConfig, generate_image_tokens
from mars.model.semvie import NO_IMAGE, SemVIE, apply_rope, blend_rope, image_positions_2d, rope_cos_sin
from mars.train.losses import t2i_loss


def test_codes_sit_on_the_grid_and_text_after_the_image_continues_past_it():
    positions = torch.arange(9)[None].expand(2, 9)  # row 0: text text <img> c0 c1 c2 c3 </img> text
    got = image_positions_2d(positions, torch.tensor([2, NO_IMAGE]), grid=2)
    rows, columns = got[0, :, 0].tolist(), got[0, :, 1].tolist()
    assert rows == [0, 1, 2, 3, 3, 4, 4, 5, 6]
    assert columns == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    assert torch.equal(got[1], torch.stack([positions[1], positions[1]], -1))  # no image: 1-D on both axes


def test_equal_row_and_column_rotate_exactly_as_one_position():
    positions = torch.tensor([[0, 3, 17, 250]])
    one = rope_cos_sin(positions, 16, 10000.0)
    two = rope_cos_sin(torch.stack([positions, positions], -1), 16, 10000.0)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    moved = rope_cos_sin(torch.stack([positions, positions + 1], -1), 16, 10000.0)[0][0, 0]  # (T, D)
    half = moved.shape[-1] // 2
    assert torch.equal(moved[:, 0:half:2], one[0][0, 0, :, 0:half:2])  # even pairs follow the row
    assert not torch.equal(moved[:, 1:half:2], one[0][0, 0, :, 1:half:2])  # odd pairs the column


@pytest.fixture
def pair(tiny_builders):
    """The same random weights with 1-D and with 2-D image positions."""
    one = tiny_builders.model(seed=3)
    two = SemVIE(SemVIEConfig(**{**one.config.__dict__, "image_positions": "2d"})).eval()
    two.load_state_dict(one.state_dict())
    return one, two


def test_text_is_unchanged_and_images_are_not(pair):
    one, two = pair
    text = torch.randint(0, 200, (2, 7))
    with torch.no_grad():
        assert torch.equal(one.forward_hidden(text, False), two.forward_hidden(text, False))
        vocab = one.vocab
        image = torch.cat([text, torch.full((2, 1), vocab.boi_id), vocab.codes_to_ids(torch.randint(0, 50, (2, 16)))], 1)
        mask = one.image_mask(image)
        h1, h2 = one.forward_hidden(image, mask), two.forward_hidden(image, mask)
    assert torch.equal(h1[:, :8], h2[:, :8])  # up to <img>: the same positions
    assert not torch.allclose(h1[:, 9:], h2[:, 9:])  # codes after the first: on the grid


def test_blended_tables_rotate_by_the_mix_of_the_two_rotations():
    line = rope_cos_sin(torch.tensor([[4, 9, 30]]), 16, 10000.0)
    grid = rope_cos_sin(torch.tensor([[[4, 4], [5, 7], [6, 6]]]), 16, 10000.0)
    x = torch.randn(1, 2, 3, 16)  # (B, H, T, D)
    mixed = apply_rope(x, *blend_rope(line, grid, 0.3))
    assert torch.allclose(mixed, 0.7 * apply_rope(x, *line) + 0.3 * apply_rope(x, *grid), atol=1e-6)


def test_a_2d_model_blended_to_0_is_the_1d_model_and_moves_smoothly_to_1(pair):
    one, two = pair
    vocab = one.vocab
    image = torch.cat([torch.randint(0, 200, (2, 5)), torch.full((2, 1), vocab.boi_id),
                       vocab.codes_to_ids(torch.randint(0, 50, (2, 16)))], 1)
    mask = one.image_mask(image)
    with torch.no_grad():
        h_line, h_grid = one.forward_hidden(image, mask), two.forward_hidden(image, mask)
        distances = []
        for blend in (0.0, 0.01, 0.1, 1.0):
            two.image_position_blend = blend
            distances.append((two.forward_hidden(image, mask) - h_line).abs().max().item())
    assert distances[0] < 1e-5  # blend 0: the rotations of the 1-D model
    assert distances[0] < distances[1] < distances[2]  # moving away with the blend, from 0 on
    assert distances[1] < 0.1 * distances[3]  # 1 % of the way moves far less than all of it
    assert torch.allclose(two.forward_hidden(image, mask), h_grid, atol=0)  # blend 1: the 2-D model


def test_the_training_prefix_cache_gives_the_full_forward_loss(pair):
    _, two = pair
    vocab = two.vocab
    samples = [build_t2i(vocab, prompt, torch.randint(0, 50, (16,))) for prompt in ([5, 6, 7], [8], [])]
    batch = collate_t2i(samples, pad_id=0)  # left padded, one null prompt
    with torch.no_grad():
        cached = t2i_loss(two, batch, prefix_no_grad=True)[0]
        full = t2i_loss(two, batch, prefix_no_grad=False)[0]
    assert cached.item() == pytest.approx(full.item(), rel=1e-5)


def test_a_2d_model_draws_its_own_grid_only(tiny_builders, tmp_path):
    model = tiny_builders.model(image_positions="2d")
    too_many = model.config.image_tokens + 1
    with pytest.raises(MarsError, match="at most 16 codes"):
        generate_image_tokens(model, [[5]], None, too_many, SampleConfig(temperature=0.0, cfg_scale=1.0))
    directory = tiny_builders.write_dir(tmp_path / "m", model, tiny_builders.vq())
    pipe = MarsPipeline.from_pretrained(directory)
    assert pipe.model.config.image_positions == "2d"  # saved and loaded
    with pytest.raises(MarsError, match="draws 64 px images only"):
        pipe.generate("a red circle", image_size=128)
    assert len(pipe.generate("a red circle", image_size=64)) == 1


def test_unknown_image_positions_are_refused():
    with pytest.raises(MarsError, match="image_positions must be 1d or 2d"):
        SemVIEConfig(image_positions="3d")
