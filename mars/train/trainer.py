"""One trainer for every stage, in one process or under `torchrun` (FSDP2).

    cfg = load_train_config("configs/debug/stage1.yaml", ["out_dir=runs/x"])
    Trainer(cfg, init_distributed(cfg.device)).run()     # -> runs/x/final (a MARS model folder)

A step: the mixer picks the step's task (t2i / i2t / lm, by the config's weights; dpo on preference
pairs, `mars.train.data.PreferenceStepData`, alone or beside t2i / i2t), this rank takes its
micro-batches of the global batch (`mars.train.data.StepData`), each micro-batch's summed token
loss (a dpo micro-batch's summed pair losses) is divided by the loss-token (pair) count of the
WHOLE global batch (all ranks, all micro-batches), backward per micro-batch, clip, AdamW,
schedule. That normalisation makes loss and gradients independent of how the batch is split, so N
ranks reproduce one process. Outputs under `out_dir`: metrics.jsonl (one line per step), tb/,
train.log, checkpoints/, final/.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mars.config import apply_overrides, model_config_from, to_dict
from mars.cpu import flush_denormals
from mars.data.negatives import oversampled_epoch
from mars.data.sequences import SequenceBuilder
from mars.errors import MarsError
from mars.model.semvie import SemVIE, load_model_config
from mars.model_dir import load_model_text_tokenizer
from mars.train import checkpoint, parallel
from mars.train.config import TrainConfig
from mars.train.data import (PreferenceMixData, PreferenceStepData, StepData, TextCorpus, read_text_corpus,
                             synthetic_shards)
from mars.train.export import run_prompt_order, run_text_tokenizer, run_vq_dir, write_model_folder
from mars.train.losses import dpo_loss, t2i_contrast_loss, task_loss
from mars.train.parallel import DistEnv
from mars.train.preferences import PreferencePairs
from mars.train.stages import set_trainable, text_path_frozen
from mars.vocab import MultimodalVocab

logger = logging.getLogger("mars.train")


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to 1, then cosine decay to `min_lr_ratio` at `max_steps`."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters only; weight decay on matrices, never on norms or biases."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def resolve_model_config(cfg: TrainConfig):
    """The architecture: from init_from's config.json, or a preset / mapping; then model_overrides."""
    if cfg.init_from is not None:
        base = load_model_config(cfg.init_from)
    else:
        base = model_config_from(cfg.model)
    resolved = apply_overrides(base, dict(cfg.model_overrides)) if cfg.model_overrides else base
    if cfg.image_positions_ramp_steps and (base.image_positions, resolved.image_positions) != ("1d", "2d"):
        raise MarsError(f"image_positions_ramp_steps moves a 1-D model into 2-D positions: it needs a 1-D model "
                        f"and model_overrides {{image_positions: 2d}}; {cfg.init_from or 'the model'} has "
                        f"image_positions {base.image_positions}, the run {resolved.image_positions}")
    return resolved


