"""CLIP score with a tiny random Hugging Face CLIP: preprocessing and scores against transformers'
own processor and model outputs, the manifest CLI, and the message when no weights are given."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mars.cli import main

transformers = pytest.importorskip("transformers")


def _clip_bytes_chars() -> list[str]:
    """The 256 printable stand-ins of CLIP's byte-level BPE (bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP folder in Hugging Face format: config, weights, a character-level BPE
    vocabulary (no merges) and a preprocessor config, like a local copy of openai/clip-vit-base-patch32."""
    folder = tmp_path_factory.mktemp("tiny-clip")
    chars = _clip_bytes_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 32},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    return folder


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (64, 33))]


def test_scores_match_transformers(tiny_clip):
    from mars.eval.clip_score import ClipScorer

    scorer = ClipScorer(tiny_clip)
    images, prompts = _images(), ["a red circle", "two blue stars"]
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_clip)
    want_pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([scorer.preprocess(im) for im in images])
    assert ours.shape == want_pixels.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, want_pixels, atol=1e-5)  # the same PIL bicubic resize and centre crop

    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = scorer.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=ours)
    # logits_per_image = exp(logit_scale) * cos; the diagonal holds the matching pairs
    cos = out.logits_per_image.diagonal() / scorer.model.logit_scale.exp().detach()
    assert scorer(images, prompts) == pytest.approx((100 * cos.clamp(min=0)).numpy(), abs=1e-4)


def test_clip_score_cli(tiny_clip, tmp_path, capsys):
    lines = []
    for i, image in enumerate(_images()):
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": f"prompt {i}"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["eval", "clip-score", "--manifest", str(tmp_path / "manifest.jsonl"), "--clip", str(tiny_clip),
                 "--json", str(tmp_path / "clip.json")]) == 0
    result = json.loads((tmp_path / "clip.json").read_text())
    assert result["n"] == 2 and 0 <= result["clip_score"] <= 100
    assert "CLIP score" in capsys.readouterr().out

    # without weights: a clear message and exit status 2
    assert main(["eval", "clip-score", "--manifest", str(tmp_path / "manifest.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "needs CLIP weights" in err and "openai/clip-vit-base-patch32" in err
