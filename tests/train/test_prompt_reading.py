"""The visual expert can learn to read the prompt: joint attention carries the text to the image.

A task only the prompt solves: the prompt names one of 16 words (at its start, followed by 0-3
filler words, so rows have different lengths and left padding); every image is the word's own
fixed code sequence. Without the prompt the first code is a 1-in-16 guess (2.77 nats); after
stage-I training of the visual expert alone (the language expert frozen), the first code must be
predicted from the prompt. This guards the whole path a prompt takes in training: the frozen
no-autograd prefix, its KV cache, padding masks and the visual expert's attention to text states.
"""

from __future__ import annotations

import math

import torch

from mars.config import SemVIEConfig
from mars.data.sequences import build_t2i, collate_t2i
from mars.model.semvie import SemVIE
from mars.train.losses import t2i_loss
from mars.train.stages import set_trainable, text_path_frozen

WORDS = list(range(10, 26))  # 16 text ids that name an image
FILLERS = list(range(100, 110))  # text ids that carry nothing


def _batch(model, table, words, generator):
    seqs = []
    for w in words:
        n = int(torch.randint(0, 4, (1,), generator=generator))
        prompt = [WORDS[w]] + [FILLERS[int(i)] for i in torch.randint(0, len(FILLERS), (n,), generator=generator)]
        seqs.append(build_t2i(model.vocab, prompt, table[w]))
    return collate_t2i(seqs, pad_id=0)


def _first_code_ce(model, table, with_prompt: bool) -> float:
    """Mean cross-entropy (nats) of the first image code over the 16 words, with or without the prompt."""
    vocab = model.vocab
    seqs = [build_t2i(vocab, [WORDS[w]] if with_prompt else [], table[w]) for w in range(len(WORDS))]
    batch = collate_t2i(seqs, pad_id=0)
    P = batch.prefix_len
    with torch.no_grad():
        hidden = model.forward_hidden(batch.input_ids, model.image_mask(batch.input_ids),
                                      pad_lengths=batch.pad_lengths)  # (16, T, C)
        logits = model.logits(hidden[:, P], slice(vocab.text_size, vocab.size))  # after <img>: (16, image rows)
    return float(torch.nn.functional.cross_entropy(logits.float(), batch.targets[:, P] - vocab.text_size))


def test_stage1_visual_expert_learns_to_read_the_prompt():
    torch.manual_seed(0)
    model = SemVIE(SemVIEConfig.from_name("debug"))
    set_trainable(model, "stage1")
    assert text_path_frozen(model)
    table = torch.randint(0, model.vocab.image_size, (len(WORDS), model.config.image_tokens))  # (16, 16)
    frozen_before = {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        words = torch.randint(0, len(WORDS), (32,), generator=g).tolist()
        ce_sum, n = t2i_loss(model, _batch(model, table, words, g), vocab="visual")
        opt.zero_grad()
        (ce_sum / n).backward()
        opt.step()
    model.eval()
    chance = math.log(len(WORDS))
    assert _first_code_ce(model, table, with_prompt=False) > 0.6 * chance  # the null prompt cannot know it
    assert _first_code_ce(model, table, with_prompt=True) < 0.1 * chance  # the prompt does
    for k, p in model.named_parameters():  # and only the visual side learnt it
        if k in frozen_before:
            assert torch.equal(p, frozen_before[k]), k
