"""Training sequences from code-shard samples: T2I, I2T and text-only LM, their batches, and the mixer.

Layouts (ids from MultimodalVocab only; `codes` are the h*w image-code ids, raster order):

    T2I   prompt_ids  <img> codes </img>                  loss on codes and </img>
    I2T   <img> codes </img> instruction_ids caption_ids eos   loss on caption_ids and eos
    LM    caption_ids eos                                 loss on every token that has a left context

Target convention (every batch): `targets[:, t]` is the token the model must predict from the
logits at column t, i.e. `input_ids[:, t + 1]`, or -100 (IGNORE) where there is no loss. So the
trainer does `cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)` with no
shifting of its own. The last column's target is always -100.

T2I batches are LEFT padded so that `<img>` sits at the same column P (`prefix_len`) in every row:
columns [0, P) hold only text or padding (the frozen text side, run without autograd) and every
column >= P is visual (`<img>`, codes, `</img>`). `pad_lengths[b]` leading slots of row b are
padding (pad id = the text tokenizer's eos), which SemVIE never attends to. A null-prompt row (for
classifier-free guidance) has no text at all: P pad slots, then `<img>`. I2T and LM batches are
RIGHT padded (causal attention keeps padding out of real columns; its targets are -100).
No packing: one sample per row, padding with masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mars.data.negatives import check_swap_groups, swap_words
from mars.errors import MarsError
from mars.text_tokenizer import TextTokenizer
from mars.vocab import MultimodalVocab

IGNORE = -100
INSTRUCTION_EN = "Describe the image."
INSTRUCTION_ZH = "描述这张图片。"
TASKS = ("t2i", "i2t", "lm")


@dataclass
class Sequence:
    """One training sequence before padding.

    ids (L,) long; loss (L,) bool: True where the token is a target (predicted from the token
    before it); visual (L,) bool: rows routed to the visual expert; prefix_len: tokens before
    `<img>` (T2I only: the prompt length, 0 for a null prompt).
    """

    ids: torch.Tensor
    loss: torch.Tensor
    visual: torch.Tensor
    prefix_len: int = 0
    negative_prompt: torch.Tensor | None = None  # T2I: a counterfactual prompt's ids (mars.data.negatives)
    chinese: bool = False  # T2I: the prompt is the sample's Chinese caption


@dataclass
class T2IBatch:
    input_ids: torch.Tensor  # (B, T) long, left padded
    targets: torch.Tensor  # (B, T) long, targets[:, t] = input_ids[:, t + 1] or -100
    pad_lengths: torch.Tensor  # (B,) long: leading padding slots per row
    prefix_len: int  # P: column of <img> in every row; columns >= P are all visual
    # Counterfactual prompts for the contrast term, left padded to the same P: (B, P) ids and (B,)
    # padding; a row without one is all padding (pad length P). None when no row has one.
    negative_prompts: torch.Tensor | None = None
    negative_pad_lengths: torch.Tensor | None = None
    chinese_rows: torch.Tensor | None = None  # (B,) bool: rows whose prompt is a Chinese caption

    @property
    def image_mask(self) -> torch.Tensor:
        """(B, T) bool routing mask: True from column P on."""
        mask = torch.zeros_like(self.input_ids, dtype=torch.bool)
        mask[:, self.prefix_len:] = True
        return mask

    @property
    def has_negative_prompt(self) -> torch.Tensor:
        """(B,) bool: which rows carry a counterfactual prompt."""
        if self.negative_prompts is None:
            return torch.zeros(self.input_ids.shape[0], dtype=torch.bool, device=self.input_ids.device)
        return self.negative_pad_lengths < self.prefix_len

    def to(self, device) -> T2IBatch:
        negatives = (None, None) if self.negative_prompts is None else (
            self.negative_prompts.to(device), self.negative_pad_lengths.to(device))
        chinese = None if self.chinese_rows is None else self.chinese_rows.to(device)
        return T2IBatch(self.input_ids.to(device), self.targets.to(device), self.pad_lengths.to(device),
                        self.prefix_len, *negatives, chinese)


@dataclass
class I2TBatch:
    input_ids: torch.Tensor  # (B, T) long, right padded
    targets: torch.Tensor  # (B, T) long, targets[:, t] = input_ids[:, t + 1] or -100
    image_mask: torch.Tensor  # (B, T) bool: <img>, codes, </img>

    def to(self, device) -> I2TBatch:
        return I2TBatch(self.input_ids.to(device), self.targets.to(device), self.image_mask.to(device))


@dataclass
class LMBatch:
    input_ids: torch.Tensor  # (B, T) long, right padded, text only
    targets: torch.Tensor  # (B, T) long, targets[:, t] = input_ids[:, t + 1] or -100

    def to(self, device) -> LMBatch:
        return LMBatch(self.input_ids.to(device), self.targets.to(device))


# --------------------------------------------------------------------------- single sequences

def _image_part(vocab: MultimodalVocab, codes: torch.Tensor) -> torch.Tensor:
    """`<img> codes </img>` as vocabulary ids, (h*w + 2,)."""
    ids = vocab.codes_to_ids(torch.as_tensor(codes).reshape(-1))
    return torch.cat([torch.tensor([vocab.boi_id]), ids, torch.tensor([vocab.eoi_id])])


def build_t2i(vocab: MultimodalVocab, prompt_ids: list[int], codes: torch.Tensor,
              negative_prompt_ids: list[int] | None = None, chinese: bool = False) -> Sequence:
    """`prompt_ids <img> codes </img>`, loss on codes and `</img>`. Empty prompt = null prompt.
    `negative_prompt_ids`: a counterfactual prompt for the contrast term, carried beside;
    `chinese`: the prompt is a Chinese caption (kept for per-language metrics)."""
    image = _image_part(vocab, codes)
    ids = torch.cat([torch.tensor(prompt_ids, dtype=torch.long), image])
    loss = torch.zeros(len(ids), dtype=torch.bool)
    loss[len(prompt_ids) + 1:] = True  # codes and </img>; not the prompt, not <img>
    negative = None if negative_prompt_ids is None else torch.tensor(negative_prompt_ids, dtype=torch.long)
    return Sequence(ids, loss, vocab.is_visual(ids), prefix_len=len(prompt_ids), negative_prompt=negative,
                    chinese=chinese)


def build_i2t(vocab: MultimodalVocab, codes: torch.Tensor, instruction_ids: list[int], caption_ids: list[int],
              eos_id: int) -> Sequence:
    """`<img> codes </img> instruction caption eos`, loss on the caption and eos only."""
    image = _image_part(vocab, codes)
    text = torch.tensor([*instruction_ids, *caption_ids, eos_id], dtype=torch.long)
    ids = torch.cat([image, text])
    loss = torch.zeros(len(ids), dtype=torch.bool)
    loss[len(image) + len(instruction_ids):] = True
    return Sequence(ids, loss, vocab.is_visual(ids))


def build_lm(caption_ids: list[int], eos_id: int) -> Sequence:
    """`caption eos`, loss on every token after the first (the first has nothing to be predicted from)."""
    ids = torch.tensor([*caption_ids, eos_id], dtype=torch.long)
    loss = torch.ones(len(ids), dtype=torch.bool)
    loss[0] = False
    return Sequence(ids, loss, torch.zeros(len(ids), dtype=torch.bool))


# --------------------------------------------------------------------------- collation

def _targets(seq: Sequence) -> torch.Tensor:
    """(L,) next-token targets: ids[t + 1] where that token has loss, else IGNORE; last = IGNORE."""
    targets = torch.full_like(seq.ids, IGNORE)
    targets[:-1] = torch.where(seq.loss[1:], seq.ids[1:], IGNORE)
    return targets


def collate_t2i(samples: list[Sequence], pad_id: int) -> T2IBatch:
    """Left-pad the prompts so every row's `<img>` is at column P = the longest prompt (counterfactual
    prompts included, which are left padded to the same P)."""
    negatives = [s.negative_prompt for s in samples]
    P = max(s.prefix_len for s in samples)
    if any(n is not None for n in negatives):
        P = max(P, *(len(n) for n in negatives if n is not None))
    pad_lengths = torch.tensor([P - s.prefix_len for s in samples], dtype=torch.long)
    if len({len(s.ids) - s.prefix_len for s in samples}) != 1:
        raise MarsError("T2I samples of one batch must have the same number of image codes")
    T = P + len(samples[0].ids) - samples[0].prefix_len
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, (s, pad) in enumerate(zip(samples, pad_lengths.tolist())):
        input_ids[b, pad:] = s.ids
        targets[b, pad:] = _targets(s)
    chinese = torch.tensor([s.chinese for s in samples], dtype=torch.bool)
    if all(n is None for n in negatives):
        return T2IBatch(input_ids, targets, pad_lengths, P, chinese_rows=chinese)
    negative_prompts = torch.full((len(samples), P), pad_id, dtype=torch.long)
    negative_pad = torch.full((len(samples),), P, dtype=torch.long)
    for b, n in enumerate(negatives):
        if n is not None:
            negative_pad[b] = P - len(n)
            negative_prompts[b, P - len(n):] = n
    return T2IBatch(input_ids, targets, pad_lengths, P, negative_prompts, negative_pad, chinese)


def _right_pad(samples: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(s.ids) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    visual = torch.zeros((len(samples), T), dtype=torch.bool)
    for b, s in enumerate(samples):
        input_ids[b, :len(s.ids)] = s.ids
        targets[b, :len(s.ids)] = _targets(s)
        visual[b, :len(s.ids)] = s.visual
    return input_ids, targets, visual


def collate_i2t(samples: list[Sequence], pad_id: int) -> I2TBatch:
    """Right padding with `pad_id`; padding has no loss and is text (not routed to the visual expert)."""
    return I2TBatch(*_right_pad(samples, pad_id))


def collate_lm(samples: list[Sequence], pad_id: int) -> LMBatch:
    """Right padding with `pad_id`; padding has no loss."""
    input_ids, targets, _ = _right_pad(samples, pad_id)
    return LMBatch(input_ids, targets)


# --------------------------------------------------------------------------- the mixer

class EpochOrder:
    """Row g of a run's sample stream -> a slot in [0, epoch_len): epoch g // epoch_len walks a
    permutation seeded by (seed, epoch), a fresh one every epoch."""

    def __init__(self, seed: int):
        self.seed = seed
        self._perm: tuple[int, int, np.ndarray] | None = None  # (epoch, epoch length, permutation) cache

    def slots(self, first: int, count: int, epoch_len: int) -> list[int]:
        """The slots of rows [first, first + count)."""
        result = []
        for g in range(first, first + count):
            epoch, pos = divmod(g, epoch_len)
            if self._perm is None or self._perm[:2] != (epoch, epoch_len):
                self._perm = (epoch, epoch_len, np.random.default_rng([self.seed, epoch, 1]).permutation(epoch_len))
            result.append(int(self._perm[2][pos]))
        return result


class SequenceBuilder:
    """Turns code-shard samples into batches of one task per step, as a pure function of
    (seed, step, rank, world_size): a resumed run (same seed, restarted at its step) sees the
    same batches, so there is no state to save beyond the step.

    Each step picks one task with probability proportional to (t2i_weight, i2t_weight, lm_weight)
    (the same task on every rank). Sample positions g = (step * world_size + rank) * batch_size + j
    walk through a fresh permutation of the dataset each epoch; per-sample choices (null prompt
    with `null_prompt_prob`, Chinese caption with `zh_prob` when there is one) come from a
    generator seeded by (seed, g). With `contrast_swaps` (word groups, `mars.data.negatives`) each
    T2I row with a prompt also carries a counterfactual prompt made from its caption's text, at the
    steps where `counterfactual_at(step)` is true (default: every step). `epoch_pool`, dataset
    indices with some listed more than once, replaces the dataset in the epoch permutation: it
    oversamples (`mars.data.negatives.oversampled_epoch`).
    """

    def __init__(self, vocab: MultimodalVocab, text_tokenizer: TextTokenizer, *, t2i_weight: float = 1.0,
                 i2t_weight: float = 0.0, lm_weight: float = 0.0, null_prompt_prob: float = 0.1,
                 zh_prob: float = 0.5, seed: int = 0, max_text_len: int | None = None,
                 contrast_swaps: list[list[str]] | None = None,
                 counterfactual_at: Callable[[int], bool] | None = None,
                 epoch_pool: np.ndarray | None = None):
        weights = np.array([t2i_weight, i2t_weight, lm_weight], dtype=np.float64)
        if (weights < 0).any() or weights.sum() <= 0:
            raise MarsError(f"task weights must be >= 0 with a positive sum, got t2i={t2i_weight} "
                            f"i2t={i2t_weight} lm={lm_weight}")
        for name, p in (("null_prompt_prob", null_prompt_prob), ("zh_prob", zh_prob)):
            if not 0.0 <= p <= 1.0:
                raise MarsError(f"{name} must lie in [0, 1], got {p}")
        if text_tokenizer.vocab_size > vocab.text_size:
            raise MarsError(f"text tokenizer has {text_tokenizer.vocab_size} ids but the model only "
                            f"{vocab.text_size} text rows")
        self.vocab, self.tok = vocab, text_tokenizer
        self.task_probs = weights / weights.sum()
        self.null_prompt_prob, self.zh_prob = null_prompt_prob, zh_prob
        self.seed, self.max_text_len = seed, max_text_len
        self.contrast_swaps = check_swap_groups(contrast_swaps) if contrast_swaps else None
        self.counterfactual_at = counterfactual_at
        self.epoch_pool = epoch_pool  # dataset indices one epoch covers (mars.data.negatives.oversampled_epoch)
        self.instruction_ids = {"en": text_tokenizer.encode(INSTRUCTION_EN),
                                "zh": text_tokenizer.encode(INSTRUCTION_ZH)}
        self._order = EpochOrder(seed)

    @property
    def pad_id(self) -> int:
        return self.tok.eos_id

    def _clip(self, ids: list[int]) -> list[int]:
        return ids if self.max_text_len is None else ids[:self.max_text_len]

    def _language(self, sample: dict, rng: np.random.Generator) -> str:
        """'zh' with probability zh_prob when the sample has a Chinese caption, else 'en'."""
        zh = rng.random() < self.zh_prob  # drawn always, so the stream does not depend on the data
        return "zh" if zh and sample.get("text_zh_ids") else "en"

    # --- per sample ------------------------------------------------------------------------------
    def t2i(self, sample: dict, rng: np.random.Generator, counterfactual: bool = False) -> Sequence:
        """`counterfactual`: also carry a counterfactual prompt (needs `contrast_swaps`)."""
        null = rng.random() < self.null_prompt_prob
        lang = self._language(sample, rng)
        prompt = [] if null else self._clip(sample["text_zh_ids"] if lang == "zh" else sample["text_ids"])
        negative = None
        if counterfactual and self.contrast_swaps and not null:
            text = sample.get("text_zh" if lang == "zh" else "text")
            swapped = swap_words(text, self.contrast_swaps, rng) if text else None
            negative = None if swapped is None else self._clip(self.tok.encode(swapped))
        return build_t2i(self.vocab, prompt, sample["codes"], negative, chinese=lang == "zh" and not null)

    def i2t(self, sample: dict, rng: np.random.Generator) -> Sequence:
        lang = self._language(sample, rng)
        # The English caption follows "Describe the image." after a space, as the model will write it.
        caption = sample["text_zh_ids"] if lang == "zh" else self.tok.encode(" " + sample["text"])
        return build_i2t(self.vocab, sample["codes"], self.instruction_ids[lang], self._clip(caption), self.tok.eos_id)

    def lm(self, sample: dict, rng: np.random.Generator) -> Sequence:
        lang = self._language(sample, rng)
        return build_lm(self._clip(sample["text_zh_ids"] if lang == "zh" else sample["text_ids"]), self.tok.eos_id)

    def collate(self, task: str, sequences: list[Sequence]) -> T2IBatch | I2TBatch | LMBatch:
        collate = {"t2i": collate_t2i, "i2t": collate_i2t, "lm": collate_lm}[task]
        return collate(sequences, self.pad_id)

    # --- per step --------------------------------------------------------------------------------
    def task(self, step: int) -> str:
        """The task of a step, the same on every rank."""
        rng = np.random.default_rng([self.seed, step, 0])
        return TASKS[int(rng.choice(len(TASKS), p=self.task_probs))]

    def indices(self, step: int, batch_size: int, n: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Dataset indices of this rank's rows at `step`: every epoch is a permutation of all n samples,
        or of `epoch_pool` when given (a sample listed k times in it is drawn k times per epoch)."""
        epoch_len = len(self.epoch_pool) if self.epoch_pool is not None else n
        slots = self._order.slots((step * world_size + rank) * batch_size, batch_size, epoch_len)
        return [int(self.epoch_pool[slot]) for slot in slots] if self.epoch_pool is not None else slots

    def batch(self, dataset, step: int, batch_size: int, rank: int = 0,
              world_size: int = 1) -> tuple[str, T2IBatch | I2TBatch | LMBatch]:
        """(task, batch) of this rank at `step`."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        task = self.task(step)
        make = {"t2i": self.t2i, "i2t": self.i2t, "lm": self.lm}[task]
        if task == "t2i" and self.contrast_swaps and (self.counterfactual_at is None or self.counterfactual_at(step)):
            make = functools.partial(self.t2i, counterfactual=True)
        first = (step * world_size + rank) * batch_size
        sequences = [make(dataset[i], np.random.default_rng([self.seed, first + j, 2]))
                     for j, i in enumerate(self.indices(step, batch_size, len(dataset), rank, world_size))]
        return task, self.collate(task, sequences)


class StepBatches(Dataset):
    """Map-style view `batches[step] = builder.batch(dataset, step, ...)`, for a DataLoader with
    workers: `DataLoader(StepBatches(...), batch_size=None, sampler=range(start_step, num_steps),
    num_workers=k)` yields (task, batch) pairs and resumes at any step."""

    def __init__(self, builder: SequenceBuilder, dataset, batch_size: int, num_steps: int, rank: int = 0,
                 world_size: int = 1):
        self.builder, self.dataset, self.batch_size = builder, dataset, batch_size
        self.num_steps, self.rank, self.world_size = num_steps, rank, world_size

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int):
        return self.builder.batch(self.dataset, step, self.batch_size, self.rank, self.world_size)
