"""Training data for the trainer: code shards in, per-rank micro-batches of each task out.

The task and the samples of a step are a pure function of (data seed, step): the data position of
a run is just its step, a resumed run sees exactly the batches it would have seen, and N ranks
see the same global batch as one process.

Sequences, batches and the task mixer are `mars.data.sequences` (T2I left-padded so `<img>` sits
at column P; I2T and LM right-padded; `targets` already shifted, -100 = no loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mars.data.sequences import IGNORE, EpochOrder, I2TBatch, LMBatch, SequenceBuilder, T2IBatch, build_t2i, collate_t2i
from mars.errors import MarsError
from mars.jsonl import read_jsonl, read_lines
from mars.rerank import prompt_language
from mars.train.losses import PreferenceBatch

# ---------------------------------------------------------------------------------------------
# Debug data: MARS-Shapes scenes tokenized by a fixed colour palette (no VQ-GAN needed)
# ---------------------------------------------------------------------------------------------


class PaletteQuantizer:
    """A training-free image tokenizer for debug runs: each f x f patch -> its mean colour,
    rounded to an L x L x L palette (L = floor(codebook_size ** (1/3))); code = (r * L + g) * L + b.

    It has the interface `mars.data.preprocess.preprocess` needs (`encode_to_codes`,
    `identity_hash`, `codes_hash`, `config.codebook_size`, `config.downsample`), so debug shards are written by
    the same code as real ones, and the codes are a learnable function of the caption's scene.
    """

    def __init__(self, codebook_size: int, downsample: int = 16) -> None:
        self.levels = round(codebook_size ** (1 / 3))
        while self.levels**3 > codebook_size:
            self.levels -= 1
        if self.levels < 2:
            raise MarsError(f"a palette needs a codebook of at least 8 codes, got {codebook_size}")
        self.config = SimpleNamespace(codebook_size=codebook_size, downsample=downsample)

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) long codes."""
        f, L = self.config.downsample, self.levels
        mean = torch.nn.functional.avg_pool2d(images.float(), f)  # (B, 3, h, w)
        q = ((mean + 1) / 2 * (L - 1)).round().clamp(0, L - 1).long()
        return (q[:, 0] * L + q[:, 1]) * L + q[:, 2]

    def identity_hash(self) -> str:
        return f"palette-{self.config.codebook_size}-{self.config.downsample}"

    def codes_hash(self) -> str:
        return self.identity_hash()  # no decoder: the identity is the codes


def synthetic_shards(out: Path, n: int, seed: int, model_config, text_tokenizer) -> Path:
    """Write (once) N MARS-Shapes training scenes as code shards under `out`, palette-tokenized."""
    from mars.data.preprocess import preprocess

    if not (out / "index.json").is_file():
        quantizer = PaletteQuantizer(model_config.image_vocab_size, model_config.image_downsample)
        preprocess(quantizer, text_tokenizer, f"shapes:{n}:{seed}", out, resolution=model_config.image_size,
                   shard_size=max(n, 1), batch_size=64, progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# The step -> micro-batches function
# ---------------------------------------------------------------------------------------------


@dataclass
class MicroBatch:
    batch: T2IBatch | I2TBatch | LMBatch | PreferenceBatch  # tensors on the CPU
    num_tokens: int  # loss tokens in it (a PreferenceBatch: its pairs, the unit its loss is summed over)


class StepData:
    """This rank's micro-batches of the global batch of a step, from `mars.data.sequences`.

    The `SequenceBuilder` picks one task per step and maps (step, rank, world_size) to samples.
    Micro-batch a of rank r is asked for as virtual rank r * A + a of world_size * A, so a global
    batch holds the same sequences however it is split over ranks and accumulation steps.
    """

    def __init__(self, dataset, builder: SequenceBuilder, batch_size: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1):
        if len(dataset) == 0:
            raise MarsError("the training data set is empty")
        if batch_size % (world_size * micro_batch_size):
            raise MarsError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size} "
                            f"x {world_size} rank(s)")
        self.dataset, self.builder = dataset, builder
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.accumulation = batch_size // (world_size * micro_batch_size)

    def task(self, step: int) -> str:
        """The task of `step` (0-based), the same on every rank."""
        return self.builder.task(step)

    def micro_batches(self, step: int) -> tuple[str, list[MicroBatch]]:
        """(task of `step`, this rank's micro-batches); step is 0-based."""
        A, out, task = self.accumulation, [], self.task(step)
        for a in range(A):
            task_a, batch = self.builder.batch(self.dataset, step, self.micro_batch_size,
                                               rank=self.rank * A + a, world_size=self.world_size * A)
            assert task_a == task
            out.append(MicroBatch(batch, int((batch.targets != IGNORE).sum())))
        return task, out


