"""Per-task training losses: T2I (with the no-autograd text prefix), I2T, text LM, and DPO on
preference pairs.

Each function returns the sum of token cross-entropies and the number of loss tokens first
(`task_loss`: a `LossParts`; `t2i_contrast_loss`: a `ContrastParts`), so the trainer can
normalise by the token count of the whole global batch (all micro-batches, all ranks) and get the
same loss and gradients however the batch is split. `dpo_loss` (a `PreferenceParts`) sums over
pairs instead, and the trainer normalises by the global batch's pairs.

Logits are computed only at positions that carry a target (`targets != -100`). The softmax runs
over the full multimodal vocabulary by default: that is the faithful objective (the model must
also learn not to emit text inside an image). `vocab="visual"` restricts T2I to the new rows
(image codes + specials), which matches inference (it samples among image ids only) and skips the
151,936 text rows of the head; it is an option, not the default.

`t2i_contrast_loss` adds an optional prompt-contrast term (in the spirit of condition contrastive
alignment, Chen et al. 2024): each image is also scored after another row's prompt, and the model is
pushed to find it `margin` nats less likely there than after its own prompt. Plain likelihood
training learns to read the prompt only through the few tokens where it matters (an object's first
codes); this term trains exactly that dependence.

With a `teacher` (another MARS model over the same vocabulary, frozen), the losses also return
`distill_sum`: the KL divergence KL(teacher || student) of the next-token distributions, summed over
the same loss positions (knowledge distillation, Hinton et al. 2015). It carries the teacher's whole
distribution at every position, not one sampled token, so a student whose architecture changed
(e.g. `image_positions: 2d` on a 1-D model) can be pulled back to what the teacher drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mars.data.sequences import IGNORE, I2TBatch, LMBatch, T2IBatch
from mars.model.semvie import KVCache


class PrefixKVCache(KVCache):
    """A KV cache holding the K/V of a frozen text prefix (slots [0, P)), filled without autograd.

    After `freeze()`, `update` does not write in place: it returns the prefix K/V concatenated with
    the new ones, so the suffix forward is a pure function of its inputs (safe for autograd,
    activation checkpointing and torch.compile) and reads the prefix from the cache.
    """

    def __init__(self, config, batch_size: int, prefix_len: int, total_len: int, device, dtype, pad_lengths):
        super().__init__(config, batch_size, total_len, device=device, dtype=dtype, pad_lengths=pad_lengths)
        self.prefix_len = prefix_len
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if not self.frozen:
            return super().update(layer, input_pos, k, v)
        P = self.prefix_len  # the suffix occupies slots [P, T) in order
        k_all = torch.cat([self.k[layer][:, :, :P].to(k.dtype), k], dim=2)  # (B, Hkv, T, D)
        v_all = torch.cat([self.v[layer][:, :, :P].to(v.dtype), v], dim=2)
        return k_all, v_all


def target_logits(model, hidden: torch.Tensor, targets: torch.Tensor, rows: slice | None = None):
    """Logits (N, V) at the N positions of `hidden` (B, T, C) whose target is set, in row-major
    order, and those targets (N,). `rows` restricts the vocabulary to a slice (targets must all lie
    in it; they are returned as indices into it)."""
    keep = targets != IGNORE  # (B, T)
    y = targets[keep]  # (N,)
    logits = model.logits(hidden[keep], rows)  # (N, V) or (N, |rows|)
    if rows is not None:
        y = y - rows.start
    return logits, y


def loss_rows(targets: torch.Tensor) -> torch.Tensor:
    """(N,) the row of each of `target_logits`' N positions, for targets (B, T)."""
    return torch.nonzero(targets != IGNORE)[:, 0]


def kl_per_position(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(teacher || student) of the two (N, V) logit rows' softmaxes, in nats."""
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1)


def _visual_rows(model, vocab: str) -> slice | None:
    return slice(model.vocab.text_size, model.vocab.size) if vocab == "visual" else None


def _t2i_suffix_hidden(model, batch: T2IBatch, cache_dtype) -> torch.Tensor:
    """Hidden states of columns [P, T) (B, T-P, C), the text prefix run once without autograd."""
    ids, targets, pad = batch.input_ids, batch.targets, batch.pad_lengths  # (B, T) (B, T) (B,)
    P = batch.prefix_len
    B, T = ids.shape
    if bool((targets[:, :P] != IGNORE).any()) or bool(model.image_mask(ids[:, :P]).any()):
        raise ValueError("a T2I prefix must be text only and carry no targets")
    cache = PrefixKVCache(model.config, B, P, T, ids.device, cache_dtype, pad)
    if P > 0:
        with torch.no_grad():
            model.forward_hidden(ids[:, :P], False, input_pos=torch.arange(P, device=ids.device), kv_cache=cache)
    cache.freeze()
    suffix_pos = torch.arange(P, T, device=ids.device)
    return model.forward_hidden(ids[:, P:], True, input_pos=suffix_pos, kv_cache=cache)


