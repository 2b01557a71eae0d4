"""The `shapes-demo` recipe: the built-in model, from nothing to `mars/assets/shapes-demo/`.

    mars recipe shapes-demo --out runs/shapes-demo [--vq DIR] [--ship]

Steps, in order (each is skipped when its output is complete, so a killed run resumes where it
stopped; training steps resume from their own checkpoints with `resume=auto`):

    captions        OUT/data/captions.txt       English + Chinese captions of training scenes, and
                    OUT/data/caption-pairs.txt  the same scenes' captions as translation pairs
    vq              OUT/vq-patch/final          VQ-GAN: vq.yaml, then vq-refine.yaml and vq-patch.yaml
                                                (patch codes), each from the previous weights (the
                                                `vq_stages` of recipe.yaml), or --vq DIR
    text_tokenizer  OUT/text-tokenizer          byte-level BPE on the captions (~512 ids)
    preprocess      OUT/codes                   `mars preprocess`: images -> VQ codes, captions -> ids
    stage0          OUT/stage0/final            text LM on the captions or the pairs (`stage0_text`; the
                                                language expert, then frozen)
    stage1          OUT/stage1/final            T2I + I2T (visual expert + new vocabulary rows)
    stage2          OUT/stage2/final            T2I only
    vq_decoder      OUT/vq-sharpen/final        the VQ's decoder alone trained on, exactly the same
                                                codes: vq-decoder.yaml (L1, hard edges), then
                                                vq-sharpen.yaml (+ PatchGAN, sharp small shapes)
                                                (the `vq_decoder_stages` of recipe.yaml)
    ship            mars/assets/shapes-demo     (--ship) stage II's model with the tuned decoder

The decoder step changes no code, so with `parallel: true` it runs in a second process beside
preprocess and stage 0 (log: OUT/vq-decoder.log), one core each (`threads`); the recipe waits for it
before stage I, which then trains on every core (`threads_alone`). `--only STEP` runs one step alone.

Every step's wall time is added to OUT/recipe_times.json (a resumed step accumulates its time).
Settings live in configs/shapes-demo/*.yaml; `--set CONFIG.KEY=VALUE` overrides one of them
(CONFIG: recipe, a VQ stage, a decoder stage, stage0, stage1, stage2), e.g. `--set stage1.max_steps=10`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mars.config import load_config
from mars.errors import MarsError
from mars.eval.io import write_text_atomic
from mars.generate import CaptionConfig, SampleConfig
from mars.model.weights import load_weights, save_weights
from mars.pipeline import load_prompt_order, load_rerank_config, save_generation_config

logger = logging.getLogger("mars.recipes")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "shapes-demo"
SHIP_DIR = Path(__file__).resolve().parents[1] / "assets" / "shapes-demo"
TIMES_FILE = "recipe_times.json"
STEPS = ("captions", "vq", "text_tokenizer", "preprocess", "stage0", "stage1", "stage2", "vq_decoder", "ship")
LM_STAGES = ("stage0", "stage1", "stage2")


@dataclass
class RecipeConfig:
    """Data and tokenizer settings of the recipe (configs/shapes-demo/recipe.yaml)."""

    data: str = "shapes:4096:0"  # training images (a `shapes:N:SEED` spec), encoded by `preprocess`
    caption_scenes: int = 20000  # scenes whose en + zh captions train the text tokenizer and stage 0
    caption_seed: int = 0
    text_vocab_size: int = 512  # byte-level BPE ids, <|endoftext|> included
    resolution: int = 256
    preprocess_batch_size: int = 1
    shard_size: int = 4096
    threads: int = 1  # torch CPU threads of a step while the decoder process runs beside it (0 = torch's default)
    threads_alone: int = 0  # ... of a step with no decoder process beside it (0 = torch's default); see recipe.yaml
    stage0_text: str = "pairs"  # stage 0's corpus: "pairs" (see caption_pair) or "captions" (one per line)
    vq_stages: tuple[str, ...] = ("vq", "vq-refine")  # VQ configs trained in turn, each from the last
    vq_decoder_stages: tuple[str, ...] = ("vq-decoder", "vq-sharpen")  # decoder-only configs trained
    # last, each from the previous one's weights (() = ship the VQ as it is)
    parallel: bool = True  # train the decoder in a second process beside preprocess and stages 0-II
    generation: SampleConfig = field(default_factory=SampleConfig)  # the shipped model's sampling
    # defaults, written to its generation_config.json
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # ... and its caption defaults


class Recipe:
    """The steps of the recipe over one output folder; `run()` does what is not done yet.

    `config_dir` holds recipe.yaml, the VQ configs it names, stage0.yaml, stage1.yaml and
    stage2.yaml; `overrides` maps a config name (recipe, a VQ config, stage0, ...) to `key=value`
    strings.
    """

    def __init__(self, out: str | Path, *, vq: str | Path | None = None, ship_to: str | Path | None = None,
                 config_dir: str | Path = REPO_CONFIGS, overrides: dict[str, list[str]] | None = None,
                 progress: bool = True) -> None:
        self.out = Path(out)
        self.vq_arg = Path(vq) if vq is not None else None
        self.ship_to = Path(ship_to) if ship_to is not None else None
        self.config_dir = Path(config_dir)
        self.overrides = {k: list(v) for k, v in (overrides or {}).items()}
        self.progress = progress
        self.config = load_config(RecipeConfig, self._config_file("recipe"), self.overrides.get("recipe", []))
        if not self.config.vq_stages:
            raise MarsError("recipe.yaml: vq_stages must name at least one VQ config")
        if self.config.stage0_text not in ("captions", "pairs"):
            raise MarsError(f"recipe.yaml: stage0_text must be 'captions' or 'pairs', got {self.config.stage0_text!r}")
        known = ("recipe", *self.config.vq_stages, *self.config.vq_decoder_stages, *LM_STAGES)
        unknown = set(self.overrides) - set(known)
        if unknown:
            raise MarsError(f"unknown recipe config(s) {sorted(unknown)}; known: {', '.join(known)}")
        self._decoder_process: subprocess.Popen | None = None
        if self.vq_arg is not None and not (self.vq_arg / "config.json").is_file():
            raise MarsError(f"--vq {self.vq_arg} is not a VQ-GAN folder (no config.json)")

    # --- paths -------------------------------------------------------------------------------
    def _config_file(self, name: str) -> Path:
        path = self.config_dir / f"{name}.yaml"
        if not path.is_file():
            raise MarsError(f"recipe config not found: {path}")
        return path

    @property
    def captions(self) -> Path:
        return self.out / "data" / "captions.txt"

    @property
    def caption_pairs(self) -> Path:
        return self.out / "data" / "caption-pairs.txt"

    def captions_done(self) -> bool:
        return self.caption_pairs.is_file() and self.captions.is_file()

    @property
    def vq_dir(self) -> Path:
        """The VQ-GAN every later step uses: --vq DIR, or the last VQ stage this recipe trains."""
        return self.vq_arg if self.vq_arg is not None else self.final(self.config.vq_stages[-1])

    @property
    def vq_decoder_dir(self) -> Path | None:
        """The tokenizer with the trained decoder (the last decoder stage's), or None without any."""
        stages = self.config.vq_decoder_stages
        return self.final(stages[-1]) if stages else None

    @property
    def text_tokenizer_dir(self) -> Path:
        return self.out / "text-tokenizer"

    @property
    def codes(self) -> Path:
        return self.out / "codes"

    def final(self, stage: str) -> Path:
        return self.out / stage / "final"

    # --- driver ------------------------------------------------------------------------------
    def steps(self) -> list[tuple[str, Callable[[], bool], Callable[[], None]]]:
        """(name, is_done, run) of every step, in order; `ship` only when a target is set."""
        steps = [
            ("captions", self.captions_done, self.write_captions),
            ("vq", lambda: (self.vq_dir / "config.json").is_file(), self.train_vq),
            ("text_tokenizer", lambda: (self.text_tokenizer_dir / "mars_tokenizer.json").is_file(),
             self.train_text_tokenizer),
            ("preprocess", lambda: (self.codes / "index.json").is_file(), self.preprocess),
            *[(stage, lambda stage=stage: (self.final(stage) / "config.json").is_file(),
               lambda stage=stage: self.train(stage)) for stage in LM_STAGES],
            ("vq_decoder", self.decoder_done, self.train_vq_decoder),
        ]
        if self.ship_to is not None:
            steps.append(("ship", lambda: False, self.ship))
        return steps

    def run(self, until: str | None = None, only: str | None = None) -> dict[str, str]:
        """Run every step not done yet (up to and including `until`, or just `only`); returns
        {step: ran|skipped|ran in parallel}."""
        for name in (until, only):
            if name is not None and name not in STEPS:
                raise MarsError(f"unknown recipe step {name!r}; steps: {', '.join(STEPS)}")
        self.out.mkdir(parents=True, exist_ok=True)
        default_threads = torch.get_num_threads()
        reaches_decoder = only is None and (until is None or STEPS.index(until) >= STEPS.index("vq_decoder"))
        status = {}
        try:
            for name, done, run in self.steps():
                if only is not None and name != only:
                    continue
                if (name == "stage1" and self._decoder_process is not None
                        and (self.config.threads_alone or default_threads) > (self.config.threads or default_threads)):
                    # Stage I is the longest step and trains ~1.8x faster on both cores than on one:
                    # the decoder process finishes first (in the measured run, 8 minutes later).
                    status["vq_decoder"] = self._wait_for_decoder()
                if name == "vq_decoder" and name in status:
                    pass  # waited for before stage I
                elif name == "vq_decoder" and self._decoder_process is not None:
                    status[name] = self._wait_for_decoder()
                elif done():
                    logger.info("[recipe] %s: done, skipped", name)
                    status[name] = "skipped"
                else:
                    torch.set_num_threads(self._step_threads(default_threads))
                    logger.info("[recipe] %s: running (%d torch threads)", name, torch.get_num_threads())
                    start = time.perf_counter()
                    try:
                        run()
                    finally:
                        self._add_time(name, time.perf_counter() - start)
                    status[name] = "ran"
                if name == "vq" and reaches_decoder and self.config.parallel and not self.decoder_done():
                    self._start_decoder()
                if name == until:
                    break
        finally:
            torch.set_num_threads(default_threads)
            if self._decoder_process is not None and self._decoder_process.poll() is None:
                # Interrupted: stop the decoder too; it resumes from its checkpoint next time.
                self._decoder_process.terminate()
                self._decoder_process.wait()
        return status

    def _step_threads(self, default: int) -> int:
        """Torch threads for the next step: `threads` while the decoder process runs beside it (one
        core each), `threads_alone` once it is done or when there is none; 0 means `default`."""
        beside = self._decoder_process is not None and self._decoder_process.poll() is None
        threads = self.config.threads if beside else self.config.threads_alone
        return threads if threads > 0 else default

    # --- the decoder step in a second process ------------------------------------------------
    def decoder_done(self) -> bool:
        return self.vq_decoder_dir is None or (self.vq_decoder_dir / "config.json").is_file()

    def _start_decoder(self) -> None:
        """Start `mars recipe shapes-demo --only vq_decoder` (same folder and settings) in the background."""
        cmd = [sys.executable, "-m", "mars.cli", "recipe", "shapes-demo", "--out", str(self.out),
               "--config-dir", str(self.config_dir), "--only", "vq_decoder"]
        if self.vq_arg is not None:
            cmd += ["--vq", str(self.vq_arg)]
        for config, items in self.overrides.items():
            cmd += [arg for item in items for arg in ("--set", f"{config}.{item}")]
        cmd += ["--set", f"recipe.threads_alone={self.config.threads}"]  # it always has this process beside it
        log = self.out / "vq-decoder.log"
        logger.info("[recipe] vq_decoder: started beside the other steps (log: %s)", log)
        with open(log, "a", encoding="utf-8") as handle:
            self._decoder_process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)

    def _wait_for_decoder(self) -> str:
        logger.info("[recipe] vq_decoder: waiting for the process started after the VQ step")
        code = self._decoder_process.wait()
        self._decoder_process = None
        if code != 0 or not self.decoder_done():
            raise MarsError(f"the vq_decoder step failed (exit code {code}); see {self.out / 'vq-decoder.log'}")
        return "ran in parallel"

    def _add_time(self, step: str, seconds: float) -> None:
        """Accumulate a step's wall time in OUT/recipe_times.json (atomic rewrite)."""
        file = self.out / TIMES_FILE
        with open(self.out / f".{TIMES_FILE}.lock", "w") as lock:  # the decoder process writes it too
            fcntl.flock(lock, fcntl.LOCK_EX)
            times = json.loads(file.read_text()) if file.is_file() else {}
            entry = times.get(step, {"seconds": 0.0, "runs": 0})
            entry = {"seconds": round(entry["seconds"] + seconds, 1), "runs": entry["runs"] + 1}
            times[step] = entry
            write_text_atomic(file, json.dumps(times, indent=1) + "\n")

    # --- steps -------------------------------------------------------------------------------
    def write_captions(self) -> None:
        """The English and Chinese captions of `caption_scenes` training scenes: one caption per
        line (captions.txt, written last: it means done), and one translation pair per line
        (caption-pairs.txt, `mars.data.captions.caption_pair`)."""
        from mars.data.captions import caption_pair, shapes_example

        cfg = self.config
        lines, pairs = [], []
        for i in range(cfg.caption_scenes):
            _, en, zh = shapes_example(cfg.caption_seed, i, "train")
            lines += [en, zh]
            pairs.append(caption_pair(i, en, zh))
        write_text_atomic(self.caption_pairs, "".join(line + "\n" for line in pairs))
        write_text_atomic(self.captions, "".join(line + "\n" for line in lines))

    def train_vq(self) -> None:
        """Train the VQ stages in turn (each resumes from OUT/<stage>/ckpt.pt; each later stage
        starts from the previous stage's final weights)."""
        from mars.vq.train import load_train_config, train

        previous = None
        for name in self.config.vq_stages:
            if (self.final(name) / "config.json").is_file():
                previous = self.final(name)
                continue
            paths = [f"out_dir={self.out / name}", "resume=auto"] + ([f"init_from={previous}"] if previous else [])
            train(load_train_config(self._config_file(name), [*paths, *self.overrides.get(name, [])]),
                  progress=self.progress)
            previous = self.final(name)

    def train_vq_decoder(self) -> None:
        """Train the VQ's decoder alone (`trainable: decoder`: same codes, truer pictures), one
        decoder stage after the other, each from the previous one's weights."""
        from mars.vq.train import load_train_config, train

        previous = self.vq_dir
        for name in self.config.vq_decoder_stages:
            if not (self.final(name) / "config.json").is_file():
                paths = [f"model={previous}", f"init_from={previous}", f"out_dir={self.out / name}", "resume=auto"]
                cfg = load_train_config(self._config_file(name), [*paths, *self.overrides.get(name, [])])
                if cfg.trainable != "decoder":
                    raise MarsError(f"{self._config_file(name)} must set `trainable: decoder` "
                                    "(the codes must not change)")
                train(cfg, progress=self.progress)
            previous = self.final(name)

    def train_text_tokenizer(self) -> None:
        """Byte-level BPE on the caption corpus (the marker file is written last: it means done)."""
        from mars.text_tokenizer import train_bpe_tokenizer

        texts = self.captions.read_text(encoding="utf-8").splitlines()
        tmp = self.out / ".tmp-text-tokenizer"
        if tmp.exists():
            shutil.rmtree(tmp)
        tok = train_bpe_tokenizer(texts, self.config.text_vocab_size, tmp)
        if tok.vocab_size > self.config.text_vocab_size:
            raise MarsError(f"the BPE tokenizer has {tok.vocab_size} ids, more than {self.config.text_vocab_size}")
        if self.text_tokenizer_dir.exists():
            shutil.rmtree(self.text_tokenizer_dir)
        tmp.rename(self.text_tokenizer_dir)

    def preprocess(self) -> None:
        """Training images -> VQ codes, captions -> BPE ids (resumes finished shards)."""
        from mars.data.preprocess import preprocess
        from mars.text_tokenizer import load_text_tokenizer
        from mars.vq.io import load_tokenizer

        cfg = self.config
        vq = load_tokenizer(self.vq_dir, device="cpu")
        result = preprocess(vq, load_text_tokenizer(self.text_tokenizer_dir), cfg.data, self.codes,
                            resolution=cfg.resolution, shard_size=cfg.shard_size,
                            batch_size=cfg.preprocess_batch_size, progress=self.progress)
        logger.info("[recipe] preprocess: %d images in %.0f s (%.1f images/s)", result.images, result.seconds,
                    result.images_per_second)

    def stage_config(self, stage: str):
        """The `TrainConfig` of a stage: its YAML, the recipe's paths, then `--set stageN.*`."""
        from mars.train.config import load_train_config

        paths = {
            "stage0": [f"tokenizer={self.text_tokenizer_dir}",
                       f"data.text={self.caption_pairs if self.config.stage0_text == 'pairs' else self.captions}"],
            "stage1": [f"init_from={self.final('stage0')}", f"vq={self.vq_dir}", f"data.shards={self.codes}"],
            "stage2": [f"init_from={self.final('stage1')}", f"data.shards={self.codes}"],
        }[stage]
        cfg = load_train_config(self._config_file(stage),
                                [f"out_dir={self.out / stage}", "resume=auto", *paths, *self.overrides.get(stage, [])])
        if stage == "stage0":
            # The model's image rows must match the VQ's codebook and its image size the pictures
            # `preprocess` encodes (set here, not in the YAML, so `--vq` may bring a tokenizer of
            # another codebook size and `recipe.resolution` another image size).
            codebook = json.loads((self.vq_dir / "config.json").read_text())["codebook_size"]
            model = {"preset": cfg.model} if isinstance(cfg.model, str) else dict(cfg.model)
            cfg.model = {**model, "image_vocab_size": codebook, "image_size": self.config.resolution}
        return cfg

    def train(self, stage: str) -> None:
        from mars.train.trainer import Trainer

        Trainer(self.stage_config(stage)).run()

    def ship(self) -> None:
        """Copy stage 2's final model (weights, config, tokenizer/) to the shipped folder, with the
        fine-tuned VQ decoder as its vq/ (the same codes: its encoder and codebook are unchanged)."""
        ship_model(self.final("stage2"), self.ship_to, vq=self.vq_decoder_dir, generation=self.config.generation,
                   caption=self.config.caption)