class Trainer:
    """Set up model, data, optimizer and checkpoints from a `TrainConfig`; `run()` trains."""

    def __init__(self, cfg: TrainConfig, env: DistEnv | None = None) -> None:
        self.cfg = cfg
        self.env = env or DistEnv()
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / "checkpoints"
        self._notes: set[str] = set()  # one-time log messages already given
        self._setup_logging()
        if self.env.device.type == "cpu":
            flush_denormals()
        torch.manual_seed(cfg.seed)
        self.model_config = resolve_model_config(cfg)
        self.text_tokenizer = run_text_tokenizer(cfg, self.model_config.text_tokenizer)
        self.bf16 = cfg.precision == "bf16"
        self.model = self._build_model()
        self.teacher = self._load_frozen(cfg.distill_from, "distillation teacher") if cfg.distill_from else None
        self.reference = self._load_reference()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.data = self._build_data()
        # resolved once, so checkpoints (and `mars export` of them) record it
        cfg.prompt_order = run_prompt_order(cfg)
        logger.info("prompt order of the trained model: %s", cfg.prompt_order)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.start_step = self._maybe_resume()

    # --- setup -----------------------------------------------------------------------------------
    def _setup_logging(self) -> None:
        """Rank 0 logs to stderr and OUT/train.log ("mars.train.*" loggers); other ranks only warnings."""
        log = logging.getLogger("mars.train")
        for handler in log.handlers:  # a previous run in this process
            handler.close()
        log.handlers.clear()
        log.propagate = False
        if not self.env.is_main:
            log.setLevel(logging.WARNING)
            return
        self.out.mkdir(parents=True, exist_ok=True)
        for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(self.out / "train.log")):
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
            log.addHandler(handler)
        log.setLevel(logging.INFO)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        """The starting weights, on rank 0's CPU: init_from's, or a seeded fresh init."""
        cfg = self.cfg
        if cfg.init_from is not None:
            # fp32 master weights, also from fp16 files
            model = SemVIE.from_pretrained(cfg.init_from, dtype=torch.float32)
        else:
            torch.manual_seed(cfg.seed)
            model = SemVIE(self.model_config)
        if cfg.init_visual:
            model.init_visual_side()
        return model.state_dict()

    def _build_model(self) -> torch.nn.Module:
        """meta -> set_trainable -> activation checkpointing -> compile -> FSDP -> materialise -> load."""
        cfg, env = self.cfg, self.env
        with torch.device("meta"):
            model = SemVIE(self.model_config)
        set_trainable(model, cfg.stage)  # logs and asserts the trainable count per group
        self.prefix_no_grad = cfg.prefix_no_grad and text_path_frozen(model)
        if cfg.prefix_no_grad and not self.prefix_no_grad and "t2i" in cfg.tasks:
            raise MarsError("prefix_no_grad needs a frozen text side; set prefix_no_grad=false for this stage")
        if (cfg.t2i_contrast_weight > 0 or "dpo" in cfg.tasks) and not self.prefix_no_grad:
            raise MarsError("t2i_contrast_weight and task dpo need the frozen-text T2I path (prefix_no_grad with a "
                            "frozen text side)")
        if cfg.activation_checkpointing:
            parallel.apply_activation_checkpointing(model)
        if cfg.compile:
            parallel.apply_compile(model)
        if env.distributed:
            parallel.apply_fsdp(model, self.bf16)
        model.to_empty(device=env.device)
        state = self._initial_state() if env.is_main else None
        parallel.load_full_state(model, state, env)
        model.train()
        return model

    def _load_reference(self) -> SemVIE | None:
        """Task dpo's frozen reference model: `dpo_reference`, else the starting model."""
        cfg = self.cfg
        if "dpo" not in cfg.tasks:
            return None
        path = cfg.dpo_reference or cfg.init_from
        if path is None:
            raise MarsError("task dpo compares the model with a reference: set init_from or dpo_reference")
        return self._load_frozen(path, "dpo reference")

    def _load_frozen(self, path: str, role: str) -> SemVIE:
        """A frozen model (distillation teacher, dpo reference), checked to read and write the same ids."""
        frozen_config = load_model_config(path)
        mc = self.model_config
        fields = ("text_vocab_size", "image_vocab_size", "num_special_tokens", "image_tokens")
        differ = [f"{f} {getattr(frozen_config, f)} (the model trained: {getattr(mc, f)})" for f in fields
                  if getattr(frozen_config, f) != getattr(mc, f)]
        if differ:
            raise MarsError(f"a {role} must share the vocabulary and the image grid: "
                            f"{path} has {', '.join(differ)}")
        tokenizer = load_model_text_tokenizer(path, frozen_config.text_tokenizer)
        sample = "a red circle to the left of a blue square 一个红色的圆形在蓝色正方形的左边"  # same size, other merges
        if (tokenizer.identity(), tokenizer.encode(sample)) != (self.text_tokenizer.identity(),
                                                                self.text_tokenizer.encode(sample)):
            raise MarsError(f"the {role} {path} tokenizes text differently from the model trained: "
                            f"a {role} must share the text tokenizer")
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        frozen = SemVIE.from_pretrained(path, device=self.env.device, dtype=dtype).eval()
        frozen.requires_grad_(False)
        if self.env.is_main:
            logger.info("%s: %s (%s image positions)", role, path, frozen_config.image_positions)
        return frozen

    def _build_data(self) -> StepData | PreferenceStepData | PreferenceMixData:
        cfg = self.cfg
        if "dpo" not in cfg.tasks:
            return self._likelihood_data()
        if len(cfg.tasks) == 1:
            return self._preference_data()
        share = cfg.tasks["dpo"] / sum(cfg.tasks.values())
        if self.env.is_main:
            logger.info("a step is a dpo step with probability %.3f, else a %s step", share,
                        " / ".join(t for t in cfg.tasks if t != "dpo"))
        return PreferenceMixData(self._preference_data(), self._likelihood_data(), share, cfg.data.seed)

    def _likelihood_data(self) -> StepData:
        """The t2i / i2t / lm steps' data (code shards, synthetic shards or a text corpus)."""
        cfg, env = self.cfg, self.env
        mc = self.model_config
        if cfg.data.text:
            dataset = TextCorpus(read_text_corpus(cfg.data.text, self.text_tokenizer))
        else:
            dataset = self._code_shards()
        lm = "lm" in cfg.tasks
        builder = SequenceBuilder(
            MultimodalVocab.from_config(mc), self.text_tokenizer,
            t2i_weight=cfg.tasks.get("t2i", 0.0), i2t_weight=cfg.tasks.get("i2t", 0.0),
            lm_weight=cfg.tasks.get("lm", 0.0), null_prompt_prob=cfg.data.cfg_dropout, zh_prob=cfg.data.zh_fraction,
            seed=cfg.data.seed, max_text_len=cfg.data.seq_len if lm else cfg.data.max_text_len,
            contrast_swaps=cfg.t2i_contrast_swaps, counterfactual_at=cfg.contrast_at,
            epoch_pool=self._epoch_pool(dataset))
        if env.is_main:
            logger.info("data: %d samples from %s; tasks %s; %d sequences per step = %d rank(s) x %d x %d micro-batch",
                        len(dataset), cfg.data.text or cfg.data.shards or "synthetic shards", cfg.tasks, cfg.batch_size, env.world_size,
                        cfg.accumulation(env.world_size), cfg.micro_batch_size)
        instruction = max(len(ids) for ids in builder.instruction_ids.values())
        longest = {"lm": cfg.data.seq_len + 1, "t2i": cfg.data.max_text_len + mc.image_tokens + 2,
                   "i2t": mc.image_tokens + 2 + instruction + cfg.data.max_text_len + 1}
        worst = max(longest[t] for t in cfg.tasks if t != "dpo")
        if worst > mc.max_seq_len:
            raise MarsError(f"sequences of up to {worst} tokens exceed max_seq_len {mc.max_seq_len}; "
                            "lower data.max_text_len / data.seq_len")
        return StepData(dataset, builder, cfg.batch_size, cfg.micro_batch_size, env.rank, env.world_size)

    def _preference_data(self) -> PreferenceStepData:
        """Task dpo's pairs (`data.preferences`, every folder's pooled), checked to be codes of this
        model's VQ-GAN and grid."""
        cfg, env, mc = self.cfg, self.env, self.model_config
        vq = self._vq()
        vq_codes_hash = vq.codes_hash() if vq is not None else None
        pooled = []
        for folder in cfg.data.preferences:
            pairs = PreferencePairs(folder, cfg.dpo_min_score_gap)
            made = pairs.settings
            if vq_codes_hash is not None and made["vq_codes_hash"] != vq_codes_hash:
                raise MarsError(f"the preference pairs in {folder} are codes of another VQ-GAN than this run's "
                                f"({run_vq_dir(cfg)})")
            if made["image_grid"] != mc.image_grid:
                raise MarsError(f"the preference pairs in {folder} are {made['image_grid']} x {made['image_grid']} "
                                f"codes, the model draws {mc.image_grid} x {mc.image_grid}")
            if env.is_main:
                logger.info("data: %d preference pairs from %s (%d left out: score gap < %g nats)",
                            len(pairs), folder, pairs.dropped, cfg.dpo_min_score_gap)
            pooled += pairs.pairs
        if cfg.data.max_text_len + mc.image_tokens + 2 > mc.max_seq_len:
            raise MarsError(f"data.max_text_len {cfg.data.max_text_len} + an image exceeds max_seq_len {mc.max_seq_len}")
        return PreferenceStepData(pooled, MultimodalVocab.from_config(mc), self.text_tokenizer, cfg.batch_size,
                                  cfg.micro_batch_size, cfg.data.seed, cfg.data.max_text_len, env.rank, env.world_size)

    def _epoch_pool(self, dataset) -> np.ndarray | None:
        """With t2i_contrast_repeat > 1, the oversampled epoch (mars.data.negatives.oversampled_epoch)."""
        cfg = self.cfg
        if cfg.t2i_contrast_repeat == 1:
            return None
        pool = oversampled_epoch(dataset.captions(), cfg.t2i_contrast_swaps, cfg.t2i_contrast_repeat)
        if self.env.is_main:
            logger.info("t2i_contrast_repeat %d: %d of %d samples have a swappable caption; an epoch is %d rows",
                        cfg.t2i_contrast_repeat, (len(pool) - len(dataset)) // (cfg.t2i_contrast_repeat - 1),
                        len(dataset), len(pool))
        return pool

    def _code_shards(self):
        """The preprocessed code shards (written first for `data.synthetic`), checked against the model."""
        cfg, env, mc = self.cfg, self.env, self.model_config
        from mars.data.shards import open_shards

        if cfg.data.synthetic:
            folder = self.out / "data"
            if env.is_main:
                synthetic_shards(folder, cfg.data.synthetic, cfg.data.seed, mc, self.text_tokenizer)
            parallel.barrier(env)
        else:
            folder = Path(cfg.data.shards)
        # Codes from another VQ-GAN would train garbage: check the shards' tokenizer hash.
        vq = None if cfg.data.synthetic else self._vq()
        return open_shards(folder, expect_vq_hash=vq.identity_hash() if vq is not None else None,
                           expect_vq_codes_hash=vq.codes_hash() if vq is not None else None,
                           expect_text_tokenizer=self.text_tokenizer,
                           expect_image_tokens=None if "lm" in cfg.tasks else mc.image_tokens)

    def _maybe_resume(self) -> int:
        cfg, env = self.cfg, self.env
        if env.is_main:
            checkpoint.clean_partial(self.ckpt_root)
        parallel.barrier(env)
        if cfg.resume == "never":
            path = None
        elif cfg.resume == "auto":
            path = checkpoint.latest_checkpoint(self.ckpt_root)
            if path is None and env.is_main:
                logger.info("resume=auto: no checkpoint in %s, starting fresh", self.ckpt_root)
        else:
            path = Path(cfg.resume)
        if path is None:
            if env.is_main:
                (self.out / "metrics.jsonl").write_text("")
            return 0
        meta = checkpoint.read_meta(path)
        if meta["stage"] != cfg.stage:
            raise MarsError(f"checkpoint {path} is from {meta['stage']}, this run is {cfg.stage}")
        checkpoint.load_checkpoint(path, self.model, self.optimizer, self.scheduler, env)
        step = meta["step"]
        if env.is_main:
            logger.info("resumed from %s (step %d)", path, step)
            self._truncate_metrics(step)
        return step

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines of steps after the checkpoint: they will be redone."""
        file = self.out / "metrics.jsonl"
        lines = file.read_text().splitlines() if file.is_file() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        file.write_text("".join(line + "\n" for line in kept))

    # --- training ----------------------------------------------------------------------------------
    def autocast(self):
        """bf16 autocast in one process; under FSDP its mixed-precision policy casts instead."""
        if not self.bf16 or self.env.distributed:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16)

    def train_step(self, step: int) -> dict:
        """One optimizer step; returns its metrics (identical on every rank)."""
        cfg, env, model = self.cfg, self.env, self.model
        task, micro = self.data.micro_batches(step)
        local = torch.tensor([float(sum(m.num_tokens for m in micro))], dtype=torch.float64)
        num_targets = float(parallel.all_reduce_sum(local, env).item())  # loss tokens of the global batch
        # this rank's sums, all-reduced after the step: cross-entropy, tokens, prompt gaps over their pairs,
        # counterfactual gaps over theirs (all rows, then Chinese-caption rows), distillation KL; dpo steps: pairs
        # preferred, margins, both log-ratios and the chosen images' NLL per token
        totals = dict.fromkeys(("ce", "tokens", "gap", "pairs", "cf_gap", "cf_pairs", "cf_gap_zh", "cf_pairs_zh",
                                "kl", "dpo_right", "dpo_margin", "dpo_chosen", "dpo_rejected", "dpo_chosen_nll"), 0.0)
        cache_dtype = torch.bfloat16 if self.bf16 else torch.float32
        contrast = task == "t2i" and cfg.contrast_at(step)
        model.image_position_blend = cfg.image_position_blend(step)
        for i, mb in enumerate(micro):
            parallel.set_grad_sync(model, i == len(micro) - 1)
            batch = mb.batch.to(env.device)
            with self.autocast():
                if task == "dpo":  # the loss logged is the summed DPO objective; num_targets counts pairs
                    parts = dpo_loss(model, self.reference, batch, cfg.dpo_beta, vocab=cfg.t2i_loss_vocab,
                                     cache_dtype=cache_dtype, chosen_nll_weight=cfg.dpo_chosen_nll_weight)
                    objective = reported = parts.loss_sum
                    totals["dpo_right"] += parts.accuracy_sum
                    totals["dpo_margin"] += parts.margin_sum
                    totals["dpo_chosen"] += parts.chosen_logratio_sum
                    totals["dpo_rejected"] += parts.rejected_logratio_sum
                    totals["dpo_chosen_nll"] += parts.chosen_nll_sum
                else:  # the loss logged is the plain cross-entropy
                    if contrast:
                        parts = t2i_contrast_loss(model, batch, cfg.t2i_contrast_margin, vocab=cfg.t2i_loss_vocab,
                                                  cache_dtype=cache_dtype, teacher=self.teacher,
                                                  skip_counterfactual_distill=cfg.distill_skip_counterfactual)
                        objective = parts.ce_sum + cfg.t2i_contrast_weight * parts.contrast_sum
                        totals["gap"] += parts.gap_sum
                        totals["pairs"] += parts.num_pairs
                        totals["cf_gap"] += parts.counterfactual_gap_sum
                        totals["cf_pairs"] += parts.num_counterfactual
                        totals["cf_gap_zh"] += parts.counterfactual_gap_sum_zh
                        totals["cf_pairs_zh"] += parts.num_counterfactual_zh
                    else:
                        parts = task_loss(model, batch, prefix_no_grad=self.prefix_no_grad,
                                          vocab=cfg.t2i_loss_vocab, cache_dtype=cache_dtype, teacher=self.teacher)
                        objective = parts.ce_sum
                    reported = parts.ce_sum
                    if parts.distill_sum is not None:
                        objective = objective + cfg.distill_weight * parts.distill_sum
                        totals["kl"] += float(parts.distill_sum.detach())
            # Mean over the global batch's loss tokens; x world_size because FSDP averages over ranks.
            (objective * (env.world_size / num_targets)).backward()
            totals["ce"] += float(reported.detach())
            totals["tokens"] += batch.input_ids.numel()
        grad_norm = parallel.clip_grad_norm(self.trainable, cfg.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        reduced = parallel.all_reduce_sum(torch.tensor(list(totals.values()), dtype=torch.float64), env).tolist()
        sums = dict(zip(totals, reduced))
        loss = sums["ce"] / num_targets
        metrics = {"step": step + 1, "task": task, "loss": loss, f"loss_{task}": loss, "lr": lr,
                   "grad_norm": grad_norm, "tokens": int(sums["tokens"])}
        if task == "dpo":  # per pair: how often and by how much the run prefers the chosen image more than the
            # reference does, and how far each image's log-likelihood moved from the reference's (nats)
            metrics.update(dpo_accuracy=sums["dpo_right"] / num_targets, dpo_margin=sums["dpo_margin"] / num_targets,
                           dpo_chosen_logratio=sums["dpo_chosen"] / num_targets,
                           dpo_rejected_logratio=sums["dpo_rejected"] / num_targets,
                           dpo_chosen_nll=sums["dpo_chosen_nll"] / num_targets)
        if self.teacher is not None:  # nats per loss token by which the run's distributions differ from the teacher's
            metrics["distill_kl"] = sums["kl"] / num_targets
        if model.image_position_blend < 1.0:
            metrics["image_position_blend"] = model.image_position_blend
        if contrast and sums["pairs"] > 0:  # nats per image that another row's prompt costs the image
            metrics["prompt_gap"] = sums["gap"] / sums["pairs"]
        if contrast and sums["cf_pairs"] > 0:  # ... its own caption with words swapped costs it (t2i_contrast_swaps)
            metrics["counterfactual_gap"] = sums["cf_gap"] / sums["cf_pairs"]
            english = (sums["cf_gap"] - sums["cf_gap_zh"], sums["cf_pairs"] - sums["cf_pairs_zh"])
            for lang, (gap_sum, num) in (("en", english), ("zh", (sums["cf_gap_zh"], sums["cf_pairs_zh"]))):
                if num > 0:  # the same, by the language of the row's caption
                    metrics[f"counterfactual_gap_{lang}"] = gap_sum / num
        if contrast and cfg.t2i_contrast_swaps and sums["pairs"] > 0:  # pairs whose caption a swap group matched
            metrics["counterfactual_share"] = sums["cf_pairs"] / sums["pairs"]
        return metrics

    def run(self) -> Path:
        """Train from `start_step` to `max_steps`; returns the final model folder."""
        cfg, env = self.cfg, self.env
        writer = self._tensorboard()
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, desc=cfg.stage, unit="step",
                   disable=not env.is_main, dynamic_ncols=True)
        metrics_file = self.out / "metrics.jsonl"
        for step in range(self.start_step, cfg.max_steps):
            start = time.perf_counter()
            metrics = self.train_step(step)
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - start)
            if not math.isfinite(metrics["loss"]):
                raise MarsError(f"loss became {metrics['loss']} at step {step + 1}; lower lr or check the data")
            if env.is_main:
                with metrics_file.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if writer is not None:
                    for key, value in metrics.items():
                        if key not in ("step", "task"):
                            writer.add_scalar(f"train/{key}", value, metrics["step"])
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
                if cfg.log_every and metrics["step"] % cfg.log_every == 0:
                    logger.info("step %d  %s loss %.4f  lr %.2e  grad norm %.3f  %.0f tok/s", metrics["step"],
                                metrics["task"], metrics["loss"], metrics["lr"], metrics["grad_norm"],
                                metrics["tokens_per_s"])
            done = step + 1
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
                self.save_checkpoint(done)
            if cfg.sample_every and done % cfg.sample_every == 0:
                self.sample(done, writer)
        self.model.image_position_blend = 1.0  # a ramp ends by max_steps: the saved model rotates by 2-D positions
        bar.close()
        if cfg.save_every:
            self.save_checkpoint(cfg.max_steps)
        final = self.save_final()
        if writer is not None:
            writer.close()
        return final

    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.env.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.out / "tb"))

    # --- outputs -----------------------------------------------------------------------------------
    def save_checkpoint(self, step: int) -> Path:
        meta = {"stage": self.cfg.stage, "data_position": {"step": step}, "model_config": self.model_config.to_dict(),
                "train_config": to_dict(self.cfg)}
        path = checkpoint.save_checkpoint(self.ckpt_root, step, self.model, self.optimizer, self.scheduler, meta,
                                          self.env, self.cfg.keep_last)
        if self.env.is_main:
            logger.info("checkpoint %s", path)
        return path

    def save_final(self) -> Path:
        """`out_dir/final`: a model folder (`mars.train.export.write_model_folder`) that MarsPipeline loads."""
        state = parallel.full_state_dict(self.model, self.env)
        final = self.out / "final"
        if self.env.is_main:
            with torch.device("meta"):
                model = SemVIE(self.model_config)
            model.load_state_dict(state, assign=True)
            write_model_folder(model, final, self.cfg, self.text_tokenizer)
            logger.info("final model: %s", final)
        parallel.barrier(self.env)
        return final

    def _vq(self):
        """The VQ-GAN (loaded once), or None when the run has none."""
        if not hasattr(self, "_vq_model"):
            from mars.vq.io import load_tokenizer

            path = run_vq_dir(self.cfg)
            self._vq_model = load_tokenizer(path, device=self.env.device) if path is not None else None
        return self._vq_model

    def _note_once(self, message: str) -> None:
        if self.env.is_main and message not in self._notes:
            logger.info("%s", message)
            self._notes.add(message)

    @torch.no_grad()
    def sample(self, step: int, writer) -> None:
        """Images for `sample_prompts` (CFG 4, seeds 0..n-1) -> OUT/samples/step_N/*.png and tensorboard."""
        if self.env.distributed:
            self._note_once("sampling skipped: it runs in one-process runs (under FSDP every rank would "
                            "have to decode in lockstep); sample from final/ with `mars generate`")
            return
        vq = self._vq()
        if vq is None:
            self._note_once("sampling skipped: no VQ-GAN (set vq: or init_from with a vq/ folder)")
            return
        from mars.data.images import tensor_to_pil
        from mars.generate import SampleConfig, generate_image_tokens, make_generators

        prompts = [self.text_tokenizer.encode(p) for p in self.cfg.sample_prompts]
        grid = self.model_config.image_grid
        with self.autocast():
            codes = generate_image_tokens(self.model, prompts, make_generators(range(len(prompts)), self.env.device),
                                          grid * grid, SampleConfig(cfg_scale=4.0))
        images = vq.decode_codes(codes.view(len(prompts), grid, grid)).float().cpu()  # (B, 3, H, W) in [-1, 1]
        folder = self.out / "samples" / checkpoint.checkpoint_name(step)
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            tensor_to_pil(image).save(folder / f"{i:02d}.png")
            if writer is not None:
                writer.add_image(f"samples/{i:02d}", (image + 1) / 2, step)
        logger.info("samples: %s", folder)
