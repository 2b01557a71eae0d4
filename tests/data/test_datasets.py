"""Image-text sources: every spec form yields the same samples; bad files are skipped and reported."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mars.data.captions import shapes_example
from mars.data.cli import run_shapes
from mars.data.datasets import expand_braces, open_source
from mars.data.images import UnusableImage, load_image, pil_to_tensor, resize_center_crop, tensor_to_pil
from mars.errors import MarsError

RES = 32


def png_bytes(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None].repeat(h, 0)
    return Image.fromarray(np.concatenate([x, x[:, ::-1], np.full_like(x, 90)], axis=-1))


def assert_samples(samples, n):
    assert len(samples) == n
    for s in samples:
        assert set(s) == {"key", "image", "text", "text_zh"}
        assert isinstance(s["key"], str) and isinstance(s["text"], str) and s["text"]
        assert s["image"].mode == "RGB" and s["image"].size == (RES, RES)


@pytest.fixture
def messy_folder(tmp_path):
    """3 usable RGB/RGBA images, a CMYK JPEG, a 16-bit and an 8-bit grayscale PNG, and 4 bad files."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    gradient().save(root / "rgb.jpg")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))
    rgba.save(root / "sub" / "rgba.png")
    gradient(50, 50).save(root / "wide.webp")
    gradient().convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 40000, dtype=np.uint16)).save(root / "gray16.png")
    gradient().convert("L").save(root / "gray.png")
    (root / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    gradient().save(root / "nocaption.png")
    gradient().save(root / "empty.png")
    for name in ("rgb", "sub/rgba", "cmyk", "gray16", "gray", "corrupt", "tiny"):
        (root / f"{name}.txt").write_text(f"caption of {name}\n", encoding="utf-8")
    (root / "wide.json").write_text(json.dumps({"text": "wide", "text_zh": "宽"}), encoding="utf-8")
    (root / "empty.txt").write_text("  \n", encoding="utf-8")
    return root


def test_folder_skips_and_reports(messy_folder):
    source = open_source(str(messy_folder), RES)
    assert len(source) == 9  # images with a caption file
    samples = {s["key"]: s for s in source}
    assert sorted(samples) == ["cmyk", "gray", "gray16", "rgb", "sub/rgba", "wide"]
    assert_samples(list(samples.values()), 6)
    assert samples["wide"]["text_zh"] == "宽" and samples["rgb"]["text_zh"] is None
    assert samples["rgb"]["text"] == "caption of rgb"
    # transparent pixels are composited on white, not black
    assert samples["sub/rgba"]["image"].getpixel((RES - 1, RES // 2)) == (255, 255, 255)
    assert samples["sub/rgba"]["image"].getpixel((0, RES // 2)) == (0, 0, 255)
    assert samples["gray16"]["image"].getpixel((5, 5)) == (156, 156, 156)  # 40000 / 257
    report = source.report()
    assert report.startswith("skipped 4 of 10 samples: ")
    for name in ("nocaption.png (missing caption", "corrupt.jpg (", "tiny.png (too small", "empty.png (empty caption"):
        assert name in report
    assert len(list(source)) == 6  # a second pass gives the same, and the report does not double
    assert source.report().startswith("skipped 4 of 10 samples")


def test_load_image_modes():
    assert load_image(png_bytes(gradient().convert("P"))).mode == "RGB"
    assert load_image(png_bytes(gradient().convert("LA"))).mode == "RGB"
    with pytest.raises(UnusableImage, match="too small"):
        load_image(png_bytes(Image.new("RGB", (7, 30))))
    with pytest.raises(UnusableImage):
        load_image(b"not an image")


def test_resize_and_tensors():
    img = gradient(100, 50)
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    # the crop is central: the left-right gradient is symmetric about the middle column
    a = np.asarray(out, dtype=int)
    assert abs(a[:, 0, 0] - (255 - a[:, -1, 0])).max() <= 8
    t = pil_to_tensor(img)
    assert t.shape == (3, 50, 100) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1 and t[0, 0, 0] == -1 and t[0, 0, -1] == 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), np.asarray(img))
    assert tensor_to_pil(torch.full((3, 4, 4), 3.0)).getpixel((0, 0)) == (255, 255, 255)


def test_jsonl_manifest(tmp_path):
    (tmp_path / "data").mkdir()
    gradient().save(tmp_path / "data" / "a.png")
    gradient(64, 64).save(tmp_path / "b.jpg")
    lines = [{"image": "data/a.png", "text": "first", "text_zh": "第一"},
             {"image": "b.jpg", "text": "second"},
             {"image": "missing.png", "text": "gone"},
             {"image": "data/a.png"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{oops\n", encoding="utf-8")
    source = open_source(str(manifest), RES)
    samples = list(source)
    assert_samples(samples, 2)
    assert [(s["text"], s["text_zh"]) for s in samples] == [("first", "第一"), ("second", None)]
    assert source.report().startswith("skipped 3 of 5 samples")
    assert "missing.png" in source.report()


def write_shard(path, samples):
    with tarfile.open(path, "w") as tf:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars(tmp_path):
    img = png_bytes(gradient())
    write_shard(tmp_path / "s-000.tar", [
        ("000.jpg", png_bytes(gradient(), "JPEG")), ("000.txt", b"a jpeg"),
        ("001.png", img), ("001.json", json.dumps({"text": "a png", "text_zh": "一张图"}).encode()),
        ("002.webp", png_bytes(gradient(), "WEBP")), ("002.txt", "中文说明".encode()),
    ])
    write_shard(tmp_path / "s-001.tar", [
        ("dir/003.png", img),  # no caption
        ("dir/004.jpg", b"garbage"), ("dir/004.txt", b"corrupt"),
        ("dir/005.png", img), ("dir/005.txt", b"last"),
    ])
    source = open_source(str(tmp_path / "s-{000..001}.tar"), RES)
    samples = list(source)
    assert_samples(samples, 4)
    assert [s["key"] for s in samples] == ["000", "001", "002", "dir/005"]
    assert [s["text"] for s in samples] == ["a jpeg", "a png", "中文说明", "last"]
    assert samples[1]["text_zh"] == "一张图"
    assert source.report().startswith("skipped 2 of 6 samples")
    assert "s-001.tar:dir/004.jpg" in source.report() and "s-001.tar:dir/003 (missing caption)" in source.report()
    assert len(list(open_source(str(tmp_path / "s-*.tar"), RES))) == 4
    assert len(list(open_source(str(tmp_path / "s-000.tar"), RES))) == 3


@pytest.mark.parametrize("reading_order", [False, True])
def test_shapes_sources_agree(tmp_path, reading_order):
    samples = list(open_source("shapes:6:3" + (":reading-order" if reading_order else ""), RES))
    assert_samples(samples, 6)
    run_shapes(argparse.Namespace(n=6, out=str(tmp_path / "ds"), seed=3, split="train", size=RES,
                                  workers=1, overwrite=False, reading_order=reading_order))
    on_disk = list(open_source(str(tmp_path / "ds"), RES))
    assert_samples(on_disk, 6)
    for a, b in zip(samples, on_disk):
        assert (a["text"], a["text_zh"]) == (b["text"], b["text_zh"])
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_reading_order_source_draws_the_same_images_with_reading_order_captions():
    plain = list(open_source("shapes:40:3", RES))
    reading = list(open_source("shapes:40:3:reading-order", RES))
    assert_samples(reading, 40)
    for i, (a, b) in enumerate(zip(plain, reading)):
        assert a["key"] == b["key"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert (b["text"], b["text_zh"]) == shapes_example(3, i, reading_order=True)[1:]
    assert any((a["text"], a["text_zh"]) != (b["text"], b["text_zh"]) for a, b in zip(plain, reading))  # restated


def test_sharding_covers_every_sample_once():
    spec = "shapes:23:1"
    keys = [s["key"] for s in open_source(spec, 16)]
    seen = []
    for rank in range(3):
        source = open_source(spec, 16, rank=rank, world_size=3)
        assert len(source) == len(range(rank, 23, 3))
        if rank == 1:  # with DataLoader workers splitting the rank's share further
            loader = DataLoader(source, batch_size=None, num_workers=2, collate_fn=lambda x: x)
            seen += [s["key"] for s in loader]
        else:
            seen += [s["key"] for s in source]
    assert sorted(seen) == sorted(keys) and len(seen) == 23
    shuffled = open_source(spec, 16, shuffle=True, seed=4)
    first = [s["key"] for s in shuffled]
    shuffled.set_epoch(1)
    second = [s["key"] for s in shuffled]
    assert sorted(first) == sorted(second) == sorted(keys) and first != second != keys


def test_bad_specs(tmp_path):
    for spec in (str(tmp_path / "nope"), str(tmp_path / "x.jsonl"), str(tmp_path / "*.tar"),
                 str(tmp_path / "s-{0..3}.tar"), "shapes:ten", "shapes:0", "shapes:4:0:reading"):
        with pytest.raises(MarsError, match="nope|x.jsonl|matches nothing|not found|shapes"):
            open_source(spec, RES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MarsError, match="no usable samples"):
        open_source(str(tmp_path / "empty"), RES)


def test_expand_braces():
    assert expand_braces("a{08..10}.tar") == ["a08.tar", "a09.tar", "a10.tar"]
    assert expand_braces("{x,y}/{0..1}") == ["x/0", "x/1", "y/0", "y/1"]
