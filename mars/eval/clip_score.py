"""CLIP score: how well images match their prompts, with a user-supplied CLIP model.

    CLIP score = mean over images of 100 * max(cos(E_image(x), E_text(prompt)), 0)

(the definition of torchmetrics' CLIPScore). The model is a CLIP in Hugging Face format, loaded
with `transformers` from a local folder (nothing is downloaded): config.json, model.safetensors
(or pytorch_model.bin), vocab.json + merges.txt (or tokenizer.json), and optionally
preprocessor_config.json, e.g. a copy of openai/clip-vit-base-patch32 (ViT-B/32).

Images are preprocessed as CLIP does: shorter side resized to the model's input size (bicubic),
centre crop, [0, 1], normalised by the CLIP mean / std (or those of preprocessor_config.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mars.data.images import load_image
from mars.errors import MarsError
from mars.jsonl import read_jsonl

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEEDED = ("config.json", "model.safetensors or pytorch_model.bin", "vocab.json + merges.txt or tokenizer.json")


class ClipScorer:
    """A CLIP model + tokenizer + preprocessing; `__call__(images, prompts)` -> per-image scores."""

    def __init__(self, folder: str | Path | None, device: str | torch.device = "cpu"):
        folder = Path(folder) if folder else None
        if folder is None or not (folder / "config.json").is_file():
            where = f"{folder} has no config.json" if folder else "no --clip folder given"
            raise MarsError(f"CLIP score needs CLIP weights in Hugging Face format ({where}): pass --clip DIR, "
                            f"a local copy of openai/clip-vit-base-patch32 with {', '.join(NEEDED)}")
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError:
            raise MarsError("CLIP score needs the transformers package (pip install transformers)") from None
        try:
            self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MarsError(f"cannot load a CLIP model from {folder}: {str(err).splitlines()[0]}") from None
        self.device = torch.device(device)
        size = self.model.config.vision_config.image_size
        self.size, self.mean, self.std = size, CLIP_MEAN, CLIP_STD
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text(encoding="utf-8"))
            self.mean, self.std = tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
        self.max_length = self.model.config.text_config.max_position_embeddings

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> normalised (3, S, S): bicubic resize of the shorter side, centre crop."""
        image = image.convert("RGB")
        w, h = image.size
        s = self.size
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - s) // 2, (new_w - s) // 2
        a = np.asarray(image, dtype=np.float32)[top:top + s, left:left + s] / 255.0  # (S, S, 3)
        a = (a - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(a).permute(2, 0, 1)

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """Scores (B,) = 100 * max(cos(image, prompt), 0) for matching pairs."""
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        img = self.model.get_image_features(pixel_values=pixels)
        txt = self.model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))  # tensor, or an output object
        cos = torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        return (100.0 * cos.clamp(min=0)).cpu().numpy()


def read_manifest(path: str | Path) -> list[tuple[Path, str]]:
    """(image path, prompt) per line of a JSONL manifest; files are relative to the manifest's folder."""
    path = Path(path)
    pairs = []
    for number, entry in read_jsonl(path, "manifest"):
        prompt = entry.get("prompt", entry.get("caption")) if isinstance(entry, dict) else None
        file = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not isinstance(file, str):
            raise MarsError(f"{path}:{number}: need a JSON object with 'file' and 'prompt' (or 'caption')")
        pairs.append((path.parent / file, prompt))
    if not pairs:
        raise MarsError(f"{path} lists no images")
    return pairs


def clip_score_manifest(manifest: str | Path, clip: str | Path | None, batch_size: int = 32,
                        device: str | torch.device = "cpu") -> dict:
    """Mean CLIP score of the images of a manifest -> {"clip_score", "n", "clip"}."""
    pairs = read_manifest(manifest)
    scorer = ClipScorer(clip, device)
    scores = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="clip score", unit="batch"):
        batch = pairs[start:start + batch_size]
        scores.append(scorer([load_image(p) for p, _ in batch], [prompt for _, prompt in batch]))
    return {"clip_score": float(np.concatenate(scores).mean()), "n": len(pairs), "clip": str(clip)}