def t2i_loss(model, batch: T2IBatch, prefix_no_grad: bool = True, vocab: str = "full", cache_dtype=torch.float32):
    """`prompt <img> c_1..c_N </img>`, left-padded so `<img>` sits at column P for every row.

    With `prefix_no_grad` the text prefix (columns [0, P), text only, frozen, causal: it never
    sees an image token) runs once under `torch.no_grad()` into a KV cache; only columns [P, T)
    (all visual) run with autograd. This gives the same loss and gradients as the full forward
    because nothing trainable is on the prefix's path (the caller checks that).
    """
    return task_loss(model, batch, prefix_no_grad=prefix_no_grad, vocab=vocab, cache_dtype=cache_dtype)[:2]


def t2i_image_nll(model, batch: T2IBatch, vocab: str = "full", cache_dtype=torch.float32) -> torch.Tensor:
    """(B,) negative log-likelihood of each row's image (codes and `</img>`) after its prompt, in nats."""
    return _t2i_image_nll_and_logits(model, batch, vocab, cache_dtype)[0]


def _t2i_image_nll_and_logits(model, batch: T2IBatch, vocab: str, cache_dtype):
    """`t2i_image_nll` (B,) and the logits (N, V) it came from, row-major over the loss positions."""
    hidden = _t2i_suffix_hidden(model, batch, cache_dtype)  # (B, T-P, C)
    targets = batch.targets[:, batch.prefix_len:]
    logits, y = target_logits(model, hidden, targets, _visual_rows(model, vocab))
    ce = F.cross_entropy(logits.float(), y, reduction="none")  # (N,) row-major
    return torch.zeros(targets.shape[0], device=ce.device).index_add(0, loss_rows(targets), ce), logits


def mismatched_prompts(batch: T2IBatch) -> tuple[T2IBatch, torch.Tensor]:
    """The same images after other prompts, and which rows make a pair.

    A row's other prompt is its counterfactual prompt when it has one (`batch.negative_prompts`,
    `mars.data.negatives`), else the previous row's prompt (rolled by one row). A row pairs when
    both its own and the other prompt are real (not the null prompt) and differ. Returns the batch
    with the other prompts and a (B,) bool mask.
    """
    P = batch.prefix_len
    prompts = batch.input_ids[:, :P]  # (B, P), left padded
    other = torch.roll(prompts, 1, dims=0)
    other_pad = torch.roll(batch.pad_lengths, 1, dims=0)
    if batch.negative_prompts is not None:
        has_negative = batch.has_negative_prompt  # (B,)
        other = torch.where(has_negative[:, None], batch.negative_prompts, other)
        other_pad = torch.where(has_negative, batch.negative_pad_lengths, other_pad)
    real = batch.pad_lengths < P  # (B,) a null prompt is all padding
    valid = real & (other_pad < P) & (other != prompts).any(dim=1)  # one row: its own prompt
    ids = torch.cat([other, batch.input_ids[:, P:]], dim=1)
    return T2IBatch(ids, batch.targets, other_pad, P), valid


@dataclass
class ContrastParts:
    ce_sum: torch.Tensor  # summed cross-entropy of the true pairs (the plain T2I loss)
    num_tokens: int  # its loss tokens
    contrast_sum: torch.Tensor  # sum over pairs of softplus(margin - gap)
    num_pairs: int
    gap_sum: float  # sum over pairs of NLL(image | other prompt) - NLL(image | own prompt), nats
    num_counterfactual: int = 0  # pairs whose other prompt is the row's counterfactual prompt
    counterfactual_gap_sum: float = 0.0  # their share of gap_sum
    num_counterfactual_zh: int = 0  # ... of them, rows whose prompt is a Chinese caption
    counterfactual_gap_sum_zh: float = 0.0  # their share of counterfactual_gap_sum
    distill_sum: torch.Tensor | None = None  # KL(teacher || student) over the true rows' loss tokens (with a teacher)


