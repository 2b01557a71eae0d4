"""`TrainConfig`: one dataclass per training run, read from a stage YAML plus `key=value` overrides.

    cfg = load_train_config("configs/debug/stage1.yaml", ["out_dir=runs/x", "max_steps=10"])

Unknown keys and mistyped values are rejected with a one-line `MarsError` (`mars.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mars.config import load_config
from mars.data.negatives import check_swap_groups
from mars.errors import MarsError
from mars.pipeline import check_prompt_order

STAGES = ("stage0", "stage1", "stage2", "stage3")
TASKS = ("lm", "t2i", "i2t", "dpo")


@dataclass
class DataConfig:
    """Where training samples come from and how sequences are built."""

    shards: str | None = None  # folder of preprocessed code shards (`mars preprocess` output)
    synthetic: int = 0  # > 0: N MARS-Shapes scenes tokenized by a fixed colour-palette quantizer (debug)
    text: str | None = None  # stage 0 corpus: .txt (one document per line) or .jsonl {"text": ...}
    preferences: list[str] | None = None  # task dpo: `mars preferences` folders (one, or several pooled)
    seed: int = 0  # data order and per-sample choices are a function of (seed, step) only
    cfg_dropout: float = 0.1  # T2I: fraction of prompts replaced by the null (empty) prompt
    zh_fraction: float = 0.5  # T2I/I2T: fraction of samples using the Chinese caption when present
    max_text_len: int = 64  # caption tokens kept (prompt or I2T target)
    seq_len: int = 256  # stage 0: tokens kept per LM document

    def __post_init__(self) -> None:
        if self.shards and self.synthetic:
            raise MarsError("data: set only one of data.shards (a folder) or data.synthetic (N > 0)")
        for key in ("cfg_dropout", "zh_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise MarsError(f"data.{key} must lie in [0, 1], got {getattr(self, key)}")
        if self.max_text_len <= 0 or self.seq_len <= 1:
            raise MarsError("data.max_text_len must be > 0 and data.seq_len > 1")


@dataclass
class TrainConfig:
    """Everything a training run needs; `mars train CONFIG.yaml key=value ...` builds one."""

    stage: str = "stage1"  # stage0 (text LM) | stage1 (T2I + I2T) | stage2 (T2I) | stage3 (T2I, 512 px)
    out_dir: str = "runs/train"
    init_from: str | None = None  # a MARS model folder (`mars init` output or a previous stage's final/)
    model: str | dict[str, Any] | None = None  # preset name or mapping: build from scratch (stage 0, debug)
    # only image_size / max_seq_len (stage 3) and image_positions (2d: codes on a grid; no weights change)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # > 0 with model_overrides {image_positions: 2d} on a 1-D model: move its rotations from 1-D to 2-D
    # positions linearly over the first N steps (mars.model.semvie.blend_rope) instead of at once
    image_positions_ramp_steps: int = 0
    init_visual: bool = False  # re-copy the visual side from the text side after loading
    tokenizer: str | None = None  # text tokenizer for a scratch model (default: the config's kind)
    vq: str | None = None  # VQ-GAN folder copied into final/vq (default: init_from/vq)
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=64))
    # How the trained model's captions state relations, written to final/generation_config.json
    # ("prompt_order", read by MarsPipeline): as-written | reading (captions of shapes:N:SEED:reading-order
    # or `mars data shapes --reading-order`). None: the data's own when data.shards were preprocessed from a
    # shapes:N:SEED[:reading-order] spec, else init_from's, else as-written
    prompt_order: str | None = None
    tasks: dict[str, float] = field(default_factory=lambda: {"t2i": 0.5, "i2t": 0.5})  # task of each step ~ weights

    # optimisation
    batch_size: int = 8  # global sequences per optimizer step (all ranks, all micro-batches)
    micro_batch_size: int = 8  # sequences per forward on one rank (gradient accumulation above it)
    max_steps: int = 100
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.1  # on matrices only; never on norms, biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    t2i_loss_vocab: str = "full"  # full: softmax over the whole vocabulary; visual: new rows only
    # > 0: add the prompt-contrast term (mars.train.losses.t2i_contrast_loss) with this weight: each
    # image is also scored after another row's prompt (2x the T2I compute), pushed t2i_contrast_margin
    # nats per image below its own prompt's likelihood. Like the cross-entropy, the per-image terms are
    # divided by the batch's loss tokens, so a weight W counts one image's term like W code tokens.
    t2i_contrast_weight: float = 0.0
    t2i_contrast_margin: float = 10.0
    # > 0: the term runs for the stage's first N steps only, then plain T2I (once the model reads the
    # prompt the likelihood keeps it reading, and a plain step costs half as much); 0 = every step
    t2i_contrast_steps: int = 0
    # Word groups ([[left, right], [small, large, big], ...]; mars.data.negatives): when set, an image's
    # other prompt is its own caption with one group's words swapped (a hard negative: relations,
    # sizes, which colour goes with which shape), else another row's prompt as above; logs counterfactual_gap
    # (and counterfactual_gap_en / _zh by the caption's language)
    t2i_contrast_swaps: list[list[str]] = field(default_factory=list)
    # > 1: samples whose English or Chinese caption a swap group matches are drawn this many times per epoch
    # (mars.data.negatives.oversampled_epoch), so more rows per step carry a counterfactual; every task
    # sees the oversampled order
    t2i_contrast_repeat: int = 1
    # Knowledge distillation: a MARS model folder (same vocabulary, image grid, text tokenizer) whose next-token
    # distributions the run also matches, distill_weight x KL(teacher || student) per loss token
    # (mars.train.losses.kl_per_position); e.g. the init_from model itself when model_overrides change positions.
    # The teacher is frozen, held whole on every rank, and costs one forward without autograd per micro-batch.
    distill_from: str | None = None
    distill_weight: float = 0.0
    # true: rows whose prompt carries a counterfactual (t2i_contrast_swaps, on contrast steps) are left out of
    # the distillation term, so the contrast term can teach them what the teacher does not know (e.g. a
    # relation the teacher draws at chance, whose KL would hold the student there); every other row is pulled
    distill_skip_counterfactual: bool = False
    # Preference optimisation (task dpo; mars.train.losses.dpo_loss): pairs of the model's own images, the better
    # one first (`mars preferences`, data.preferences), trained against a frozen reference model (default:
    # init_from) with this beta (nats of log-ratio per unit of margin). Beside t2i / i2t (tasks {dpo: 3, i2t: 1}),
    # a step is a dpo step with probability its weight's share, else a likelihood step on data.shards / synthetic
    dpo_beta: float = 0.1
    dpo_reference: str | None = None
    dpo_min_score_gap: float = 0.0  # leave out pairs whose best and worst candidate score closer than this (nats)
    dpo_chosen_nll_weight: float = 0.0  # > 0: also this weight x the chosen image's NLL per token (holds it up)

    # execution
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # bf16 (autocast / FSDP mixed precision) | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    prefix_no_grad: bool = True  # T2I: text prefix once without autograd into a KV cache
    seed: int = 0

    # checkpoints and feedback
    save_every: int = 100  # 0 = only the final model
    keep_last: int = 2
    resume: str = "never"  # never | auto | PATH of a checkpoint folder
    log_every: int = 10  # a line in train.log every N steps (metrics.jsonl has every step)
    tensorboard: bool = True
    sample_every: int = 0  # 0 = never; needs a VQ (init_from/vq or vq:)
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "一个蓝色的正方形"])

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise MarsError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if (self.init_from is None) == (self.model is None):
            raise MarsError("set exactly one of init_from (a model folder) or model (a preset to build from scratch)")
        unknown = set(self.model_overrides) - {"image_size", "max_seq_len", "image_positions"}
        if unknown:
            raise MarsError(f"model_overrides may only change image_size, max_seq_len and image_positions, "
                            f"got {sorted(unknown)}")
        if self.image_positions_ramp_steps < 0 or self.image_positions_ramp_steps > self.max_steps:
            raise MarsError(f"image_positions_ramp_steps must lie in [0, max_steps={self.max_steps}] (a model saved "
                            f"mid-ramp would be neither 1-D nor 2-D), got {self.image_positions_ramp_steps}")
        allowed = ("lm",) if self.stage == "stage0" else ("t2i", "i2t", "dpo")
        if not self.tasks or any(t not in allowed or w <= 0 for t, w in self.tasks.items()):
            raise MarsError(f"{self.stage} tasks must be positive weights over {', '.join(allowed)}, got {self.tasks}")
        self._check_preferences()
        if not (self.data.shards or self.data.synthetic or self.data.preferences
                or (self.stage == "stage0" and self.data.text)):
            raise MarsError("no training data: set data.shards (or data.synthetic; data.text for stage0)")
        if self.micro_batch_size <= 0 or self.batch_size <= 0 or self.max_steps <= 0:
            raise MarsError("batch_size, micro_batch_size and max_steps must be positive")
        if self.batch_size % self.micro_batch_size:
            raise MarsError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if self.t2i_loss_vocab not in ("full", "visual"):
            raise MarsError(f"t2i_loss_vocab must be full or visual, got {self.t2i_loss_vocab!r}")
        if self.t2i_contrast_weight < 0 or self.t2i_contrast_margin < 0:
            raise MarsError("t2i_contrast_weight and t2i_contrast_margin must be >= 0")
        self.t2i_contrast_swaps = check_swap_groups(self.t2i_contrast_swaps)
        if self.t2i_contrast_swaps and self.t2i_contrast_weight == 0:
            raise MarsError("t2i_contrast_swaps makes negatives for the contrast term: set t2i_contrast_weight > 0")
        if self.distill_weight < 0 or (self.distill_weight > 0) != (self.distill_from is not None):
            raise MarsError(f"distillation needs both distill_from (a teacher model folder) and distill_weight > 0, "
                            f"got distill_from={self.distill_from!r}, distill_weight={self.distill_weight}")
        if self.distill_skip_counterfactual and not (self.distill_from and self.t2i_contrast_swaps):
            raise MarsError("distill_skip_counterfactual leaves rows with a counterfactual prompt out of the "
                            "distillation term: it needs distill_from and t2i_contrast_swaps")
        if self.t2i_contrast_repeat < 1:
            raise MarsError(f"t2i_contrast_repeat must be >= 1 (1 = no oversampling), got {self.t2i_contrast_repeat}")
        if self.t2i_contrast_repeat > 1 and not (self.t2i_contrast_swaps and "t2i" in self.tasks):
            raise MarsError("t2i_contrast_repeat oversamples the captions that t2i_contrast_swaps matches: "
                            "set t2i_contrast_swaps, in a stage with a t2i task")
        if self.t2i_contrast_steps < 0:
            raise MarsError(f"t2i_contrast_steps must be >= 0 (0 = every step), got {self.t2i_contrast_steps}")
        if self.prompt_order is not None:
            check_prompt_order(self.prompt_order)
        if self.precision not in ("bf16", "fp32"):
            raise MarsError(f"precision must be bf16 or fp32, got {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise MarsError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.save_every < 0 or self.keep_last < 1:
            raise MarsError("save_every must be >= 0 and keep_last >= 1")

    def _check_preferences(self) -> None:
        """Task dpo trains on data.preferences, beside t2i / i2t steps on other data or alone, with
        nothing that only the likelihood steps' extra terms would use."""
        if "dpo" not in self.tasks:
            if self.data.preferences:
                raise MarsError("data.preferences holds preference pairs for task dpo: add dpo to tasks")
            return
        if not self.data.preferences:
            raise MarsError("task dpo needs data.preferences (a `mars preferences` folder, or a list of them)")
        others = sorted(t for t in self.tasks if t != "dpo")
        if others and not (self.data.shards or self.data.synthetic):
            raise MarsError(f"tasks {', '.join(others)} beside dpo need data.shards (or data.synthetic) for their steps")
        if not others and (self.data.shards or self.data.synthetic):
            raise MarsError("task dpo alone trains on data.preferences only: drop data.shards / data.synthetic, "
                            "or add the t2i / i2t task that would use them")
        if self.dpo_beta <= 0 or self.dpo_min_score_gap < 0 or self.dpo_chosen_nll_weight < 0:
            raise MarsError(f"dpo_beta must be > 0, dpo_min_score_gap and dpo_chosen_nll_weight >= 0, got "
                            f"{self.dpo_beta}, {self.dpo_min_score_gap} and {self.dpo_chosen_nll_weight}")
        unused = [key for key, off in (("distill_from", None), ("t2i_contrast_weight", 0.0),
                                       ("image_positions_ramp_steps", 0)) if getattr(self, key) != off]
        if unused:
            raise MarsError(f"a stage with task dpo does not use {', '.join(unused)}; its frozen reference model "
                            "(dpo_reference) is what holds the run near where it started")

    def image_position_blend(self, step: int) -> float:
        """How far step `step` rotates by 2-D rather than 1-D image positions (1 = all the way)."""
        if self.image_positions_ramp_steps == 0:
            return 1.0
        return min(1.0, step / self.image_positions_ramp_steps)

    def contrast_at(self, step: int) -> bool:
        """Whether the prompt-contrast term runs at `step` (on its T2I batches)."""
        return self.t2i_contrast_weight > 0 and (self.t2i_contrast_steps == 0 or step < self.t2i_contrast_steps)

    def accumulation(self, world_size: int = 1) -> int:
        """Micro-batches per rank per optimizer step."""
        if self.batch_size % (world_size * self.micro_batch_size):
            raise MarsError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                            f"{self.micro_batch_size} x {world_size} rank(s)")
        return self.batch_size // (world_size * self.micro_batch_size)


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """A `TrainConfig` from a YAML file and `key=value` overrides (dotted keys reach `data.`)."""
    return load_config(TrainConfig, path, overrides)
