"""Training sequences: layouts token by token, padding, masks, and the deterministic task mixer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mars.config import SemVIEConfig
from mars.data.sequences import (IGNORE, INSTRUCTION_EN, INSTRUCTION_ZH, SequenceBuilder, StepBatches,
                                 build_i2t, build_lm, build_t2i, collate_i2t, collate_lm, collate_t2i)
from mars.errors import MarsError
from mars.model.semvie import SemVIE
from mars.text_tokenizer import ByteTokenizer, load_text_tokenizer
from mars.vocab import MultimodalVocab

VOCAB = MultimodalVocab(text_size=384, image_size=256)  # the `debug` preset's vocabulary
EOS = ByteTokenizer.eos_id
N_CODES = 16  # a 4 x 4 grid



def sample(i: int, zh: bool = True) -> dict:
    """A code-shard sample as CodeShardDataset returns it (byte-level text)."""
    tok = ByteTokenizer()
    text, text_zh = f"shape number {i}" + "!" * (i % 3), f"第{i}个形状"
    return {"codes": torch.arange(N_CODES) * 7 % 256 + i, "key": f"k{i}", "text": text, "text_ids": tok.encode(text),
            "text_zh": text_zh if zh else None, "text_zh_ids": tok.encode(text_zh) if zh else None}


def predicted(input_ids: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    """Per row, the tokens that carry a loss, read from the inputs: input_ids[t + 1] where targets[t] is set."""
    rows = []
    for ids, tgt in zip(input_ids, targets):
        t = (tgt != IGNORE).nonzero().flatten()
        assert torch.equal(tgt[t], ids[t + 1]), "targets must be the next input token"
        rows.append(ids[t + 1].tolist())
    return rows


def test_t2i_layout_and_left_padding():
    prompts = [[5, 6, 7], [], [9], [1, 2, 3, 4, 5]]  # [] = the null prompt
    codes = [sample(i)["codes"] for i in range(4)]
    batch = collate_t2i([build_t2i(VOCAB, p, c) for p, c in zip(prompts, codes)], pad_id=EOS)
    P = 5
    assert batch.prefix_len == P and batch.input_ids.shape == (4, P + N_CODES + 2)
    assert batch.pad_lengths.tolist() == [2, 5, 4, 0]
    for b, (prompt, c) in enumerate(zip(prompts, codes)):
        pad = batch.pad_lengths[b]
        row = batch.input_ids[b].tolist()
        assert row == [EOS] * pad + prompt + [VOCAB.boi_id] + (c + VOCAB.image_offset).tolist() + [VOCAB.eoi_id]
    assert (batch.input_ids[:, P] == VOCAB.boi_id).all() and (batch.input_ids[:, -1] == VOCAB.eoi_id).all()
    assert batch.input_ids[1, :P].tolist() == [EOS] * P  # the null-prompt row starts with <img> after padding
    # Loss on the codes and </img> only: every predicted token is visual, none of prompt or <img>.
    for b, row in enumerate(predicted(batch.input_ids, batch.targets)):
        assert row == (codes[b] + VOCAB.image_offset).tolist() + [VOCAB.eoi_id]
    assert (batch.targets[:, :P] == IGNORE).all() and (batch.targets[:, -1] == IGNORE).all()
    # Columns < P are text (or padding) and route to the text expert; columns >= P are all visual.
    assert not VOCAB.is_visual(batch.input_ids[:, :P]).any()
    assert VOCAB.is_visual(batch.input_ids[:, P:]).all()
    assert torch.equal(batch.image_mask, VOCAB.is_visual(batch.input_ids))


def test_t2i_left_padding_matches_the_model():
    """A padded row gives the model the same logits as the row alone: pad_lengths is what SemVIE expects."""
    cfg = SemVIEConfig.from_name("debug")
    torch.manual_seed(0)
    tiny_model = SemVIE(cfg).eval()
    vocab = MultimodalVocab.from_config(cfg)
    seqs = [build_t2i(vocab, p, sample(i)["codes"]) for i, p in enumerate([[72, 105], [], [65, 66, 67, 68]])]
    batch = collate_t2i(seqs, pad_id=EOS)
    with torch.no_grad():
        logits = tiny_model(batch.input_ids, batch.image_mask, pad_lengths=batch.pad_lengths)  # (B, T, V)
        for b, s in enumerate(seqs):
            alone = tiny_model(s.ids[None], s.visual[None])[0]  # (L, V)
            torch.testing.assert_close(logits[b, batch.pad_lengths[b]:], alone, atol=1e-5, rtol=1e-5)


def test_i2t_and_lm_layouts_right_padding():
    tok = ByteTokenizer()
    instr = tok.encode(INSTRUCTION_EN)
    captions = [tok.encode(" a red circle"), tok.encode(" two stars, both blue")]
    codes = [sample(0)["codes"], sample(1)["codes"]]
    batch = collate_i2t([build_i2t(VOCAB, c, instr, cap, EOS) for c, cap in zip(codes, captions)], pad_id=EOS)
    n = N_CODES + 2
    assert batch.input_ids.shape == (2, n + len(instr) + len(captions[1]) + 1)
    for b, (c, cap) in enumerate(zip(codes, captions)):
        length = n + len(instr) + len(cap) + 1
        row = batch.input_ids[b].tolist()
        assert row[:length] == [VOCAB.boi_id, *(c + VOCAB.image_offset).tolist(), VOCAB.eoi_id, *instr, *cap, EOS]
        assert row[length:] == [EOS] * (batch.input_ids.shape[1] - length)
        assert (batch.targets[b, length - 1:] == IGNORE).all()  # nothing after eos, padding has no loss
    assert predicted(batch.input_ids, batch.targets) == [cap + [EOS] for cap in captions]
    assert torch.equal(batch.image_mask, VOCAB.is_visual(batch.input_ids))
    assert batch.image_mask[:, :n].all() and not batch.image_mask[:, n:].any()

    lm = collate_lm([build_lm(cap, EOS) for cap in captions], pad_id=EOS)
    assert lm.input_ids[0].tolist() == captions[0] + [EOS] * (len(captions[1]) - len(captions[0]) + 1)
    assert predicted(lm.input_ids, lm.targets) == [cap[1:] + [EOS] for cap in captions]
    assert not VOCAB.is_visual(lm.input_ids).any()


def test_t2i_batch_needs_one_grid_size():
    with pytest.raises(MarsError, match="same number of image codes"):
        collate_t2i([build_t2i(VOCAB, [1], torch.zeros(16)), build_t2i(VOCAB, [1], torch.zeros(4))], pad_id=EOS)


@pytest.fixture(scope="module")
def qwen():
    return load_text_tokenizer("qwen")


def test_builder_languages_round_trip_through_qwen(qwen):
    vocab = MultimodalVocab(text_size=151936, image_size=256)
    english, chinese = "a red circle above a blue square", "一个红色的圆形在一个蓝色的正方形上面"
    data = [{"codes": torch.arange(N_CODES), "key": "a", "text": english, "text_ids": qwen.encode(english),
             "text_zh": chinese, "text_zh_ids": qwen.encode(chinese)}]
    zh_builder = SequenceBuilder(vocab, qwen, null_prompt_prob=0.0, zh_prob=1.0)
    t2i = collate_t2i([zh_builder.t2i(data[0], np.random.default_rng(0))], zh_builder.pad_id)
    assert qwen.decode(t2i.input_ids[0, :t2i.prefix_len].tolist()) == data[0]["text_zh"]
    i2t = collate_i2t([zh_builder.i2t(data[0], np.random.default_rng(0))], zh_builder.pad_id)
    text = i2t.input_ids[0, N_CODES + 2:].tolist()
    assert qwen.decode(text) == INSTRUCTION_ZH + data[0]["text_zh"]
    assert predicted(i2t.input_ids, i2t.targets)[0] == data[0]["text_zh_ids"] + [qwen.eos_id]

    en_builder = SequenceBuilder(vocab, qwen, null_prompt_prob=0.0, zh_prob=0.0)
    i2t = collate_i2t([en_builder.i2t(data[0], np.random.default_rng(0))], en_builder.pad_id)
    assert qwen.decode(i2t.input_ids[0, N_CODES + 2:].tolist()) == f"{INSTRUCTION_EN} {data[0]['text']}"
    caption = predicted(i2t.input_ids, i2t.targets)[0]
    assert caption[-1] == qwen.eos_id and qwen.decode(caption[:-1]) == " " + data[0]["text"]
    assert caption[:-1] == qwen.encode(" " + data[0]["text"])  # tokenised apart from the instruction


def test_builder_probabilities_and_fallbacks():
    data = [sample(i, zh=i % 2 == 0) for i in range(40)]
    builder = SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=0.25, zh_prob=0.5, seed=3)
    null = zh = en = 0
    for step in range(50):
        _, batch = builder.batch(data, step, batch_size=8)
        for b in range(8):
            prompt = batch.input_ids[b, batch.pad_lengths[b]:batch.prefix_len].tolist()
            text = ByteTokenizer().decode(prompt)
            null += prompt == []
            zh += text.startswith("第")
            en += text.startswith("shape")
    # 400 rows: 25% null prompts; of the rest, half of those with a Chinese caption (half the data) are Chinese.
    assert null + zh + en == 400
    assert 70 <= null <= 130 and 50 <= zh <= 100 and en > 2 * zh
    only_en = SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=0.0, zh_prob=1.0)
    seq = only_en.t2i(sample(1, zh=False), np.random.default_rng(0))  # no Chinese caption: English
    assert ByteTokenizer().decode(seq.ids[:seq.prefix_len].tolist()) == sample(1)["text"]


def test_builder_adds_counterfactual_prompts_in_the_rows_language_with_the_same_plain_stream():
    data = [sample(i) for i in range(8)]
    swaps = [["shape", "form"], ["个", "只"]]
    plain = SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=0.25, seed=1)
    hard = SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=0.25, seed=1, contrast_swaps=swaps)
    _, a = plain.batch(data, 0, batch_size=8)
    _, b = hard.batch(data, 0, batch_size=8)
    P = b.prefix_len  # the counterfactual prompts share the real prompts' left padding
    assert a.negative_prompts is None and b.negative_prompts.shape == (8, P)
    for row in range(8):
        own = ByteTokenizer().decode(b.input_ids[row, b.pad_lengths[row]:P].tolist())
        assert own == ByteTokenizer().decode(a.input_ids[row, a.pad_lengths[row]:a.prefix_len].tolist())
        other = ByteTokenizer().decode(b.negative_prompts[row, b.negative_pad_lengths[row]:].tolist())
        if own == "":  # a null prompt has no counterfactual
            assert b.negative_pad_lengths[row] == P
        else:
            assert other == own.replace("shape", "form").replace("个", "只")
    assert (b.negative_pad_lengths < P).sum() >= 4
    # only at the steps where the contrast term runs: none on the loader's path afterwards
    first_only = SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=0.25, seed=1, contrast_swaps=swaps,
                                 counterfactual_at=lambda step: step < 1)
    assert first_only.batch(data, 0, batch_size=8)[1].has_negative_prompt.sum() >= 4
    _, later = first_only.batch(data, 1, batch_size=8)
    assert later.negative_prompts is None and not later.has_negative_prompt.any()


def test_batches_are_a_function_of_seed_step_rank():
    data = [sample(i) for i in range(12)]

    def builder(seed=0):
        return SequenceBuilder(VOCAB, ByteTokenizer(), t2i_weight=2.0, i2t_weight=1.0, lm_weight=1.0, seed=seed)

    a, b = builder(), builder()
    for step in (0, 7, 3):  # any order, any instance: same batch
        ta, ba = a.batch(data, step, 4, rank=1, world_size=2)
        tb, bb = b.batch(data, step, 4, rank=1, world_size=2)
        assert ta == tb and torch.equal(ba.input_ids, bb.input_ids) and torch.equal(ba.targets, bb.targets)
    assert [a.task(s) for s in range(20)] != [builder(seed=1).task(s) for s in range(20)]
    tasks = [a.task(s) for s in range(400)]
    assert 150 <= tasks.count("t2i") <= 250 and tasks.count("i2t") > 50 and tasks.count("lm") > 50

    # Two ranks x 3 steps x 2 rows = one epoch of 12: every sample exactly once, then a new order.
    epoch = [i for step in range(3) for rank in range(2) for i in a.indices(step, 2, 12, rank, 2)]
    assert sorted(epoch) == list(range(12))
    second = [i for step in range(3, 6) for rank in range(2) for i in a.indices(step, 2, 12, rank, 2)]
    assert sorted(second) == list(range(12)) and second != epoch

    # A DataLoader over StepBatches resumes at any step with the same batches.
    steps = StepBatches(a, data, batch_size=4, num_steps=10)
    resumed = list(DataLoader(steps, batch_size=None, sampler=range(6, 10)))
    for step, (task, batch) in zip(range(6, 10), resumed):
        want_task, want = b.batch(data, step, 4)
        assert task == want_task and torch.equal(batch.input_ids, want.input_ids)


def test_an_epoch_pool_is_walked_like_the_dataset_with_repeats():
    data = [sample(i) for i in range(6)]
    pool = np.array([0, 1, 2, 3, 4, 5, 2, 2, 5])  # samples 2 and 5 oversampled
    builder = SequenceBuilder(VOCAB, ByteTokenizer(), epoch_pool=pool)
    # 3 steps x 3 rows = one epoch of the pool: each slot once, so sample 2 three times, 5 twice
    epoch = [i for step in range(3) for i in builder.indices(step, 3, len(data))]
    assert sorted(epoch) == sorted(pool.tolist())
    second = [i for step in range(3, 6) for i in builder.indices(step, 3, len(data))]
    assert sorted(second) == sorted(pool.tolist()) and second != epoch
    plain = SequenceBuilder(VOCAB, ByteTokenizer())
    assert sorted(i for step in range(2) for i in plain.indices(step, 3, len(data))) == list(range(6))


def test_builder_rejects_bad_settings():
    with pytest.raises(MarsError, match="task weights"):
        SequenceBuilder(VOCAB, ByteTokenizer(), t2i_weight=0.0)
    with pytest.raises(MarsError, match="null_prompt_prob"):
        SequenceBuilder(VOCAB, ByteTokenizer(), null_prompt_prob=1.5)
    with pytest.raises(MarsError, match="text rows"):
        SequenceBuilder(MultimodalVocab(text_size=100, image_size=256), ByteTokenizer())
