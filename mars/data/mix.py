"""Category shares of a MARS-Shapes manifest: a training set that oversamples some categories.

    mix_manifest("runs/ds/captions.jsonl", {"position": 0.5}, "runs/ds/position-half.jsonl", seed=0)

A `mars data shapes` manifest (captions.jsonl) draws categories in SHAPES_SPEC's proportions
(about a fifth are position scenes). A fine-tune that should see more of one category keeps every
record of it and draws just enough of the others to give each listed category its share: the set is
as large as the scarcest part allows, drawn without repetition, and shuffled. The result is a
function of (manifest, shares, seed) only.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

from mars.errors import MarsError
from mars.eval.io import write_text_atomic
from mars.jsonl import read_jsonl

OTHERS = "others"  # the records of every category not given a share


def read_manifest(path: str | Path) -> list[dict]:
    """The entries of a jsonl manifest, each with its "image" and "category" (refused otherwise,
    naming the line)."""
    entries = []
    for number, entry in read_jsonl(path, "manifest"):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "category")):
            raise MarsError(f"{path}:{number}: no \"image\" or \"category\" (a `mars data shapes` manifest "
                            "has both on every line)")
        entries.append(entry)
    if not entries:
        raise MarsError(f"{path} holds no records")
    return entries


def parse_shares(items: list[str]) -> dict[str, float]:
    """["position=0.5", ...] -> {"position": 0.5, ...}; each share in (0, 1], together at most 1."""
    shares: dict[str, float] = {}
    for item in items:
        category, sep, value = item.partition("=")
        try:
            share = float(value)
        except ValueError:
            share = -1.0
        if not sep or not category or not 0 < share <= 1:
            raise MarsError(f"--share {item!r}: write CATEGORY=FRACTION with a fraction in (0, 1], e.g. position=0.5")
        if category in shares:
            raise MarsError(f"--share names {category!r} twice")
        shares[category] = share
    if not shares:
        raise MarsError("give at least one --share CATEGORY=FRACTION")
    if sum(shares.values()) > 1 + 1e-9:
        raise MarsError(f"the shares add up to {sum(shares.values()):g}, more than 1")
    return shares


def mix_entries(entries: list[dict], shares: dict[str, float], seed: int) -> list[dict]:
    """Every record of the scarcest part, and of each other part as many as its share asks, shuffled."""
    pools: dict[str, list[dict]] = {category: [] for category in shares}
    pools[OTHERS] = []
    for entry in entries:
        pools[entry["category"] if entry["category"] in shares else OTHERS].append(entry)
    wanted = {**shares, OTHERS: max(0.0, 1.0 - sum(shares.values()))}
    for category, share in wanted.items():
        if share > 0 and not pools[category]:
            found = ", ".join(f"{c} {n}" for c, n in sorted(Counter(e["category"] for e in entries).items()))
            raise MarsError(f"no {category} records to give a share of {share:g} (the manifest has: {found})")
    total = min(len(pools[c]) / share for c, share in wanted.items() if share > 0)
    rng = random.Random(seed)
    mixed = []
    for category, share in wanted.items():
        mixed += rng.sample(pools[category], min(len(pools[category]), round(total * share)))
    rng.shuffle(mixed)
    return mixed


def mix_manifest(manifest: str | Path, shares: dict[str, float], out: str | Path, seed: int = 0,
                 overwrite: bool = False) -> Counter:
    """Write `out`: `manifest`'s records mixed to `shares` (`mix_entries`), image paths rewritten
    relative to `out`'s folder. Returns the records written per category."""
    manifest, out = Path(manifest), Path(out)
    if out.exists() and not overwrite:
        raise MarsError(f"{out} exists; pass --overwrite to replace it")
    if out.resolve() == manifest.resolve():
        raise MarsError(f"--out {out} is the manifest being read; choose another file")
    mixed = mix_entries(read_manifest(manifest), shares, seed)
    source, target = manifest.resolve().parent, out.resolve().parent
    lines = [json.dumps({**entry, "image": os.path.relpath(source / entry["image"], target)}, ensure_ascii=False)
             for entry in mixed]
    write_text_atomic(out, "".join(line + "\n" for line in lines))  # never a half-written manifest
    return Counter(entry["category"] for entry in mixed)