def ship_model(src: str | Path, dst: str | Path, vq: str | Path | None = None, max_bytes: int = 60 * 2**20,
               generation: SampleConfig | None = None, weights_dtype: torch.dtype | None = None,
               caption: CaptionConfig | None = None) -> Path:
    """Copy a model folder to `dst` (replacing it; `vq` replaces its vq/; `generation` and `caption`
    replace its sampling and caption defaults; `weights_dtype`, e.g. fp16, stores the model's
    floating-point weights in that type: loaders cast them to the dtype they run in), refusing more
    than `max_bytes`."""
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise MarsError(f"{src} is not a model folder (no config.json)")
    tmp = dst.parent / f".tmp-{dst.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("eval.json", "*.tmp"))
    if weights_dtype is not None:
        state = load_weights(tmp)
        save_weights({k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}, tmp)
    if vq is not None:
        shutil.rmtree(tmp / "vq", ignore_errors=True)
        shutil.copytree(vq, tmp / "vq", ignore=shutil.ignore_patterns("eval.json"))
    if generation is not None:  # the source's rerank judge and prompt order stay
        save_generation_config(tmp, generation, caption, load_rerank_config(tmp), load_prompt_order(tmp))
    size = folder_bytes(tmp)
    if size > max_bytes:
        shutil.rmtree(tmp)
        raise MarsError(f"the model holds {size / 2**20:.1f} MB, more than the {max_bytes / 2**20:.0f} MB allowed")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


