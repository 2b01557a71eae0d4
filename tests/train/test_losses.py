"""The no-autograd text prefix of T2I gives the same loss and gradients as the full forward."""

from __future__ import annotations

import pytest
import torch

from mars.config import SemVIEConfig
from mars.data.sequences import IGNORE, build_i2t, build_t2i, collate_i2t, collate_t2i
from mars.model.semvie import SemVIE
from mars.train import parallel
from mars.train.losses import i2t_loss, mismatched_prompts, t2i_contrast_loss, t2i_loss, task_loss
from mars.train.stages import set_trainable, text_path_frozen


def _model(seed: int = 0) -> SemVIE:
    torch.manual_seed(seed)
    model = SemVIE(SemVIEConfig.from_name("debug"))
    with torch.no_grad():  # a visual side that differs from the text side, so routing matters
        for name, p in model.named_parameters():
            if ".visual." in name or name.endswith("new_weight"):
                p.add_(torch.randn_like(p) * 0.05)
    set_trainable(model, "stage1")
    return model


def _t2i_batch(model: SemVIE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (7, 3, 0, 11)]  # 0 = null prompt
    seqs = [build_t2i(vocab, p, torch.randint(0, vocab.image_size, (16,), generator=g)) for p in prompts]
    return collate_t2i(seqs, pad_id=256)


def _loss_and_grads(model, batch, prefix_no_grad):
    model.zero_grad(set_to_none=True)
    ce_sum, n = t2i_loss(model, batch, prefix_no_grad=prefix_no_grad)
    (ce_sum / n).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(ce_sum.detach() / n), n, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prefix_no_grad_equals_full_forward(checkpointing):
    model = _model()
    if checkpointing:
        parallel.apply_activation_checkpointing(model)
    batch = _t2i_batch(model)
    assert text_path_frozen(model)
    full_loss, full_n, full_grads = _loss_and_grads(model, batch, prefix_no_grad=False)
    fast_loss, fast_n, fast_grads = _loss_and_grads(model, batch, prefix_no_grad=True)
    assert fast_n == full_n == 4 * 17  # 16 codes + </img> per row
    assert fast_loss == pytest.approx(full_loss, rel=1e-6, abs=1e-6)
    assert full_grads.keys() == fast_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    # the gradient is real: the visual expert of every layer and the new rows receive some
    assert all(full_grads[k].abs().sum() > 0 for k in full_grads)


def test_prefix_loss_equals_plain_cross_entropy_of_model_forward():
    """Independent reference: `model(...)` logits over the whole sequence, cross-entropy with ignore."""
    model = _model(1)
    batch = _t2i_batch(model, seed=1)
    with torch.no_grad():
        logits = model(batch.input_ids, model.image_mask(batch.input_ids), pad_lengths=batch.pad_lengths)
        ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE)
        ce_sum, n = t2i_loss(model, batch, prefix_no_grad=True)
    assert float(ce_sum / n) == pytest.approx(float(ref), rel=1e-6)


def test_visual_vocab_loss_is_softmax_over_new_rows():
    model = _model(2)
    batch = _t2i_batch(model, seed=2)
    text = model.vocab.text_size
    with torch.no_grad():
        logits = model(batch.input_ids, model.image_mask(batch.input_ids), pad_lengths=batch.pad_lengths)[..., text:]
        keep = batch.targets != IGNORE
        ref = torch.nn.functional.cross_entropy(logits[keep], batch.targets[keep] - text)
        ce_sum, n = t2i_loss(model, batch, prefix_no_grad=True, vocab="visual")
    assert float(ce_sum / n) == pytest.approx(float(ref), rel=1e-6)


def test_i2t_loss_reaches_visual_expert_only_through_attention():
    model = _model(3)
    vocab = model.vocab
    seqs = [build_i2t(vocab, torch.arange(16) + 3 * i, [10, 11], [20 + i, 30, 40], 256) for i in range(3)]
    batch = collate_i2t(seqs, pad_id=256)
    ce_sum, n = i2t_loss(model, batch)
    assert n == 3 * 4  # caption (3) + eos per row
    ce_sum.backward()
    visual = [p.grad for name, p in model.named_parameters() if ".visual." in name and "qkv.weight" in name]
    assert all(g is not None and g.abs().sum() > 0 for g in visual)
    assert all(p.grad is None for name, p in model.named_parameters() if ".text." in name)


# --- the prompt-contrast term ------------------------------------------------------------------


