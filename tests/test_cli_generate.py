"""`mars generate` and `mars caption` through the real entry point, on the tiny model folder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mars.cli import main
from mars.pipeline import MarsPipeline


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return MarsPipeline.from_pretrained(tiny_model_dir, device="cpu")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_line_is_built_without_importing_torch():
    """`mars --help` and argument errors answer in a fraction of a second: torch loads in the handlers."""
    code = ("import sys; from mars.cli import build_parser; build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def error_line(err: str) -> str:
    """The one `error:` line; the rest of stderr is progress bars (carriage-return updates)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_prompts_file_writes_pngs_manifest_and_grid(tmp_path, capsys, tiny_model_dir, pipe):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n一个蓝色的正方形\n", encoding="utf-8")
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "--prompts-file", prompts, "--out-dir", out, "--num-images", 2,
                     "--seed", 5, "--cfg-scale", 3, "--top-k", 40, "--batch-size", 3, "--grid",
                     "--model", tiny_model_dir)
    assert code == 0
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [
        ("a red circle", 5), ("a red circle", 6), ("一个蓝色的正方形", 7), ("一个蓝色的正方形", 8)]
    assert lines[0]["settings"] == {"cfg_scale": 3.0, "top_k": 40, "top_p": 1.0, "temperature": 1.0,
                                    "image_size": 64, "model": str(tiny_model_dir), "rerank": 1}
    for x in lines:
        image = Image.open(out / x["file"])
        assert image.size == (64, 64)
        # the file holds exactly what the pipeline makes for this prompt and seed
        (again,) = pipe.generate(x["prompt"], seed=x["seed"], cfg_scale=3, top_k=40)
        assert np.abs(np.asarray(image, np.int16) - np.asarray(again, np.int16)).max() <= 1
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)


def test_rerank_draws_the_candidates_of_a_prompt_in_one_batch(tmp_path, capsys, drawn_batches, tiny_model_dir, pipe):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a red circle", "--out-dir", out, "--seed", 3, "--top-k", 20,
                     "--rerank", 3, "--model", tiny_model_dir)
    assert code == 0
    assert drawn_batches == [3]  # one prompt's 3 candidates at once (--batch-size 8), not one by one
    (want,) = pipe.generate("a red circle", seed=3, top_k=20, rerank=3)
    (written,) = out.glob("*.png")
    assert np.abs(np.asarray(Image.open(written), np.int16) - np.asarray(want, np.int16)).max() <= 1