class PreferenceStepData:
    """This rank's micro-batches of preference pairs at a step (task "dpo"), as `StepData` does for
    the other tasks: a pure function of (seed, step), every epoch a fresh permutation of the pairs,
    micro-batch a of rank r taken as virtual rank r * A + a of world_size * A."""

    def __init__(self, pairs, vocab, text_tokenizer, batch_size: int, micro_batch_size: int, seed: int,
                 max_text_len: int, rank: int = 0, world_size: int = 1):
        if batch_size % (world_size * micro_batch_size):
            raise MarsError(f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size} "
                            f"x {world_size} rank(s)")
        self.pairs, self.vocab, self.pad_id = pairs, vocab, text_tokenizer.eos_id
        self.prompt_ids = [text_tokenizer.encode(pair.prompt) for pair in pairs]
        self.chinese = [prompt_language(pair.prompt) == "zh" for pair in pairs]
        longest = max(range(len(pairs)), key=lambda i: len(self.prompt_ids[i]))
        if len(self.prompt_ids[longest]) > max_text_len:
            raise MarsError(f"preference prompt {pairs[longest].prompt!r} is {len(self.prompt_ids[longest])} tokens, "
                            f"more than data.max_text_len {max_text_len} (the pair was judged on the whole prompt)")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.accumulation = batch_size // (world_size * micro_batch_size)
        self.order = EpochOrder(seed)

    def micro_batches(self, step: int) -> tuple[str, list[MicroBatch]]:
        """("dpo", this rank's micro-batches); step is 0-based."""
        A, W, size, out = self.accumulation, self.world_size * self.accumulation, self.micro_batch_size, []
        for a in range(A):
            first = (step * W + self.rank * A + a) * size
            chosen, rejected = [], []
            for i in self.order.slots(first, size, len(self.pairs)):
                pair, prompt, chinese = self.pairs[i], self.prompt_ids[i], self.chinese[i]
                chosen.append(build_t2i(self.vocab, prompt, pair.chosen, chinese=chinese))
                rejected.append(build_t2i(self.vocab, prompt, pair.rejected, chinese=chinese))
            out.append(MicroBatch(PreferenceBatch(collate_t2i(chosen + rejected, self.pad_id)), size))
        return "dpo", out


class PreferenceMixData:
    """The steps of a stage with task dpo beside t2i / i2t: step s is a dpo step with probability
    `dpo_share` (drawn from (seed, s), the same on every rank), its pairs those `preferences` gives
    step s; any other step is what `likelihood` gives step s (its own task mixer picks t2i or i2t).
    Both are pure functions of the step, so the mixture is too (resume and ranks as for each alone);
    each source skips the steps the other takes rather than shifting its order."""

    def __init__(self, preferences: PreferenceStepData, likelihood: StepData, dpo_share: float, seed: int):
        if not 0.0 < dpo_share < 1.0:
            raise ValueError(f"dpo_share must lie in (0, 1), got {dpo_share}")
        self.preferences, self.likelihood, self.dpo_share, self.seed = preferences, likelihood, dpo_share, seed

    def task(self, step: int) -> str:
        """"dpo", or the likelihood task of `step`."""
        if np.random.default_rng([self.seed, step, 2]).random() < self.dpo_share:
            return "dpo"
        return self.likelihood.task(step)

    def micro_batches(self, step: int) -> tuple[str, list[MicroBatch]]:
        """(task of `step`, this rank's micro-batches); step is 0-based."""
        if self.task(step) == "dpo":
            return self.preferences.micro_batches(step)
        return self.likelihood.micro_batches(step)


class TextCorpus:
    """Documents of a text file as samples the `SequenceBuilder` understands (LM task only)."""

    def __init__(self, docs: list[list[int]]):
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        return {"text_ids": self.docs[i], "text_zh_ids": None}


def read_text_corpus(path: str | Path, text_tokenizer) -> list[list[int]]:
    """Documents of a .txt (one per non-empty line) or .jsonl ({"text": ...} per line) file, tokenized."""
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for n, entry in read_jsonl(path, "text corpus"):
            if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                raise MarsError(f"{path}:{n}: expected a JSON object with a \"text\" string")
            texts.append(entry["text"])
    else:
        texts = [line for _, line in read_lines(path, "text corpus")]
    if not texts:
        raise MarsError(f"text corpus {path} holds no documents")
    return [text_tokenizer.encode(text) for text in texts]