def test_mismatched_prompts_borrow_the_previous_rows_prompt_and_skip_null_pairs():
    model = _model(4)
    batch = _t2i_batch(model, seed=4)  # prompt lengths 7, 3, 0 (null), 11
    negative, valid = mismatched_prompts(batch)
    P = batch.prefix_len
    assert torch.equal(negative.input_ids[:, :P], batch.input_ids[[3, 0, 1, 2], :P])
    assert torch.equal(negative.input_ids[:, P:], batch.input_ids[:, P:])  # same images
    assert torch.equal(negative.pad_lengths, batch.pad_lengths[[3, 0, 1, 2]])
    # row 2 has the null prompt, row 3 would borrow it: neither pairs
    assert valid.tolist() == [True, True, False, False]
    _, alone = mismatched_prompts(collate_t2i([build_t2i(model.vocab, [5, 6], torch.arange(16))], pad_id=256))
    assert not alone.any()


def test_counterfactual_prompts_replace_the_borrowed_prompt_where_a_row_has_one():
    model = _model(4)
    g = torch.Generator().manual_seed(4)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    negatives = [[1, 2, 30], None, [6, 7, 8, 9, 10, 11]]  # row 1 has none; row 2's is the longest
    chinese = [False, False, True]
    seqs = [build_t2i(model.vocab, p, torch.randint(0, 256, (16,), generator=g), n, chinese=zh)
            for p, n, zh in zip(prompts, negatives, chinese)]
    batch = collate_t2i(seqs, pad_id=256)
    P = batch.prefix_len
    assert batch.chinese_rows.tolist() == chinese
    assert P == 6 and batch.pad_lengths.tolist() == [3, 4, 2] and batch.negative_pad_lengths.tolist() == [3, 6, 0]
    other, valid = mismatched_prompts(batch)
    assert other.input_ids[0, 3:P].tolist() == [1, 2, 30] and other.input_ids[2, :P].tolist() == [6, 7, 8, 9, 10, 11]
    assert torch.equal(other.input_ids[1, :P], batch.input_ids[0, :P])  # no counterfactual: the previous row's
    assert other.pad_lengths.tolist() == [3, 3, 0] and valid.all()
    assert torch.equal(other.input_ids[:, P:], batch.input_ids[:, P:])
    codes = [s.ids[len(p) + 1:-1] - model.vocab.image_offset for s, p in zip(seqs, prompts)]
    with torch.no_grad():
        parts = t2i_contrast_loss(model, batch, margin=3.0)
    others = [negatives[0], prompts[0], negatives[2]]
    gaps = [_row_nll(model, o, c) - _row_nll(model, p, c) for o, p, c in zip(others, prompts, codes)]
    assert parts.num_pairs == 3 and parts.gap_sum == pytest.approx(sum(gaps), rel=1e-4, abs=1e-4)
    # rows 0 and 2 used their counterfactual prompts, row 1 the borrowed one
    assert parts.num_counterfactual == 2
    assert parts.counterfactual_gap_sum == pytest.approx(gaps[0] + gaps[2], rel=1e-4, abs=1e-4)
    assert parts.num_counterfactual_zh == 1  # row 2's caption is Chinese
    assert parts.counterfactual_gap_sum_zh == pytest.approx(gaps[2], rel=1e-4, abs=1e-4)


def _row_nll(model, prompt: list[int], codes: torch.Tensor) -> float:
    """NLL of one image after one prompt, through a freshly collated one-row batch."""
    with torch.no_grad():
        ce_sum, _ = t2i_loss(model, collate_t2i([build_t2i(model.vocab, prompt, codes)], pad_id=256), prefix_no_grad=True)
    return float(ce_sum)


def test_contrast_parts_match_separately_scored_rows():
    model = _model(5)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (4, 9, 6)]
    codes = [torch.randint(0, model.vocab.image_size, (16,), generator=g) for _ in prompts]
    batch = collate_t2i([build_t2i(model.vocab, p, c) for p, c in zip(prompts, codes)], pad_id=256)
    with torch.no_grad():
        parts = t2i_contrast_loss(model, batch, margin=3.0)
        plain, n = t2i_loss(model, batch, prefix_no_grad=True)
    assert parts.num_tokens == n and float(parts.ce_sum) == pytest.approx(float(plain), rel=1e-5)
    gaps = [_row_nll(model, prompts[b - 1], codes[b]) - _row_nll(model, prompts[b], codes[b]) for b in range(3)]
    assert parts.num_pairs == 3 and parts.gap_sum == pytest.approx(sum(gaps), rel=1e-4, abs=1e-4)
    softplus = sum(float(torch.nn.functional.softplus(torch.tensor(3.0 - gap))) for gap in gaps)
    assert float(parts.contrast_sum) == pytest.approx(softplus, rel=1e-4)


def test_a_step_on_the_contrast_term_widens_the_prompt_gap():
    model = _model(6)
    batch = _t2i_batch(model, seed=6)
    before = t2i_contrast_loss(model, batch, margin=50.0)
    before.contrast_sum.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".visual." in n)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
        after = t2i_contrast_loss(model, batch, margin=50.0)
    assert after.gap_sum > before.gap_sum


