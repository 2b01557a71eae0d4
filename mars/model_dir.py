"""The layout of a MARS model folder, and how a `--model` argument finds one.

    DIR/config.json          SemVIEConfig (`model_type: mars-semvie`)
    DIR/model.safetensors    weights (or model-0000N-of-0000M.safetensors + index)
    DIR/tokenizer/           the text tokenizer (`mars_tokenizer.json`, + tokenizer.json for HF ones)
    DIR/vq/                  the VQ-GAN image tokenizer (its own config.json + model.safetensors)
    DIR/generation_config.json  optional: the model's default sampling settings (cfg_scale, top_k,
                             top_p, temperature), used when a call does not set them

A `--model` argument is a folder or the name of a built-in model shipped under `mars/assets/`.
"""

from __future__ import annotations

from pathlib import Path

from mars.errors import MarsError
from mars.text_tokenizer import TextTokenizer, load_text_tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = ("shapes-demo",)
DEFAULT_MODEL = "shapes-demo"
TOKENIZER_DIR = "tokenizer"
VQ_DIR = "vq"
GENERATION_CONFIG = "generation_config.json"  # SampleConfig fields; read by mars.pipeline


def resolve_model_path(name_or_dir: str | Path | None) -> Path:
    """A model folder from a path or a built-in name (None = the default built-in model)."""
    spec = str(name_or_dir) if name_or_dir is not None else DEFAULT_MODEL
    if spec in BUILTIN_MODELS and not Path(spec).exists():
        path = ASSETS / spec
        if not (path / "config.json").is_file():
            raise MarsError(f"the built-in model {spec!r} is not installed at {path}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise MarsError(f"model not found: {spec} (a model folder or one of: {', '.join(BUILTIN_MODELS)})")
    if not (path / "config.json").is_file():
        raise MarsError(f"{path} is not a MARS model folder (no config.json)")
    return path


def load_model_text_tokenizer(model_dir: str | Path, kind: str) -> TextTokenizer:
    """The text tokenizer of a model folder; `kind` is the config's `text_tokenizer`."""
    folder = Path(model_dir) / TOKENIZER_DIR
    if folder.is_dir():
        return load_text_tokenizer(folder)
    if kind in ("qwen", "bytes"):
        return load_text_tokenizer(kind)
    raise MarsError(f"{model_dir} needs a tokenizer/ folder with tokenizer.json (config text_tokenizer={kind})")

