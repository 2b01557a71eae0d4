"""Which parameters train in each stage (PAPER.md §3).

    stage0  text LM pre-training of our own backbone: text expert, text vocabulary, norms train;
            the visual side is frozen and unused (it is re-copied from the text side at the end)
    stage1  T2I + I2T alignment: visual experts + new vocabulary rows train, the LLM is frozen
    stage2  T2I refinement on curated data: same trainable set as stage 1
    stage3  T2I at 512 px (1024 codes): same trainable set as stage 1
"""

from __future__ import annotations

import logging

from torch import nn

from mars.errors import MarsError

logger = logging.getLogger(__name__)  # "mars.train.stages": the trainer's handlers

TRAINABLE_GROUPS: dict[str, tuple[str, ...]] = {
    "stage0": ("text_expert", "text_vocab", "norms"),
    "stage1": ("visual_expert", "new_vocab"),
    "stage2": ("visual_expert", "new_vocab"),
    "stage3": ("visual_expert", "new_vocab"),
}

# Parameters the text prefix of a T2I sequence reads (text tokens only): these must be frozen for
# the prefix to run without autograd.
TEXT_PATH_GROUPS = ("text_expert", "text_vocab", "norms")


def set_trainable(model: nn.Module, stage: str) -> dict[str, int]:
    """Freeze everything, then unfreeze the groups of `stage`; returns trainable numel per group.

    Asserts that each group is either fully trainable or fully frozen and that the total equals
    the model's trainable count, so a new parameter outside the groups cannot train silently.
    """
    if stage not in TRAINABLE_GROUPS:
        raise MarsError(f"unknown stage {stage!r}; known: {', '.join(TRAINABLE_GROUPS)}")
    groups = model.parameter_groups()
    trainable = TRAINABLE_GROUPS[stage]
    counts: dict[str, int] = {}
    for name, params in groups.items():
        on = name in trainable
        for param in params.values():
            param.requires_grad_(on)
        counts[name] = sum(p.numel() for p in params.values()) if on else 0

    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, params in groups.items():
        n_on = sum(p.numel() for p in params.values() if p.requires_grad)
        assert n_on == counts[name], f"group {name}: {n_on} trainable, expected {counts[name]}"
    assert n_trainable == sum(counts.values()), "trainable parameters outside the stage's groups"
    assert n_trainable > 0, f"{stage} trains no parameter"
    for name in groups:
        size = sum(p.numel() for p in groups[name].values())
        logger.info("%-14s %14s params  %s", name, f"{size:,}", "trainable" if counts[name] else "frozen")
    logger.info("%s: %s of %s parameters trainable (%.1f%%)", stage, f"{n_trainable:,}", f"{total:,}",
                100.0 * n_trainable / max(total, 1))
    return counts


def text_path_frozen(model: nn.Module) -> bool:
    """True when nothing a text-only prefix reads requires grad (so it may run without autograd)."""
    groups = model.parameter_groups()
    return not any(p.requires_grad for g in TEXT_PATH_GROUPS for p in groups[g].values())
