"""Prompt-suite runners: exact official file trees, resuming, sharding, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mars.cli import main
from mars.errors import MarsError
from mars.eval.runner import ImageJob, Shard, resolve_shard, run_image_jobs
from mars.eval.suites import coco_selection, read_compbench_prompts, run_compbench, run_geneval

COCO = {
    "info": {}, "licenses": [],
    "images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 40, "width": 60},
               {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "height": 50, "width": 30},
               {"id": 99, "file_name": "COCO_val2014_000000000099.jpg", "height": 32, "width": 32}],
    "annotations": [{"image_id": 42, "id": 1, "caption": "A dog on a couch. "},
                    {"image_id": 42, "id": 2, "caption": "A brown dog sleeping."},
                    {"image_id": 7, "id": 3, "caption": "Two people riding bikes."},
                    {"image_id": 99, "id": 4, "caption": "A bowl of fruit."},
                    {"image_id": 99, "id": 5, "caption": "Apples and pears in a bowl."}],
}
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]
COMPBENCH = "a green bench and a blue bowl\na red car and a yellow cake\t0.5\n"


def tree(root: Path) -> set[str]:
    """Every file under root, as paths relative to it."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def common(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--device", "cpu", "--seed", "3"]


class FakeGenerator:
    """Solid-colour images from the seed; optionally dies (like a kill) after `stop_after` images."""

    def __init__(self, stop_after: int | None = None):
        self.made, self.stop_after = [], stop_after

    def __call__(self, prompts, seeds):
        images = []
        for seed in seeds:
            if self.stop_after is not None and len(self.made) >= self.stop_after:
                raise KeyboardInterrupt
            self.made.append(seed)
            images.append(Image.new("RGB", (16, 16), (seed % 256, 0, 0)))
        return images


# --------------------------------------------------------------------------- official layouts

def test_coco_runner_writes_prompts_images_and_fid(tiny_model_dir, tmp_path, capsys):
    captions = tmp_path / "captions_val2014.json"
    captions.write_text(json.dumps(COCO))
    out = tmp_path / "coco"
    assert main(["eval", "coco", "--captions", str(captions), "--n", "3", "--out-dir", str(out),
                 "--image-size", "32", "--batch-size", "2", *common(tiny_model_dir)]) == 0
    assert tree(out) == {"prompts.jsonl", "settings.json", "images/00000.png", "images/00001.png", "images/00002.png"}
    lines = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [entry["index"] for entry in lines] == [0, 1, 2]
    assert sorted(entry["image_id"] for entry in lines) == [7, 42, 99]  # every image once
    by_id = {a["image_id"]: [] for a in COCO["annotations"]}
    for a in COCO["annotations"]:
        by_id[a["image_id"]].append(a["caption"].strip())
    assert all(entry["caption"] in by_id[entry["image_id"]] for entry in lines)
    assert lines == coco_selection(captions, 3, seed=3)  # fixed by the seed
    with Image.open(out / "images" / "00000.png") as img:
        assert img.size == (32, 32)

    # the reference pictures, centre-cropped to the same size, then FID
    val = tmp_path / "val2014"
    val.mkdir()
    for img in COCO["images"]:
        Image.new("RGB", (img["width"], img["height"]), (img["id"], 90, 200)).save(val / img["file_name"])
    assert main(["eval", "coco", "--captions", str(captions), "--n", "3", "--out-dir", str(out),
                 "--image-size", "32", "--coco-images", str(val), *common(tiny_model_dir)]) == 0
    assert {f for f in tree(out) if f.startswith("reference/")} == {f"reference/0000{i}.png" for i in range(3)}
    with Image.open(out / "reference" / "00000.png") as img:
        assert img.size == (32, 32)
    result = json.loads((out / "fid.json").read_text())
    assert result["features"] == "effnet-lite0" and result["n_real"] == result["n_fake"] == 3
    assert "FD" in capsys.readouterr().out


def test_coco_selection_errors(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(COCO))
    with pytest.raises(MarsError, match="between 1 and 3"):
        coco_selection(path, 4)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(MarsError, match="not a COCO captions file"):
        coco_selection(path, 1)


