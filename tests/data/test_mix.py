"""`mars data mix`: a manifest that gives a category its share, drawn from a `mars data shapes` set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mars.cli import main
from mars.data.datasets import index_jsonl
from mars.data.mix import mix_manifest, parse_shares
from mars.errors import MarsError


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    """A 120-scene training set (about a fifth of it position scenes)."""
    out = tmp_path_factory.mktemp("shapes") / "set"
    assert main(["data", "shapes", "--n", "120", "--seed", "4", "--size", "64", "--out", str(out)]) == 0
    return out / "captions.jsonl"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_share_keeps_every_record_of_the_category_and_as_many_others(shapes_set, tmp_path, capsys):
    source = _lines(shapes_set)
    positions = [e for e in source if e["category"] == "position"]
    assert 0 < len(positions) < len(source) / 2
    out = tmp_path / "mixed" / "position-half.jsonl"  # another folder: image paths must follow
    assert main(["data", "mix", str(shapes_set), "--share", "position=0.5", "--out", str(out)]) == 0
    mixed = _lines(out)
    counts = Counter(e["category"] for e in mixed)
    assert counts["position"] == len(positions) == sum(counts.values()) - counts["position"]
    assert f"wrote {len(mixed)} records to {out}" in capsys.readouterr().out
    # each a record of the source, none twice, every position scene in, shuffled
    by_text = {(e["text"], e["text_zh"]): e for e in source}
    assert len({(e["text"], e["text_zh"], e["image"]) for e in mixed}) == len(mixed)
    assert all({**by_text[(e["text"], e["text_zh"])], "image": e["image"]} == e for e in mixed)
    assert [e["category"] for e in mixed] != sorted(e["category"] for e in mixed)
    records, report = index_jsonl(str(out))  # what `mars preprocess --data OUT` reads
    assert len(records) == len(mixed) and report.skipped == 0
    assert all(Path(path).is_file() for _, path, *_ in records)
    # a function of (manifest, shares, seed)
    again = mix_manifest(shapes_set, {"position": 0.5}, tmp_path / "again.jsonl", seed=0)
    assert [e["text"] for e in _lines(tmp_path / "again.jsonl")] == [e["text"] for e in mixed]
    assert again == counts
    mix_manifest(shapes_set, {"position": 0.5}, tmp_path / "other.jsonl", seed=1)
    assert [e["text"] for e in _lines(tmp_path / "other.jsonl")] != [e["text"] for e in mixed]


def test_two_shares_are_limited_by_the_scarcest_part(shapes_set, tmp_path):
    source = Counter(e["category"] for e in _lines(shapes_set))
    counts = mix_manifest(shapes_set, {"position": 0.25, "size": 0.25}, tmp_path / "two.jsonl")
    total = min(source["position"] / 0.25, source["size"] / 0.25,
                (sum(source.values()) - source["position"] - source["size"]) / 0.5)
    assert counts["position"] == min(source["position"], round(total / 4))
    assert counts["size"] == min(source["size"], round(total / 4))
    assert sum(counts.values()) - counts["position"] - counts["size"] == round(total / 2)
    only = mix_manifest(shapes_set, {"counting": 1.0}, tmp_path / "counting.jsonl")  # one category alone
    assert only == Counter({"counting": source["counting"]})


def test_bad_shares_and_manifests_are_refused_by_name(shapes_set, tmp_path, capsys):
    for items, message in ((["position"], "CATEGORY=FRACTION"), (["position=0"], "in \\(0, 1\\]"),
                           (["position=0.7", "size=0.5"], "add up to 1.2, more than 1"),
                           (["size=0.2", "size=0.3"], "names 'size' twice"), ([], "at least one --share")):
        with pytest.raises(MarsError, match=message):
            parse_shares(items)
    with pytest.raises(MarsError, match="no novel records to give a share of 0.5 .*position"):
        mix_manifest(shapes_set, {"novel": 0.5}, tmp_path / "novel.jsonl")  # training sets hold no novel pairs
    assert not (tmp_path / "novel.jsonl").exists()
    out = tmp_path / "taken.jsonl"
    out.write_text("keep me")
    assert main(["data", "mix", str(shapes_set), "--share", "position=0.5", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me"
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"image": "a.png", "text": "a red circle"}\n')
    with pytest.raises(MarsError, match="plain.jsonl:1: no \"image\" or \"category\""):
        mix_manifest(plain, {"position": 0.5}, tmp_path / "x.jsonl")
    with pytest.raises(MarsError, match="manifest not found: .*missing.jsonl"):
        mix_manifest(tmp_path / "missing.jsonl", {"position": 0.5}, tmp_path / "y.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"image": "a.png", "category": "position"}\n{"image": \n')
    with pytest.raises(MarsError, match="broken.jsonl:2: not JSON"):
        mix_manifest(tmp_path / "broken.jsonl", {"position": 0.5}, tmp_path / "y.jsonl")
    with pytest.raises(MarsError, match="is the manifest being read"):
        mix_manifest(shapes_set, {"position": 0.5}, shapes_set, overwrite=True)
