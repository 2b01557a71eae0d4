"""Offline preprocessing: resumable, rank-split runs write the same bytes; shards read back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mars.cli import main
from mars.data.datasets import open_source
from mars.data.images import pil_to_tensor
from mars.data.preprocess import preprocess
from mars.data.sequences import SequenceBuilder
from mars.data.shards import CodeShardDataset, open_shards
from mars.errors import MarsError
from mars.text_tokenizer import ByteTokenizer
from mars.vocab import MultimodalVocab
from mars.vq import load_tokenizer
from mars.vq.config import VQConfig
from mars.vq.model import VQModel

RES = 32  # 32 px through an f4 tokenizer: 8 x 8 codes
DATA = "shapes:10:3"
RUN = dict(resolution=RES, shard_size=3, batch_size=2, progress=False)  # 4 shards: 3 + 3 + 3 + 1


def tiny_vq(seed: int = 0) -> VQModel:
    torch.manual_seed(seed)
    config = VQConfig(ch=8, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                      norm_groups=4, codebook_size=64, codebook_embed_dim=4)
    return VQModel(config).eval()



@pytest.fixture(scope="module")
def vq() -> VQModel:
    return tiny_vq()


@pytest.fixture(scope="module")
def reference(vq, tmp_path_factory) -> Path:
    """An uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    result = preprocess(vq, ByteTokenizer(), DATA, out, **RUN)
    assert (result.shards_written, result.images, result.index_written) == (4, 10, True)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_tree(a: Path, b: Path) -> None:
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name] == tb[name], name


def test_interrupted_run_resumes_to_identical_shards(vq, reference, tmp_path, monkeypatch):
    # Each shard is 5 np.save calls; failing the 2nd call of the 3rd shard kills the run half-way
    # through writing it, as a SIGKILL would, leaving a torn temporary folder behind.
    calls, real_save = [0], np.save

    def failing_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2 * 5 + 2:
            raise RuntimeError("killed")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(RuntimeError, match="killed"):
        preprocess(vq, ByteTokenizer(), DATA, tmp_path, **RUN)
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "preprocess.json", "shard-00000", "shard-00001", "shard-00002.tmp"]

    result = preprocess(vq, ByteTokenizer(), DATA, tmp_path, **RUN)
    assert (result.shards_written, result.images, result.index_written) == (2, 4, True)  # only the rest
    assert_same_tree(reference, tmp_path)

    again = preprocess(vq, ByteTokenizer(), DATA, tmp_path, **RUN)  # a finished run: nothing to do
    assert (again.shards_written, again.images, again.index_written) == (0, 0, True)
    assert_same_tree(reference, tmp_path)


def test_two_ranks_equal_one_process(vq, reference, tmp_path):
    first = preprocess(vq, ByteTokenizer(), DATA, tmp_path, rank=0, world_size=2, **RUN)
    assert (first.shards_written, first.index_written) == (2, False)  # shards 0 and 2
    assert not (tmp_path / "index.json").exists()
    # rank 1 reads its images in a DataLoader worker process: same bytes as in-process reading
    second = preprocess(vq, ByteTokenizer(), DATA, tmp_path, rank=1, world_size=2, workers=1, **RUN)
    assert (second.shards_written, second.index_written) == (2, True)  # the last rank writes the index
    assert_same_tree(reference, tmp_path)