def test_geneval_runner_writes_the_official_tree(tiny_model_dir, tmp_path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    out = tmp_path / "geneval"
    assert main(["eval", "geneval-sample", "--metadata", str(metadata), "--out-dir", str(out), "--n-samples", "2",
                 "--grid", *common(tiny_model_dir)]) == 0
    assert tree(out) == {"settings.json", "run_summary.json",
                         "00000/metadata.jsonl", "00000/samples/00000.png", "00000/samples/00001.png", "00000/grid.png",
                         "00001/metadata.jsonl", "00001/samples/00000.png", "00001/samples/00001.png", "00001/grid.png"}
    for i, m in enumerate(GENEVAL):
        # byte for byte what GenEval's json.dump(metadata, fp) writes, and what evaluate_images.py json.load()s
        text = (out / f"{i:05d}" / "metadata.jsonl").read_text()
        assert text == json.dumps(m) and json.loads(text) == m
    summary = json.loads((out / "run_summary.json").read_text())
    assert (summary["prompts"], summary["images"], summary["done"]) == (2, 4, 4)


def test_compbench_runner_writes_the_official_tree(tiny_model_dir, tmp_path):
    prompts = tmp_path / "color_val.txt"
    prompts.write_text(COMPBENCH)
    out = tmp_path / "compbench"
    assert main(["eval", "t2i-compbench-sample", "--prompts", str(prompts), "--out-dir", str(out),
                 "--n-samples", "2", *common(tiny_model_dir)]) == 0
    assert tree(out) == {"settings.json", "run_summary.json",
                         "samples/a green bench and a blue bowl_000000.png",
                         "samples/a green bench and a blue bowl_000001.png",
                         "samples/a red car and a yellow cake_000002.png",
                         "samples/a red car and a yellow cake_000003.png"}
    # what T2I-CompBench's BLIP_vqa.py does with the names: sort by the number, prompt before "_"
    names = sorted((out / "samples").iterdir(), key=lambda p: int(p.name.split("_")[-1].split(".")[0]))
    assert [p.name.split("_")[0] for p in names] == ["a green bench and a blue bowl"] * 2 + ["a red car and a yellow cake"] * 2


def test_compbench_prompts_must_be_file_names(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a cat\nan apple/pear\n")
    with pytest.raises(MarsError, match="p.txt:2"):
        read_compbench_prompts(path)


# --------------------------------------------------------------------------- resuming and sharding

def test_shards_and_resume_give_the_same_images_as_one_run(tiny_model_dir, tmp_path):
    """Rank 0 of 2, then a full run: nothing is made twice, nothing is missing, the rank-0 files
    are kept, and every image is the one an uninterrupted single-process run makes (one seed per
    image). Pixels may differ by 1: an image's codes do not depend on its batch, but the VQ
    decoder's float rounding does."""
    prompts = tmp_path / "color_val.txt"
    prompts.write_text(COMPBENCH)
    base = ["t2i-compbench-sample", "--prompts", str(prompts), "--n-samples", "3", *common(tiny_model_dir)]
    one = tmp_path / "one"
    assert main(["eval", *base, "--out-dir", str(one), "--batch-size", "4"]) == 0

    split = tmp_path / "split"
    assert main(["eval", *base, "--out-dir", str(split), "--shard", "0/2"]) == 0
    first = {f: (split / f).read_bytes() for f in tree(split) if f.startswith("samples/")}
    assert sorted(int(f.split("_")[-1][:6]) for f in first) == [0, 2, 4]
    assert main(["eval", *base, "--out-dir", str(split), "--batch-size", "2"]) == 0
    assert tree(split) == tree(one)
    for f in sorted(tree(split)):
        if f.startswith("samples/"):
            a, b = (np.asarray(Image.open(d / f), dtype=int) for d in (split, one))
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, f
            if f in first:
                assert (split / f).read_bytes() == first[f]  # the resumed run left rank 0's files alone


def test_interrupted_run_leaves_whole_files_and_resumes_without_gaps(tmp_path):
    jobs = [ImageJob(tmp_path / "samples" / f"{i:05d}.png", f"p{i}", 100 + i) for i in range(7)]
    killed = FakeGenerator(stop_after=4)
    with pytest.raises(KeyboardInterrupt):
        run_image_jobs(killed, jobs, tmp_path, batch_size=3)
    # the first batch (3) was written; the second died after one image, before anything was saved
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    resumed = FakeGenerator()
    assert run_image_jobs(resumed, jobs, tmp_path, batch_size=3) == 4
    assert resumed.made == [103, 104, 105, 106]  # only the missing ones, each once
    assert all(j.path.is_file() for j in jobs) and not (tmp_path / ".partial").exists()
    for job in jobs:
        with Image.open(job.path) as img:
            assert img.getpixel((0, 0)) == (job.seed % 256, 0, 0)


def test_torn_temporary_files_are_ignored_and_cleaned(tmp_path):
    jobs = [ImageJob(tmp_path / "samples" / f"{i:05d}.png", "p", i) for i in range(2)]
    partial = tmp_path / ".partial"
    partial.mkdir()
    (partial / ".r0-00000.png.tmp").write_bytes(b"\x89PNG torn")  # left by a killed rank 0
    (partial / ".r1-00001.png.tmp").write_bytes(b"\x89PNG")  # rank 1 may still be writing it
    assert run_image_jobs(FakeGenerator(), jobs, tmp_path, Shard(0, 2)) == 1
    assert [p.name for p in partial.iterdir()] == [".r1-00001.png.tmp"]
    assert (tmp_path / "samples" / "00000.png").is_file() and not (tmp_path / "samples" / "00001.png").exists()


def test_geneval_shards_split_by_image_index(tmp_path):
    metadata = tmp_path / "m.jsonl"
    metadata.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    made = {}
    for rank in range(3):
        gen = FakeGenerator()
        run_geneval(gen, metadata, tmp_path / "out", n_samples=2, seed=10, shard=Shard(rank, 3))
        made[rank] = sorted(gen.made)
    assert made == {0: [10, 13], 1: [11], 2: [12]}  # image j (seed 10 + j) on rank j % 3
    assert tree(tmp_path / "out") == {"00000/metadata.jsonl", "00000/samples/00000.png", "00000/samples/00001.png",
                                      "00001/metadata.jsonl", "00001/samples/00000.png", "00001/samples/00001.png"}


def test_resolve_shard(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_shard(None) == Shard(0, 1)
    assert resolve_shard("2/4") == Shard(2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_shard(None) == Shard(1, 3)  # torchrun
    assert resolve_shard("0/2") == Shard(0, 2)  # --shard wins
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(MarsError):
            resolve_shard(bad)


def test_compbench_jobs_and_seeds(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(COMPBENCH)
    gen = FakeGenerator()
    jobs = run_compbench(gen, prompts, tmp_path / "out", n_samples=2, seed=7, batch_size=3)
    assert [j.seed for j in jobs] == [7, 8, 9, 10] and gen.made == [7, 8, 9, 10]
