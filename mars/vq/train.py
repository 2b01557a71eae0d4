"""Train a VQ-GAN tokenizer: `mars tokenizer train CONFIG.yaml [key=value ...]`.

One process, CPU or one GPU. Every `ckpt_every` steps the full training state (model,
discriminator, both optimizers, step, RNG states, data position, code-usage counters) is written
atomically to OUT/ckpt.pt; `resume=auto` continues from it and reproduces the uninterrupted run
exactly. Metrics go to OUT/metrics.jsonl and TensorBoard (OUT/tb), the final tokenizer to
OUT/final (`VQModel.save_pretrained`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from mars.config import apply_overrides, from_dict, read_config_file
from mars.cpu import flush_denormals
from mars.errors import MarsError
from mars.vq.config import VQConfig
from mars.vq.losses import VQGANLoss
from mars.vq.model import DECODER_SIDE, VQModel
from mars.vq.quantizer import CodeUsage
from mars.vq.widen import widen_decoder

CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class VQTrainConfig:
    """Everything a tokenizer training run needs. YAML keys = field names; `model` is a preset
    name, a config file, or a mapping of `VQConfig` fields (optionally with `preset:`)."""

    model: VQConfig = field(default_factory=lambda: VQConfig.from_name("shapes-small"))
    init_from: str = ""  # tokenizer folder to fine-tune (its config must equal `model`), "" = from scratch
    data: str = "shapes:20000:1"  # any `mars.data.datasets.open_source` spec
    resolution: int = 256  # images are resized / centre-cropped to this
    crop_size: int = 128  # random crops of this size are trained on (= resolution: whole images)
    crop_tries: int = 1  # > 1: of this many random crops take the most detailed (largest pixel std)
    batch_size: int = 8
    steps: int = 10000
    lr: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio at `steps`
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    rec_loss: str = "l1"  # "l1" or "l2"
    rec_weight: float = 1.0
    perceptual_weight: float = 1.0
    perceptual_stages: tuple[int, ...] = (0, 1, 2, 3)  # EfficientNet-Lite0 stages compared
    codebook_weight: float = 1.0
    entropy_weight: float = 0.0  # entropy regulariser on soft code assignments (0 = off)
    entropy_temperature: float = 0.01
    entropy_until: int = 0  # step at which the entropy term stops (0 = never): it only guards the start
    trainable: str = "all"  # "all", or "decoder": encoder and codebook frozen, so every code stays put
    disc_start: int = 5000  # step at which the PatchGAN starts (generator and discriminator)
    disc_weight: float = 0.5  # 0 = no GAN
    adaptive_disc_weight: bool = True
    disc_lr: float = 1e-4
    disc_ndf: int = 64
    disc_layers: int = 3
    quantize_after: int = 0  # steps of plain autoencoding first; then every code starts on an encoder output
    restart_dead_codes_every: int = 200  # steps; codes unused in that window move onto encoder outputs
    restart_dead_codes_until: float = 0.8  # fraction of `steps` after which codes stay put
    bf16: bool = False  # bfloat16 autocast (CPU or CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 0
    shuffle_data: bool = True
    out_dir: str = "runs/vq"
    ckpt_every: int = 500
    log_every: int = 10
    image_every: int = 500  # reconstructions to TensorBoard (0 = never)
    resume: str = "auto"  # auto (continue OUT/ckpt.pt if present) | never | PATH to a ckpt.pt

    def __post_init__(self) -> None:
        if self.rec_loss not in ("l1", "l2"):
            raise MarsError(f"rec_loss must be l1 or l2, got {self.rec_loss!r}")
        f = self.model.downsample
        if self.crop_size % f or self.resolution % f:
            raise MarsError(f"crop_size {self.crop_size} and resolution {self.resolution} must be "
                            f"multiples of the downsample factor {f}")
        if self.crop_size > self.resolution:
            raise MarsError(f"crop_size {self.crop_size} exceeds resolution {self.resolution}")
        if self.batch_size < 1 or self.steps < 1 or self.crop_tries < 1:
            raise MarsError("batch_size, steps and crop_tries must be >= 1")
        if self.trainable not in ("all", "decoder"):
            raise MarsError(f"trainable must be 'all' or 'decoder', got {self.trainable!r}")
        if self.trainable == "decoder" and (self.restart_dead_codes_every or self.quantize_after
                                            or self.entropy_weight):
            raise MarsError("trainable=decoder keeps the codes fixed: set restart_dead_codes_every, "
                            "quantize_after and entropy_weight to 0")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model"] = self.model.to_dict()
        return json.loads(json.dumps(data))  # tuples -> lists: plain YAML/JSON/checkpoint values


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> VQTrainConfig:
    """Read a YAML training config and apply `key=value` overrides (`model=PRESET` swaps the
    model preset, `model.codebook_size=1024` sets one field); unknown keys raise MarsError."""
    data = read_config_file(path) if path is not None else {}
    model_spec = data.pop("model", "shapes-small")
    rest = []
    for item in overrides:
        if "=" not in item:
            raise MarsError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if key.strip() == "model":
            model_spec = value
        else:
            rest.append(item)
    config = from_dict(VQTrainConfig, {**data, "model": VQConfig.load(model_spec)})
    return apply_overrides(config, rest)


# ---------------------------------------------------------------------------------------------
# Data: endless batches of random crops with a resumable position
# ---------------------------------------------------------------------------------------------


class CropBatches:
    """Batches (B, 3, crop, crop) in [-1, 1] from a data source, pass after pass.

    The position is (epoch, samples taken in this epoch). Each sample's crop comes from its own
    seeded generator, and an epoch's order is fixed by (seed, epoch), so restoring a position
    replays exactly the same batches.
    """

    def __init__(self, open_epoch: Callable[[int], Iterator[torch.Tensor]], batch_size: int,
                 crop_size: int, seed: int, tries: int = 1):
        self.open_epoch = open_epoch
        self.batch_size, self.crop_size, self.seed, self.tries = batch_size, crop_size, seed, tries
        self.epoch, self.index = 0, 0
        self._it: Iterator[torch.Tensor] | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), 0
        self._it = self.open_epoch(self.epoch)
        for _ in range(int(state["index"])):  # replay (decoding) up to the saved position
            next(self._it)
            self.index += 1

    def _next_image(self) -> torch.Tensor:
        for _ in range(2):
            if self._it is None:
                self._it = self.open_epoch(self.epoch)
            try:
                image = next(self._it)
                self.index += 1
                return image
            except StopIteration:
                self._it, self.epoch, self.index = None, self.epoch + 1, 0
        raise MarsError("the training data source yielded no images")

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        H, W, c = image.shape[-2], image.shape[-1], self.crop_size
        rng = random.Random(f"crop/{self.seed}/{self.epoch}/{self.index}")
        crops = []
        for _ in range(self.tries):
            top, left = rng.randint(0, H - c), rng.randint(0, W - c)
            crops.append(image[:, top:top + c, left:left + c])
        # Mostly-blank crops teach little once the background is learnt: keep the busiest one.
        return max(crops, key=lambda crop: float(crop.std())) if self.tries > 1 else crops[0]

    def next_batch(self) -> torch.Tensor:
        return torch.stack([self._crop(self._next_image()) for _ in range(self.batch_size)])


def source_epochs(spec: str, resolution: int, seed: int, shuffle: bool) -> Callable[[int], Iterator[torch.Tensor]]:
    """Epoch iterators of (3, R, R) tensors in [-1, 1] from an `open_source` spec."""
    from mars.data.datasets import open_source
    from mars.data.images import pil_to_tensor

    source = open_source(spec, resolution, shuffle=shuffle, seed=seed)

    def open_epoch(epoch: int) -> Iterator[torch.Tensor]:
        source.set_epoch(epoch)
        return (pil_to_tensor(sample["image"]) for sample in source)

    return open_epoch


def tensor_epochs(images: torch.Tensor, seed: int, shuffle: bool) -> Callable[[int], Iterator[torch.Tensor]]:
    """Epoch iterators over in-memory images (N, 3, H, W) in [-1, 1]."""

    def open_epoch(epoch: int) -> Iterator[torch.Tensor]:
        order = list(range(images.shape[0]))
        if shuffle:
            random.Random(f"{seed}/{epoch}").shuffle(order)
        return (images[i] for i in order)

    return open_epoch


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_at(step: int, cfg: VQTrainConfig, base_lr: float) -> float:
    """Linear warmup, then cosine decay to base_lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return base_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MarsError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _save_atomic(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (written by a run that died before its next ckpt)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _image_grid(images: torch.Tensor, recon: torch.Tensor, n: int = 4) -> torch.Tensor:
    """Originals above reconstructions: (3, 2H, nW) in [0, 1]."""
    top = torch.cat(list(images[:n].float().cpu()), dim=2)
    bottom = torch.cat(list(recon[:n].detach().float().cpu().clamp(-1, 1)), dim=2)
    return (torch.cat([top, bottom], dim=1) + 1) / 2


class Trainer:
    """Holds the model, loss, optimizers, data and bookkeeping of one training run."""

    def __init__(self, cfg: VQTrainConfig, images: torch.Tensor | None = None, progress: bool = True):
        self.cfg = cfg
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            flush_denormals()
        self.out = Path(cfg.out_dir)
        self.progress = progress
        torch.manual_seed(cfg.seed)
        self.model = VQModel(cfg.model)
        if cfg.init_from:
            self.init_weights(Path(cfg.init_from))
        self.model.to(self.device)
        self.loss = VQGANLoss(
            rec_loss=cfg.rec_loss, rec_weight=cfg.rec_weight, perceptual_weight=cfg.perceptual_weight,
            perceptual_stages=cfg.perceptual_stages, codebook_weight=cfg.codebook_weight,
            entropy_weight=cfg.entropy_weight,
            disc_start=cfg.disc_start, disc_weight=cfg.disc_weight,
            adaptive_disc_weight=cfg.adaptive_disc_weight, disc_ndf=cfg.disc_ndf,
            disc_layers=cfg.disc_layers).to(self.device)
        self.opt = torch.optim.AdamW(self.trainable_parameters(), lr=cfg.lr, betas=cfg.betas,
                                     weight_decay=cfg.weight_decay)
        self.opt_d = torch.optim.AdamW(self.loss.discriminator.parameters(), lr=cfg.disc_lr,
                                       betas=cfg.betas, weight_decay=cfg.weight_decay)
        open_epoch = (tensor_epochs(images, cfg.seed, cfg.shuffle_data) if images is not None
                      else source_epochs(cfg.data, cfg.resolution, cfg.seed, cfg.shuffle_data))
        self.data = CropBatches(open_epoch, cfg.batch_size, cfg.crop_size, cfg.seed, cfg.crop_tries)
        self.restart_rng = torch.Generator().manual_seed(cfg.seed + 1)
        self.window_usage = CodeUsage(cfg.model.codebook_size)  # for dead-code restarts
        self.log_usage = CodeUsage(cfg.model.codebook_size)  # for logging
        # Encoder outputs of the last warm-up steps, to start the codebook from (quantize_after > 0).
        self.z_buffer = torch.zeros(0, cfg.model.codebook_embed_dim)
        self.step = 0
        self.elapsed = 0.0  # training seconds over all resumed segments
        self.restarted = 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """All parameters, or (trainable=decoder) only the decoder's, after freezing everything else
        (requires_grad False on the encoder, quant_conv and codebook)."""
        if self.cfg.trainable == "all":
            return list(self.model.parameters())
        self.model.requires_grad_(False)
        tuned = [p for name in DECODER_SIDE for p in getattr(self.model, name).parameters()]
        for p in tuned:
            p.requires_grad_(True)
        return tuned

    def init_weights(self, folder: Path) -> None:
        """Start from a saved tokenizer (fine-tuning); its architecture must be `cfg.model`
        (`patch_local` may differ: it changes how the encoder is applied, not its weights).

        With `trainable: decoder` the decoder may have another width (`decoder_ch`): the parts that
        make the codes (encoder, quant_conv, codebook) are loaded, and the decoder is the trained one
        widened (`mars.vq.widen`, same pictures at step 0) when the new width is a whole multiple of
        the old, else a fresh one."""
        pretrained = VQModel.from_pretrained(folder)
        if dataclasses.replace(pretrained.config, patch_local=self.cfg.model.patch_local) == self.cfg.model:
            self.model.load_state_dict(pretrained.state_dict())  # patch_local changes no weight
            return
        ours_but_its_decoder = dataclasses.replace(self.cfg.model, decoder_ch=pretrained.config.decoder_ch)
        if self.cfg.trainable != "decoder" or pretrained.config != ours_but_its_decoder:
            raise MarsError(f"init_from {folder} has a different architecture than the config's model "
                            "(set model: to its config.json; with trainable: decoder only decoder_ch may differ)")
        trained = pretrained.state_dict()
        if self.cfg.model.decoder_width % pretrained.config.decoder_width:
            code_side = {k: v for k, v in trained.items() if k.split(".")[0] not in DECODER_SIDE}
            self.model.load_state_dict(code_side, strict=False)  # the new decoder keeps its fresh weights
            return
        trained.update(widen_decoder(trained, self.model.state_dict(), pretrained.config, self.cfg.model,
                                     seed=self.cfg.seed))
        self.model.load_state_dict(trained)

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state(), "restart": self.restart_rng.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"step": self.step, "elapsed": self.elapsed, "config": self.cfg.to_dict(),
                "model": self.model.state_dict(), "discriminator": self.loss.discriminator.state_dict(),
                "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(), "rng": rng,
                "data": self.data.state(), "usage": {"window": self.window_usage.counts,
                                                     "log": self.log_usage.counts},
                "z_buffer": self.z_buffer, "restarted": self.restarted}

    def save_checkpoint(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / CKPT_NAME
        _save_atomic(self.state_dict(), path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MarsError(f"cannot read training checkpoint {path}: {err}") from None
        if state["config"]["model"] != self.cfg.model.to_dict():
            raise MarsError(f"{path} was trained with a different model config; "
                            "use resume=never or another out_dir")
        self.model.load_state_dict(state["model"])
        self.loss.discriminator.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        torch.set_rng_state(state["rng"]["torch"])
        self.restart_rng.set_state(state["rng"]["restart"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.window_usage.counts.copy_(state["usage"]["window"])
        self.log_usage.counts.copy_(state["usage"]["log"])
        self.z_buffer, self.restarted = state["z_buffer"], int(state["restarted"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.data.restore(state["data"])

    def maybe_resume(self) -> None:
        mode = self.cfg.resume
        if mode == "never":
            return
        path = self.out / CKPT_NAME if mode == "auto" else Path(mode)
        if not path.is_file():
            if mode != "auto":
                raise MarsError(f"resume checkpoint not found: {path}")
            return
        self.load_checkpoint(path)
        _truncate_metrics(self.out / METRICS_NAME, self.step)

    # ---- one optimisation step ------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def train_step(self, images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """One generator (+ discriminator) update on a batch; returns logs and the reconstruction."""
        cfg, step = self.cfg, self.step
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.lr)
        for group in self.opt_d.param_groups:
            group["lr"] = lr_at(step, cfg, cfg.disc_lr)
        self.model.train()
        self.loss.train()
        disc_on = self.loss.disc_active(step)
        quantized = step >= cfg.quantize_after
        entropy_on = cfg.entropy_weight > 0 and (cfg.entropy_until == 0 or step < cfg.entropy_until)
        self.model.quantize.entropy_temperature = cfg.entropy_temperature if entropy_on else 0.0
        if quantized and step == cfg.quantize_after and cfg.quantize_after > 0:
            self.start_codebook()

        self.loss.discriminator.requires_grad_(False)
        with self.autocast():
            recon, quant = self.model(images, quantize=quantized)
            loss, logs = self.loss.generator_loss(images, recon, quant, self.model.last_layer(), step,
                                                  quantized=quantized)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.opt.param_groups[0]["params"],
                                                                     cfg.grad_clip))
        self.opt.step()

        if disc_on:
            self.loss.discriminator.requires_grad_(True)
            with self.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(images, recon.detach())
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            logs.update(d_logs)

        z_flat = quant.z.detach().float().permute(0, 2, 3, 1).reshape(-1, quant.z.shape[1]).cpu()  # (N, D)
        if quantized:
            self.track_codes(quant.codes, z_flat)
        else:  # keep the latest encoder outputs, enough to start every code on one
            self.z_buffer = torch.cat([self.z_buffer, z_flat])[-4 * cfg.model.codebook_size:]
        logs["lr"] = lr_at(step, cfg, cfg.lr)
        return logs, recon

    def track_codes(self, codes: torch.Tensor, z_flat: torch.Tensor) -> None:
        """Count code usage; every `restart_dead_codes_every` steps move the unused codes onto
        encoder outputs of this batch (until `restart_dead_codes_until` of the run)."""
        cfg = self.cfg
        self.window_usage.update(codes)
        self.log_usage.update(codes)
        every, done = cfg.restart_dead_codes_every, self.step + 1
        if every > 0 and (done - cfg.quantize_after) % every == 0 and done <= cfg.restart_dead_codes_until * cfg.steps:
            self.restarted += self.model.quantize.restart_codes(self.window_usage.dead(), z_flat,
                                                                self.restart_rng)
            self.window_usage.reset()

    def start_codebook(self) -> None:
        """End of the autoencoder warm-up: put every code on a distinct recent encoder output."""
        everything = torch.ones(self.cfg.model.codebook_size, dtype=torch.bool)
        self.restarted += self.model.quantize.restart_codes(everything, self.z_buffer.to(self.device),
                                                            self.restart_rng)
        self.z_buffer = self.z_buffer[:0]
        self.window_usage.reset()
        self.log_usage.reset()

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> VQModel:
        """Train up to cfg.steps (resuming if asked), then save OUT/final; returns the model."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.maybe_resume()
        (self.out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                                                    encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, desc="tokenizer", disable=not self.progress,
                   dynamic_ncols=True)
        t_last, images_seen = time.time(), 0
        try:
            with open(self.out / METRICS_NAME, "a", encoding="utf-8") as metrics:
                t0 = time.time()
                while self.step < cfg.steps:
                    images = self.data.next_batch().to(self.device)
                    logs, recon = self.train_step(images)
                    self.step += 1
                    now = time.time()
                    self.elapsed, t0 = self.elapsed + now - t0, now
                    images_seen += images.shape[0]
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        logs.update(step=self.step, codebook_usage=self.log_usage.fraction_used(),
                                    codes_restarted=self.restarted, elapsed_s=round(self.elapsed, 1),
                                    images_per_s=images_seen / max(now - t_last, 1e-9))
                        self.log_usage.reset()
                        t_last, images_seen = now, 0
                        metrics.write(json.dumps(logs) + "\n")
                        metrics.flush()
                        for key, value in logs.items():
                            if key != "step":
                                writer.add_scalar(f"train/{key}", value, self.step)
                        bar.set_postfix(loss=f"{logs['loss']:.4f}", mse=f"{logs['mse']:.5f}",
                                        usage=f"{logs['codebook_usage']:.2f}")
                    if cfg.image_every > 0 and self.step % cfg.image_every == 0:
                        writer.add_image("reconstruction", _image_grid(images, recon), self.step)
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                        self.save_checkpoint()
        finally:
            bar.close()
            writer.close()
        self.model.eval()
        self.model.save_pretrained(self.out / "final")
        return self.model


def train(cfg: VQTrainConfig, images: torch.Tensor | None = None, progress: bool = True) -> VQModel:
    """Run (or resume) a training run; `images` (N, 3, H, W) in [-1, 1] replaces `cfg.data`."""
    return Trainer(cfg, images=images, progress=progress).fit()