def test_jacobi_window_reaches_the_images_and_the_manifest(tmp_path, capsys, monkeypatch, tiny_model_dir, pipe):
    import mars.pipeline

    windows = []
    decode = mars.pipeline.generate_image_tokens_jacobi
    monkeypatch.setattr(mars.pipeline, "generate_image_tokens_jacobi",
                        lambda *a, **k: windows.append(a[5]) or decode(*a, **k))
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a red circle", "--out-dir", out, "--seed", 3, "--top-k", 20,
                     "--jacobi-window", 3, "--model", tiny_model_dir)
    assert code == 0 and windows == [3]
    (line,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert line["settings"]["jacobi_window"] == 3
    (want,) = pipe.generate("a red circle", seed=3, top_k=20, jacobi_window=3)
    image = Image.open(out / line["file"])
    assert np.abs(np.asarray(image, np.int16) - np.asarray(want, np.int16)).max() <= 1
    for bad, message in ((["--jacobi-window", -1], "must be an integer >= 0"),
                         (["--jacobi-window", 2, "--compile"], "does not combine with compile")):
        code, _, err = run(capsys, "generate", "a red circle", "-o", tmp_path / "bad.png", *bad,
                           "--model", tiny_model_dir)
        assert code == 2 and message in error_line(err) and not (tmp_path / "bad.png").exists()


def test_negative_prompt_reaches_the_images_and_the_manifest(tmp_path, capsys, tiny_model_dir, pipe):
    out = tmp_path / "out"
    code, _, _ = run(capsys, "generate", "a red circle", "--out-dir", out, "--cfg-scale", 3,
                     "--negative-prompt", "a green star", "--model", tiny_model_dir)
    assert code == 0
    (line,) = [json.loads(x) for x in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert line["settings"]["negative_prompt"] == "a green star"
    (again,) = pipe.generate("a red circle", seed=0, cfg_scale=3, negative_prompt="a green star")
    image = Image.open(out / line["file"])
    assert np.abs(np.asarray(image, np.int16) - np.asarray(again, np.int16)).max() <= 1


def test_existing_files_are_never_overwritten_without_the_flag(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "out"
    args = ["generate", "a red circle", "--out-dir", out, "--model", tiny_model_dir]
    assert run(capsys, *args)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run(capsys, *args, "--seed", 9)
    assert code == 2 and "already exists" in error_line(err) and "--overwrite" in error_line(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run(capsys, *args, "--seed", 9, "--overwrite")[0] == 0
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in manifest] == [9]


def test_single_prompt_to_output_file(tmp_path, capsys, tiny_model_dir):
    target = tmp_path / "cat.png"
    code, _, _ = run(capsys, "generate", "一只猫", "-o", target, "--num-images", 2, "--grid", "--model", tiny_model_dir)
    assert code == 0
    assert [Image.open(tmp_path / f"cat_{i}.png").size for i in range(2)] == [(64, 64)] * 2
    assert Image.open(tmp_path / "cat_grid.png").size == (128, 64)
    assert not (tmp_path / "manifest.jsonl").exists()


@pytest.mark.parametrize("argv, message", [
    (["generate", ""], "prompt 0 is empty"),
    (["generate", "x" * 500], "too long"),
    (["generate", "ok", "--temperature", "-1"], "temperature"),
    (["generate", "ok", "--top-p", "0"], "top_p"),
    (["generate"], "either a PROMPT or --prompts-file"),
    (["generate", "ok", "--negative-prompt", "a blue square", "--cfg-scale", "1"], "set --cfg-scale"),
    (["generate", "ok", "--negative-prompt", "x" * 500], "negative prompt 0 is too long"),
    (["generate", "--prompts-file", "missing.txt", "--out-dir", "d"], "prompts file not found"),
])
def test_generate_errors_are_one_line(tmp_path, capsys, tiny_model_dir, argv, message):
    os.chdir(tmp_path)
    code, _, err = run(capsys, *argv, "--model", tiny_model_dir)
    assert code == 2 and message in error_line(err)
    assert not list(tmp_path.glob("*.png"))


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a red circle", "-o", tmp_path / "x.png", "--model", tmp_path / "nope")
    assert code == 2 and "model not found" in error_line(err)


def test_caption_json_lines_and_unreadable_images(tmp_path, capsys, tiny_model_dir, pipe):
    images = pipe.generate(["a red circle", "x"], seed=0)
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for im, p in zip(images, paths):
        im.save(p)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    code, out, err = run(capsys, "caption", paths[0], broken, paths[1], "--json", "--lang", "zh",
                         "--max-new-tokens", 6, "--model", tiny_model_dir)
    assert code == 2 and str(broken) in error_line(err)
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert [r["caption"] for r in rows] == pipe.caption(paths, lang="zh", max_new_tokens=6)
    code, out, _ = run(capsys, "caption", paths[0], "--lang", "zh", "--max-new-tokens", 6, "--model", tiny_model_dir)
    assert code == 0 and out.splitlines() == [f"{paths[0]}\t{rows[0]['caption']}"]
    code, out, _ = run(capsys, "caption", *paths, "--cfg-scale", 3, "--plausibility", 0.05, "--rerank", 3,
                       "--max-new-tokens", 6, "--model", tiny_model_dir)
    guided = pipe.caption(paths, max_new_tokens=6, cfg_scale=3.0, plausibility=0.05, rerank=3)
    assert code == 0 and out.splitlines() == [f"{p}\t{text}" for p, text in zip(paths, guided)]
    code, _, err = run(capsys, "caption", *paths, "--refine", -1, "--model", tiny_model_dir)
    assert code == 2 and "refine must be an integer >= 0" in error_line(err)


def test_cli_caption_refine_reaches_the_edits(capsys, tmp_path, tiny_model_dir, edit_recorder):
    path = tmp_path / "a.png"
    MarsPipeline.from_pretrained(tiny_model_dir, device="cpu").generate("a red circle")[0].save(path)
    code, out, _ = run(capsys, "caption", path, "--refine", 2, "--max-new-tokens", 6, "--model", tiny_model_dir)
    assert code == 0 and out.splitlines() == [f"{path}\tedited 2"] and [c[3] for c in edit_recorder] == [2]


def test_console_entry_point_prints_one_line(tmp_path, tiny_model_dir):
    result = subprocess.run([sys.executable, "-m", "mars.cli", "generate", "", "--model", str(tiny_model_dir)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: prompt 0 is empty"]