# --- distillation from a teacher ---------------------------------------------------------------


def _reference_kl(student, teacher, batch, image_mask, pad_lengths=None, text_cols: int = 0) -> float:
    """KL(teacher || student) summed over the target positions, from full `model(...)` forwards."""
    keep = batch.targets != IGNORE
    with torch.no_grad():
        s, t = (m(batch.input_ids, image_mask, pad_lengths=pad_lengths)[keep][:, text_cols:].log_softmax(-1)
                for m in (student, teacher))
    return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="sum"))


@pytest.mark.parametrize("vocab", ["full", "visual"])
def test_distill_term_is_the_teachers_kl_computed_by_full_forwards(vocab):
    student, teacher = _model(7), _model(8)
    batch = _t2i_batch(student, seed=7)
    mask = student.image_mask(batch.input_ids)
    text_cols = student.vocab.text_size if vocab == "visual" else 0
    reference = _reference_kl(student, teacher, batch, mask, batch.pad_lengths, text_cols)
    assert reference > 0.1
    with torch.no_grad():
        plain = task_loss(student, batch, vocab=vocab)
        parts = task_loss(student, batch, vocab=vocab, teacher=teacher)
        contrast = t2i_contrast_loss(student, batch, margin=3.0, vocab=vocab, teacher=teacher)
    assert plain.distill_sum is None and float(parts.ce_sum) == pytest.approx(float(plain.ce_sum), rel=1e-6)
    assert float(parts.distill_sum) == pytest.approx(reference, rel=1e-4)
    assert float(contrast.distill_sum) == pytest.approx(reference, rel=1e-4)  # the true rows only
    seqs = [build_i2t(student.vocab, torch.arange(16) + 3 * i, [10, 11], [20 + i, 30, 40], 256) for i in range(3)]
    i2t = collate_i2t(seqs, pad_id=256)
    with torch.no_grad():
        parts = task_loss(student, i2t, teacher=teacher)
    assert float(parts.distill_sum) == pytest.approx(_reference_kl(student, teacher, i2t, i2t.image_mask), rel=1e-4)


def test_distill_term_can_skip_the_rows_with_a_counterfactual_prompt():
    student, teacher = _model(5), _model(6)
    g = torch.Generator().manual_seed(5)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    negatives = [[1, 2, 30], None, [6, 7, 8, 10]]  # rows 0 and 2 have a counterfactual
    seqs = [build_t2i(student.vocab, p, torch.randint(0, 256, (16,), generator=g), n) for p, n in zip(prompts, negatives)]
    batch = collate_t2i(seqs, pad_id=256)
    alone = collate_t2i([seqs[1]], pad_id=256)  # row 1 by itself
    row_1 = _reference_kl(student, teacher, alone, student.image_mask(alone.input_ids), alone.pad_lengths)
    everything = _reference_kl(student, teacher, batch, student.image_mask(batch.input_ids), batch.pad_lengths)
    teacher_rows = []  # rows of each teacher forward
    forward_hidden = teacher.forward_hidden
    teacher.forward_hidden = lambda ids, *args, **kwargs: (teacher_rows.append(ids.shape[0]),
                                                           forward_hidden(ids, *args, **kwargs))[1]
    with torch.no_grad():
        pulled = t2i_contrast_loss(student, batch, margin=3.0, teacher=teacher)
        skipped = t2i_contrast_loss(student, batch, margin=3.0, teacher=teacher, skip_counterfactual_distill=True)
    assert float(pulled.distill_sum) == pytest.approx(everything, rel=1e-4)
    assert float(skipped.distill_sum) == pytest.approx(row_1, rel=1e-4) and 0 < row_1 < everything
    assert float(skipped.ce_sum) == pytest.approx(float(pulled.ce_sum), rel=1e-6)  # the rest is unchanged
    assert set(teacher_rows) == {3, 1}  # the skipped rows are not run through the teacher
    all_skipped = collate_t2i([seqs[0], seqs[2]], pad_id=256)
    teacher_rows.clear()
    with torch.no_grad():
        none_left = t2i_contrast_loss(student, all_skipped, margin=3.0, teacher=teacher,
                                      skip_counterfactual_distill=True)
    assert float(none_left.distill_sum) == 0.0 and teacher_rows == []


def test_distill_term_from_the_students_own_weights_is_zero_and_pulls_nothing():
    import copy

    student = _model(9)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    parts = task_loss(student, _t2i_batch(student, seed=9), teacher=teacher)
    assert abs(float(parts.distill_sum.detach())) < 1e-4
    parts.distill_sum.backward()  # d KL / d student logits = p_student - p_teacher = 0
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5
