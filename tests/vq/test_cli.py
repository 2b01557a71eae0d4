import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mars.errors import MarsError
from mars.vq.cli import add_commands
from mars.vq.model import VQModel


def run(*argv: str) -> None:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["tokenizer", *argv])
    args.func(args)


@pytest.fixture
def files(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "vq")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), mode="L").save(tmp_path / "gray.jpg")
    Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    return tmp_path


def test_encode_decode_roundtrip(files, capsys):
    images = [str(files / n) for n in ("a.png", "broken.png", "gray.jpg", "rgba.png")]
    run("encode", "--model", str(files / "vq"), *images, "--out", str(files / "codes.npz"), "--resolution", "32")
    assert "skipped 1 of 4" in capsys.readouterr().err
    with np.load(files / "codes.npz") as data:
        assert data["codes"].shape == (3, 8, 8)
        assert [str(f) for f in data["files"]] == [images[0], images[2], images[3]]
        assert str(data["tokenizer"]) == VQModel.from_pretrained(files / "vq").identity_hash()
    run("decode", "--model", str(files / "vq"), str(files / "codes.npz"), "--out-dir", str(files / "dec"))
    assert sorted(p.name for p in (files / "dec").iterdir()) == ["a.png", "gray.png", "rgba.png"]
    assert Image.open(files / "dec" / "a.png").size == (32, 32)
    with pytest.raises(MarsError, match="exists"):
        run("decode", "--model", str(files / "vq"), str(files / "codes.npz"), "--out-dir", str(files / "dec"))
    run("decode", "--model", str(files / "vq"), str(files / "codes.npz"), "--out-dir", str(files / "dec"),
        "--overwrite")


def test_npy_codes_and_hash_mismatch(files, tiny_model):
    run("encode", "--model", str(files / "vq"), str(files / "a.png"), "--out", str(files / "c.npy"),
        "--resolution", "32")
    assert np.load(files / "c.npy").shape == (1, 8, 8)
    run("decode", "--model", str(files / "vq"), str(files / "c.npy"), "--out-dir", str(files / "d"))
    assert (files / "d" / "00000.png").is_file()
    run("encode", "--model", str(files / "vq"), str(files / "a.png"), "--out", str(files / "c.npz"),
        "--resolution", "32")
    other = VQModel(tiny_model.config)
    other.save_pretrained(files / "other")
    with pytest.raises(MarsError, match="encoded by tokenizer"):
        run("decode", "--model", str(files / "other"), str(files / "c.npz"), "--out-dir", str(files / "e"))
    # a tokenizer whose decoder alone changed decodes the codes: they are its codes too
    retuned = VQModel.from_pretrained(files / "vq")
    with torch.no_grad():
        retuned.decoder.conv_out.bias.add_(0.1)
    retuned.save_pretrained(files / "retuned")
    run("decode", "--model", str(files / "retuned"), str(files / "c.npz"), "--out-dir", str(files / "f"))
    assert (files / "f" / "a.png").is_file()


def test_reconstruct_keeps_names_and_refuses_overwrite(files):
    (files / "out").mkdir()
    (files / "out" / "gray.png").write_bytes(b"keep me")
    args = ["reconstruct", "--model", str(files / "vq"), "--out-dir", str(files / "out"), "--resolution", "32",
            str(files / "a.png"), str(files / "gray.jpg")]
    with pytest.raises(MarsError, match="--overwrite"):
        run(*args)
    assert (files / "out" / "gray.png").read_bytes() == b"keep me"
    run(*args, "--overwrite")
    assert Image.open(files / "out" / "gray.png").mode == "RGB"
    assert (files / "out" / "a.png").is_file()


def test_eval_writes_table_and_json(files, capsys):
    run("eval", "--model", str(files / "vq"), "--data", "shapes:4:9", "--n", "3", "--resolution", "32",
        "--json", str(files / "eval.json"), "--no-rfid")
    out = capsys.readouterr().out
    assert "PSNR" in out and "shapes checker agreement" in out
    report = json.loads((files / "eval.json").read_text())
    assert report["images"] == 3 and report["rfid_proxy"] is None
    assert 0 <= report["checker_agreement"] <= 1


def test_bad_inputs(files):
    with pytest.raises(MarsError, match="npz or .npy"):
        run("encode", "--model", str(files / "vq"), str(files / "a.png"), "--out", str(files / "c.txt"))
    with pytest.raises(MarsError, match="multiple of 4"):
        run("encode", "--model", str(files / "vq"), str(files / "a.png"), "--out", str(files / "c.npy"),
            "--resolution", "30")
    with pytest.raises(MarsError, match="not found"):
        run("encode", "--model", str(files / "nope"), str(files / "a.png"), "--out", str(files / "c.npy"))
    np.save(files / "big.npy", np.full((1, 2, 2), 99))
    with pytest.raises(MarsError, match="must lie in"):
        run("decode", "--model", str(files / "vq"), str(files / "big.npy"), "--out-dir", str(files / "x"))
