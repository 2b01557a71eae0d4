"""Model folders out of training: the run's `final/`, and any checkpoint (`mars export`).

    export_checkpoint("runs/x/checkpoints/step_00001000", "runs/x/m1000")   # a model folder

A model folder (mars/model_dir.py) is the weights (`save_pretrained`) with the run's text tokenizer
in `tokenizer/`, its VQ-GAN in `vq/` and, when the run started from a model that has one, that
model's `generation_config.json` (its sampling defaults: a fine-tune keeps them), with the prompt
order of the run's captions (`run_prompt_order`). The folder is written under a temporary name and
renamed, so an interrupted export leaves nothing half-written.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mars.config import from_dict
from mars.data.datasets import READING_ORDER_SUFFIX
from mars.data.shards import CodeShardDataset
from mars.errors import MarsError
from mars.model_dir import GENERATION_CONFIG, TOKENIZER_DIR, VQ_DIR, load_model_text_tokenizer
from mars.pipeline import AS_WRITTEN, READING, load_prompt_order, save_prompt_order
from mars.text_tokenizer import TextTokenizer, load_text_tokenizer
from mars.train.checkpoint import load_checkpoint_model, read_meta
from mars.train.config import TrainConfig

logger = logging.getLogger("mars.train")


def run_text_tokenizer(cfg: TrainConfig, text_tokenizer_kind: str) -> TextTokenizer:
    """The run's text tokenizer: init_from's, else `tokenizer:` or the model config's kind."""
    if cfg.init_from is not None:
        return load_model_text_tokenizer(cfg.init_from, text_tokenizer_kind)
    return load_text_tokenizer(cfg.tokenizer or text_tokenizer_kind)


def run_vq_dir(cfg: TrainConfig) -> Path | None:
    """The run's VQ-GAN folder: `vq:`, else init_from/vq, else None."""
    if cfg.vq is not None:
        path = Path(cfg.vq)
        if not (path / "config.json").is_file():
            raise MarsError(f"vq {path} is not a VQ-GAN folder (no config.json)")
        return path
    if cfg.init_from is not None and (Path(cfg.init_from) / VQ_DIR).is_dir():
        return Path(cfg.init_from) / VQ_DIR
    return None


def run_prompt_order(cfg: TrainConfig) -> str:
    """How the trained model's captions state relations (its generation_config.json "prompt_order"):
    `prompt_order:`, else the data's when data.shards were preprocessed from a `shapes:N:SEED` spec
    (reading with its `:reading-order` suffix), else init_from's, else as-written."""
    if cfg.prompt_order is not None:
        return cfg.prompt_order
    if cfg.data.shards:
        spec = CodeShardDataset(cfg.data.shards).index.get("data", "")
        if spec.startswith("shapes:"):
            return READING if spec.endswith(READING_ORDER_SUFFIX) else AS_WRITTEN
    return load_prompt_order(cfg.init_from) if cfg.init_from is not None else AS_WRITTEN


def write_model_folder(model, out: str | Path, cfg: TrainConfig, text_tokenizer: TextTokenizer) -> Path:
    """`model` (stage 0: its visual side copied from the text side first) as a complete model folder."""
    out = Path(out)
    if cfg.stage == "stage0":
        # Stage 0 trained only the text side: start the visual side from the trained one.
        model.init_visual_side()
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    text_tokenizer.save(tmp / TOKENIZER_DIR)
    vq = run_vq_dir(cfg)
    if vq is not None:
        shutil.copytree(vq, tmp / VQ_DIR)
    else:
        logger.info("no VQ-GAN (set vq: or init_from with a vq/ folder): %s has no vq/", out)
    if cfg.init_from is not None and (Path(cfg.init_from) / GENERATION_CONFIG).is_file():
        shutil.copy(Path(cfg.init_from) / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
    prompt_order = run_prompt_order(cfg)
    if prompt_order != load_prompt_order(tmp):
        save_prompt_order(tmp, prompt_order)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    tmp.rename(out)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """A training checkpoint (`OUT/checkpoints/step_*`, any number of ranks) as a model folder at `out`.

    Refused: a folder that is not a complete checkpoint, an existing `out` without `overwrite`, and a
    checkpoint taken during an `image_positions_ramp_steps` ramp (its rotations are a mix of 1-D and
    2-D, which no saved model can express).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    meta = read_meta(checkpoint)
    cfg = from_dict(TrainConfig, meta["train_config"])
    step = meta["step"]
    if step < cfg.image_positions_ramp_steps:
        raise MarsError(f"{checkpoint} is at step {step} of a {cfg.image_positions_ramp_steps}-step ramp into 2-D "
                        "image positions: its rotations are a mix that no saved model expresses; export a "
                        f"checkpoint from step {cfg.image_positions_ramp_steps} on")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise MarsError(f"{out} exists and is not an empty folder; choose another --out or pass --overwrite")
    model = load_checkpoint_model(checkpoint)
    return write_model_folder(model, out, cfg, run_text_tokenizer(cfg, model.config.text_tokenizer))