def t2i_contrast_loss(model, batch: T2IBatch, margin: float, vocab: str = "full",
                      cache_dtype=torch.float32, teacher=None,
                      skip_counterfactual_distill: bool = False) -> ContrastParts:
    """T2I loss plus the prompt-contrast term, from one forward over [true rows; mismatched rows].

    gap_b = NLL(image_b | other prompt) - NLL(image_b | prompt_b) in nats per image, the other
    prompt being row b's counterfactual prompt or else row b-1's (see `mismatched_prompts`); the
    term is softplus(margin - gap_b), summed over the pairing rows, so it pushes until the other
    prompt makes the image `margin` nats less likely, then fades. With a `teacher` the true rows are
    also distilled; `skip_counterfactual_distill` leaves the rows with a counterfactual prompt out of
    that term (the contrast term teaches them what the teacher may not know).
    """
    negative, valid = mismatched_prompts(batch)
    both = T2IBatch(torch.cat([batch.input_ids, negative.input_ids]), torch.cat([batch.targets, negative.targets]),
                    torch.cat([batch.pad_lengths, negative.pad_lengths]), batch.prefix_len)
    per_row, logits = _t2i_image_nll_and_logits(model, both, vocab, cache_dtype)  # (2B,), (2N, V)
    B = batch.input_ids.shape[0]
    row_gap = per_row[B:] - per_row[:B]  # (B,)
    gap = row_gap[valid]  # (pairs,)
    counterfactual = valid & batch.has_negative_prompt  # (B,)
    num_tokens = int((batch.targets[:, batch.prefix_len:] != IGNORE).sum())
    distill = None
    if teacher is not None:  # the true rows' positions come first (row-major)
        distill_rows = ~counterfactual if skip_counterfactual_distill else None
        distill = teacher_kl_sum(teacher, batch, logits[:num_tokens], _visual_rows(model, vocab), cache_dtype,
                                 distill_rows)
    chinese = (torch.zeros_like(counterfactual) if batch.chinese_rows is None
               else counterfactual & batch.chinese_rows)  # (B,) Chinese rows with a counterfactual
    return ContrastParts(ce_sum=per_row[:B].sum(), num_tokens=num_tokens, distill_sum=distill,
                         contrast_sum=F.softplus(margin - gap).sum(), num_pairs=int(valid.sum()),
                         gap_sum=float(gap.detach().sum()), num_counterfactual=int(counterfactual.sum()),
                         counterfactual_gap_sum=float(row_gap[counterfactual].detach().sum()),
                         num_counterfactual_zh=int(chinese.sum()),
                         counterfactual_gap_sum_zh=float(row_gap[chinese].detach().sum()))


@dataclass
class PreferenceBatch:
    """Preference pairs as T2I rows: `pairs` holds the B chosen images, then the B rejected ones,
    each after its own prompt (row b and row B + b share a prompt)."""

    pairs: T2IBatch  # (2B, T)

    @property
    def num_pairs(self) -> int:
        return self.pairs.input_ids.shape[0] // 2

    @property
    def input_ids(self) -> torch.Tensor:
        return self.pairs.input_ids

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.pairs.to(device))


class PreferenceParts(NamedTuple):
    loss_sum: torch.Tensor  # sum over pairs of -log sigmoid(margin) (+ the chosen images' NLL term)
    num_pairs: int
    accuracy_sum: float  # pairs whose margin is > 0 (the model prefers the chosen image more than the reference)
    margin_sum: float  # sum of beta x (chosen log-ratio - rejected log-ratio)
    chosen_logratio_sum: float  # sum of log pi(chosen) - log pi_ref(chosen), nats per image
    rejected_logratio_sum: float
    chosen_nll_sum: float  # sum over pairs of the chosen image's NLL per token (codes and </img>), nats


def dpo_loss(model, reference, batch: PreferenceBatch, beta: float, vocab: str = "full",
             cache_dtype=torch.float32, chosen_nll_weight: float = 0.0) -> PreferenceParts:
    """Direct preference optimisation (Rafailov et al. 2023) on whole images:

        margin_b = beta * ((log pi(w_b) - log pi_ref(w_b)) - (log pi(l_b) - log pi_ref(l_b)))
        loss     = sum_b -log sigmoid(margin_b)

    with w_b / l_b the chosen / rejected codes of pair b after its prompt, log pi their
    log-likelihood (codes and `</img>`, `t2i_image_nll`) under the model trained and log pi_ref under
    the frozen `reference`. The pair's prompt runs once per row without autograd, as in T2I training.
    `chosen_nll_weight` adds that weight times the chosen image's NLL per token to each pair's loss
    (as in RPO, Pang et al. 2024): DPO alone can lower both images' likelihood as long as the rejected
    one falls faster; this term holds the chosen one up.
    """
    nll = t2i_image_nll(model, batch.pairs, vocab, cache_dtype)  # (2B,)
    with torch.no_grad():
        reference_nll = t2i_image_nll(reference, batch.pairs, vocab, cache_dtype)
    logratio = reference_nll - nll  # (2B,) log pi - log pi_ref
    B = batch.num_pairs
    margin = beta * (logratio[:B] - logratio[B:])  # (B,)
    tokens = (batch.pairs.targets[:B] != IGNORE).sum(dim=1)  # (B,) codes and </img> of each chosen image
    chosen_nll = nll[:B] / tokens  # (B,) nats per token
    loss = F.softplus(-margin).sum() + chosen_nll_weight * chosen_nll.sum()
    detached = logratio.detach()
    return PreferenceParts(loss_sum=loss, num_pairs=B, chosen_nll_sum=float(chosen_nll.detach().sum()),
                           accuracy_sum=float((margin.detach() > 0).sum()), margin_sum=float(margin.detach().sum()),
                           chosen_logratio_sum=float(detached[:B].sum()),
                           rejected_logratio_sum=float(detached[B:].sum()))