def test_shards_hold_the_codes_and_captions(vq, reference):
    ds = CodeShardDataset(reference)
    source = list(open_source(DATA, RES))
    assert len(ds) == len(source) == 10 and ds.grid == (8, 8) and ds.resolution == RES
    images = torch.stack([pil_to_tensor(s["image"]) for s in source])
    codes = vq.encode_to_codes(images).reshape(10, 64)  # (B, h*w) raster order
    tok = ByteTokenizer()
    for i, s in enumerate(source):
        item = ds[i]
        assert item["codes"].dtype == torch.long and item["codes"].shape == (64,)
        assert torch.equal(item["codes"], codes[i])
        assert item["key"] == s["key"]
        assert tok.decode(item["text_ids"]) == s["text"]
        assert tok.decode(item["text_zh_ids"]) == s["text_zh"]
    assert torch.equal(ds[-1]["codes"], ds[9]["codes"])
    assert ds.captions() == [(s["text"], s["text_zh"]) for s in source]  # across the 4 shards, in order
    with pytest.raises(IndexError):
        ds[10]
    index = json.loads((reference / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 3, 3, 1] and index["num_samples"] == 10
    assert index["vq_hash"] == vq.identity_hash()
    assert index["text_tokenizer"] == {"kind": "bytes", "vocab_size": 257, "eos_id": 256}


def test_hash_and_settings_mismatch_are_caught(vq, reference, tmp_path):
    assert len(open_shards(reference, expect_vq_hash=vq.identity_hash(), expect_text_tokenizer=ByteTokenizer())) == 10
    other = tiny_vq(seed=1)
    assert other.identity_hash() != vq.identity_hash()
    with pytest.raises(MarsError, match="VQ tokenizer"):
        open_shards(reference, expect_vq_hash=other.identity_hash(), expect_vq_codes_hash=other.codes_hash())
    # the same codes with another decoder (decoder-only tuning) are accepted
    retuned = tiny_vq(seed=0)
    with torch.no_grad():
        retuned.decoder.conv_out.bias.add_(0.1)
    assert retuned.identity_hash() != vq.identity_hash() and retuned.codes_hash() == vq.codes_hash()
    assert len(open_shards(reference, expect_vq_hash=retuned.identity_hash(),
                           expect_vq_codes_hash=retuned.codes_hash())) == 10

    class OtherText(ByteTokenizer):
        kind = "hf"
    with pytest.raises(MarsError, match="text tokenizer"):
        open_shards(reference, expect_text_tokenizer=OtherText())
    grid = open_shards(reference).grid
    assert len(open_shards(reference, expect_image_tokens=grid[0] * grid[1])) == 10
    with pytest.raises(MarsError, match=f"holds {grid[0] * grid[1]} codes per image but the model is set for 7"):
        open_shards(reference, expect_image_tokens=7)

    # Resuming into a folder made with another tokenizer is refused, --overwrite starts over.
    first = preprocess(vq, ByteTokenizer(), "shapes:2", tmp_path, resolution=RES, progress=False)
    assert first.index_written
    with pytest.raises(MarsError, match="vq_hash"):
        preprocess(other, ByteTokenizer(), "shapes:2", tmp_path, resolution=RES, progress=False)
    (tmp_path / "notes.txt").write_text("not the run's")
    redone = preprocess(other, ByteTokenizer(), "shapes:2", tmp_path, resolution=RES, overwrite=True, progress=False)
    assert redone.images == 2 and open_shards(tmp_path, expect_vq_hash=other.identity_hash())
    assert (tmp_path / "notes.txt").read_text() == "not the run's"  # --overwrite deletes only its own files


def test_unfinished_folder_is_not_a_dataset(vq, tmp_path):
    preprocess(vq, ByteTokenizer(), DATA, tmp_path, rank=0, world_size=2, **RUN)
    with pytest.raises(MarsError, match="has not finished"):
        open_shards(tmp_path)


def test_unreadable_samples_are_skipped_and_reported(vq, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, colour in enumerate(["red", "green", "blue"]):
        Image.new("RGB", (40, 48), colour).save(data / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": f"a {colour} picture"})
    (data / "bad.png").write_bytes(b"not a png")
    lines.insert(1, {"image": "bad.png", "text": "broken"})
    lines.append({"image": "3.png"})  # no caption: dropped while indexing
    (data / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    result = preprocess(vq, ByteTokenizer(), str(data), tmp_path / "out", resolution=RES, shard_size=2,
                        progress=False)
    assert result.images == 3 and result.skips.total == 5 and result.skips.skipped == 2
    assert [name for name, _ in result.skips.examples] == ["3.png", "bad.png"]
    ds = open_shards(tmp_path / "out")
    assert [ds[i]["text"] for i in range(len(ds))] == ["a red picture", "a green picture", "a blue picture"]
    assert ds[0]["text_zh_ids"] is None
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [1, 2] and index["skips"]["skipped"] == 2


def test_cli_preprocess(vq, tmp_path, capsys):
    vq.save_pretrained(tmp_path / "vq")
    args = ["preprocess", "--tokenizer", str(tmp_path / "vq"), "--text-tokenizer", "bytes", "--data", "shapes:3",
            "--out", str(tmp_path / "codes"), "--resolution", str(RES), "--shard-size", "2", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "encoded 3 images in 2 shards" in printed and "images/s" in printed and "skipped 0 of 3" in printed
    assert len(open_shards(tmp_path / "codes", expect_vq_hash=load_tokenizer(tmp_path / "vq").identity_hash())) == 3

    assert main([*args[:9], "--resolution", "64"]) == 2  # a resumed run with other settings
    assert "resolution=32" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main([*args[:7], "--out", str(tmp_path / "other")]) == 2
    assert "not empty" in capsys.readouterr().err


def test_shards_feed_the_sequence_builder(vq, reference):
    vocab = MultimodalVocab(text_size=384, image_size=64)
    builder = SequenceBuilder(vocab, ByteTokenizer(), null_prompt_prob=0.0, zh_prob=0.0, seed=0)
    ds = open_shards(reference)
    task, batch = builder.batch(ds, step=0, batch_size=4)
    assert task == "t2i"
    for b, i in enumerate(builder.indices(0, 4, len(ds))):
        row = batch.input_ids[b, batch.pad_lengths[b]:]
        assert ByteTokenizer().decode(row[:batch.prefix_len - batch.pad_lengths[b]].tolist()) == ds[i]["text"]
        assert torch.equal(vocab.ids_to_codes(row[-65:-1]), ds[i]["codes"])
