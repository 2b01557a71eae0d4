"""Held-out loss: a model's T2I and I2T loss on preprocessed code shards it was not trained on.

The same sequences and loss functions as training (`mars.data.sequences.SequenceBuilder`,
`mars.train.losses.task_loss`), without CFG dropout: T2I is the cross-entropy of the image codes and
`</img>` over the new vocabulary rows (codes + special tokens, as `t2i_loss_vocab: visual` trains),
I2T the caption's over the whole vocabulary. Each sample's language is drawn from (seed, index). Compared
with the training loss of the same step it shows overfitting; between models it is a cheap,
noise-free progress measure where the shapes benchmark still scores 0. `t2i-null` is the T2I loss
of the same images after the null prompt (CFG's unconditional branch): its excess over `t2i` is how
many nats per image token the model takes from the prompt.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mars.data.sequences import SequenceBuilder
from mars.errors import MarsError
from mars.train.losses import task_loss
from mars.vocab import MultimodalVocab

# task -> (sequence kind, probability of the null prompt)
TASKS = {"t2i": ("t2i", 0.0), "t2i-null": ("t2i", 1.0), "i2t": ("i2t", 0.0)}


@torch.inference_mode()
def heldout_loss(model, text_tokenizer, dataset, n: int, batch_size: int = 16, tasks: tuple[str, ...] = TASKS,
                 zh_fraction: float = 0.5, max_text_len: int = 40, seed: int = 0) -> dict[str, dict[str, float]]:
    """{task: {"loss": nats per token, "perplexity", "tokens", "images"}} over the first `n` samples of `dataset`."""
    if n < 1 or batch_size < 1:
        raise MarsError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
    n = min(n, len(dataset))
    if n == 0:
        raise MarsError("the shards hold no samples")
    for task in tasks:
        if task not in TASKS:
            raise MarsError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    vocab = MultimodalVocab.from_config(model.config)
    device = next(model.parameters()).device
    results = {}
    for task in tasks:
        kind, null_prompt_prob = TASKS[task]
        builder = SequenceBuilder(vocab, text_tokenizer, null_prompt_prob=null_prompt_prob, zh_prob=zh_fraction,
                                  seed=seed, max_text_len=max_text_len)
        total, tokens = 0.0, 0
        for start in range(0, n, batch_size):
            sequences = [getattr(builder, kind)(dataset[i], np.random.default_rng([seed, i]))  # its language
                         for i in range(start, min(start + batch_size, n))]
            batch = builder.collate(kind, sequences).to(device)
            parts = task_loss(model, batch, vocab="visual" if kind == "t2i" else "full")
            total, tokens = total + float(parts.ce_sum), tokens + parts.num_tokens
        loss = total / tokens
        results[task] = {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "images": n}
    return results