def i2t_loss(model, batch: I2TBatch):
    """`<img> c_1..c_N </img> instruction caption <eos>`, right-padded: one full forward with
    autograd. The loss is on the caption; its gradient reaches the visual expert through attention."""
    return task_loss(model, batch)[:2]


def lm_loss(model, batch: LMBatch):
    """Plain next-token loss on text-only sequences (stage 0)."""
    return task_loss(model, batch)[:2]


def _hidden_and_targets(model, batch: T2IBatch | I2TBatch | LMBatch, prefix_no_grad: bool = True,
                        cache_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states (B, T', C) a task's loss reads and their targets (B, T'): for T2I with
    `prefix_no_grad` the image columns only (`t2i_loss`), else the whole sequence."""
    if isinstance(batch, T2IBatch):
        if prefix_no_grad:
            return _t2i_suffix_hidden(model, batch, cache_dtype), batch.targets[:, batch.prefix_len:]
        hidden = model.forward_hidden(batch.input_ids, model.image_mask(batch.input_ids), pad_lengths=batch.pad_lengths)
        return hidden, batch.targets
    if isinstance(batch, I2TBatch):
        return model.forward_hidden(batch.input_ids, batch.image_mask), batch.targets
    if isinstance(batch, LMBatch):
        return model.forward_hidden(batch.input_ids, False), batch.targets
    raise TypeError(f"unknown batch type {type(batch).__name__}")


class LossParts(NamedTuple):
    ce_sum: torch.Tensor  # summed token cross-entropy
    num_tokens: int  # its loss tokens
    distill_sum: torch.Tensor | None = None  # summed KL(teacher || student) over the same tokens (with a teacher)


def task_loss(model, batch: T2IBatch | I2TBatch | LMBatch, *, prefix_no_grad: bool = True, vocab: str = "full",
              cache_dtype=torch.float32, teacher=None) -> LossParts:
    """The batch's task loss (dispatch on the batch type); with a `teacher`, also its distillation term."""
    rows = _visual_rows(model, vocab) if isinstance(batch, T2IBatch) else None
    hidden, targets = _hidden_and_targets(model, batch, prefix_no_grad, cache_dtype)
    logits, y = target_logits(model, hidden, targets, rows)
    ce_sum = F.cross_entropy(logits.float(), y, reduction="sum")
    if teacher is None:
        return LossParts(ce_sum, y.numel())
    return LossParts(ce_sum, y.numel(), teacher_kl_sum(teacher, batch, logits, rows, cache_dtype))


@torch.no_grad()
def _teacher_logits(teacher, batch, rows: slice | None, cache_dtype) -> torch.Tensor:
    hidden, targets = _hidden_and_targets(teacher, batch, True, cache_dtype)
    return target_logits(teacher, hidden, targets, rows)[0]


def teacher_kl_sum(teacher, batch: T2IBatch | I2TBatch | LMBatch, student_logits: torch.Tensor,
                   rows: slice | None = None, cache_dtype=torch.float32,
                   batch_rows: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) summed over the batch's loss positions; `student_logits` (N, V) are the
    student's at those positions (`target_logits`), the teacher runs on the same batch without autograd.
    `batch_rows` (B,) bool (T2I batches) keeps only those rows' positions: the teacher runs on those
    rows alone."""
    if batch_rows is None:
        return kl_per_position(student_logits, _teacher_logits(teacher, batch, rows, cache_dtype)).sum()
    if not batch_rows.any():
        return student_logits.new_zeros((), dtype=torch.float32)
    kept = batch_rows[loss_rows(batch.targets)]  # (N,) row-major, as the kept rows' own positions
    subset = T2IBatch(batch.input_ids[batch_rows], batch.targets[batch_rows], batch.pad_lengths[batch_rows],
                      batch.prefix_len)
    return kl_per_position(student_logits[kept], _teacher_logits(teacher, subset, rows, cache_dtype)).sum()
