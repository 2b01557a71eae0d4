"""`MarsPipeline`: the user-facing API. Load a model folder, generate images, caption images.

    from mars import MarsPipeline
    pipe = MarsPipeline.from_pretrained("shapes-demo")        # built-in name or a model folder
    images = pipe.generate(["a red circle", "一个蓝色的正方形"], cfg_scale=4.0, seed=0)
    images = pipe.generate("a red circle")   # the model's own sampling defaults (generation_config.json)
    texts = pipe.caption(images)
    image, text = pipe.generate_with_text("a red circle")

Seeds: image i of a call (prompt-major: every image of the first prompt, then of the second, ...)
is drawn from its own generator seeded with `seed + i`, so it does not depend on `batch_size` or
on the other prompts of the call.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from mars.config import from_dict, read_config_file
from mars.data.captions import reading_order_prompt
from mars.data.images import UnusableImage, load_image, pil_to_tensor, resize_center_crop, tensor_to_pil
from mars.errors import MarsError
from mars.generate import (
    CAPTION_INSTRUCTIONS,
    CaptionConfig,
    RerankConfig,
    SampleConfig,
    caption_prefix,
    generate_image_and_text,
    generate_image_tokens,
    generate_text,
    make_generators,
    with_given,
)
from mars.jacobi import check_jacobi_window, generate_image_and_text_jacobi, generate_image_tokens_jacobi
from mars.model.dtypes import DTYPE_NAMES, torch_dtype
from mars.model.semvie import SemVIE
from mars.model_dir import DEFAULT_MODEL, GENERATION_CONFIG, VQ_DIR, load_model_text_tokenizer, resolve_model_path
from mars.rerank import best_candidates, best_caption, check_fits, refine_caption
from mars.text_tokenizer import TextTokenizer
from mars.vq import VQModel, load_tokenizer

T = TypeVar("T")
RERANK_SEED_STRIDE = 1_000_003  # seed of candidate k of an image: its seed + k * this (a prime)
ImageInput = Image.Image | str | os.PathLike
AS_WRITTEN, READING = "as-written", "reading"  # how prompts are restated (`MarsPipeline.model_prompt`)
PROMPT_ORDERS = (AS_WRITTEN, READING)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None = CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise MarsError(f"unknown device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MarsError("device cuda was asked for, but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None = bf16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise MarsError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
    return torch_dtype(dtype)


class MarsPipeline:
    """A SemVIE model with its text tokenizer and VQ-GAN: prompts -> images, images -> text."""

    def __init__(self, model: SemVIE, text_tokenizer: TextTokenizer, vq: VQModel,
                 generation_config: SampleConfig | None = None, caption_config: CaptionConfig | None = None,
                 rerank_config: RerankConfig | None = None, prompt_order: str = AS_WRITTEN) -> None:
        config = model.config
        if vq.config.codebook_size != config.image_vocab_size:
            raise MarsError(f"the VQ-GAN has {vq.config.codebook_size} codes but the model "
                            f"{config.image_vocab_size} image rows (config image_vocab_size)")
        if vq.config.downsample != config.image_downsample:
            raise MarsError(f"the VQ-GAN downsamples by {vq.config.downsample} but the model expects "
                            f"{config.image_downsample} (config image_downsample)")
        if text_tokenizer.vocab_size > config.text_vocab_size:
            raise MarsError(f"the text tokenizer has {text_tokenizer.vocab_size} ids but the model only "
                            f"{config.text_vocab_size} text rows")
        self.model = model.eval()
        self.tokenizer = text_tokenizer
        self.vq = vq.eval()
        # Sampling settings a call leaves at None: the model folder's own, else SampleConfig's defaults.
        self.generation_config = generation_config or SampleConfig()
        # ... and of a caption call
        self.caption_config = caption_config or CaptionConfig()
        # ... and how candidate images are judged with rerank > 1
        self.rerank_config = rerank_config or RerankConfig()
        # how prompts are restated before the model reads them (the convention of its training captions)
        self.prompt_order = check_prompt_order(prompt_order)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> MarsPipeline:
        """Load a model folder (config.json, weights, tokenizer/, vq/) or a built-in model by name.

        `device` None = CUDA when available; `dtype` None = bf16 on CUDA, fp32 on CPU (the VQ-GAN
        always runs in fp32).
        """
        path = resolve_model_path(name_or_dir)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if not (path / VQ_DIR).is_dir():
            raise MarsError(f"{path} has no {VQ_DIR}/ folder (the VQ-GAN image tokenizer)")
        model = SemVIE.from_pretrained(path, device=device, dtype=dtype)
        text_tokenizer = load_model_text_tokenizer(path, model.config.text_tokenizer)
        vq = load_tokenizer(path / VQ_DIR, device=device)
        return cls(model, text_tokenizer, vq, load_generation_config(path), load_caption_config(path),
                   load_rerank_config(path), load_prompt_order(path))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a folder `from_pretrained` reads: config + weights, tokenizer/, vq/."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        self.tokenizer.save(directory / "tokenizer")
        self.vq.save_pretrained(directory / VQ_DIR)
        if (self.generation_config, self.caption_config, self.rerank_config, self.prompt_order) != (
                SampleConfig(), CaptionConfig(), RerankConfig(), AS_WRITTEN):
            save_generation_config(directory, self.generation_config, self.caption_config, self.rerank_config,
                                   self.prompt_order)

    def sampling_settings(self, cfg_scale: float | None = None, top_k: int | None = None,
                          top_p: float | None = None, temperature: float | None = None) -> dict[str, float | int]:
        """The settings a generate call uses: the given ones, the model's defaults for the rest."""
        return dataclasses.asdict(with_given(self.generation_config, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p,
                                             temperature=temperature))

    def caption_settings(self, cfg_scale: float | None = None, plausibility: float | None = None,
                         refine: int | None = None) -> CaptionConfig:
        """The caption decoding a caption call uses: the given settings, the model's defaults for the rest."""
        return with_given(self.caption_config, cfg_scale=cfg_scale, plausibility=plausibility, refine=refine)

    def rerank_settings(self, drawing_weight: float | None = None) -> RerankConfig:
        """How a generate call with rerank > 1 judges its candidates: the given weight, else the model's."""
        return with_given(self.rerank_config, drawing_weight=drawing_weight)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def prompt_order_settings(self) -> dict[str, str]:
        """{"prompt_order": ...} for a run's recorded settings; empty for the default, so that settings
        recorded before prompt orders existed still match."""
        return {} if self.prompt_order == AS_WRITTEN else {"prompt_order": self.prompt_order}

    def model_prompt(self, prompt: str) -> str:
        """`prompt` as the model reads it: as written, or, for a model whose training captions state
        relations in reading order (`prompt_order` "reading"), a MARS-Shapes position prompt restated
        that way ("A right of B" -> "B left of A"; `mars.data.captions.reading_order_prompt`)."""
        return reading_order_prompt(prompt) if self.prompt_order == READING and isinstance(prompt, str) else prompt

    # --- text to image ---------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str],
        cfg_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int | Sequence[int] = 0,
        num_images_per_prompt: int = 1,
        batch_size: int = 8,
        image_size: int | None = None,
        progress: bool = False,
        compile: bool = False,
        negative_prompt: str | Sequence[str] | None = None,
        rerank: int = 1,
        rerank_drawing_weight: float | None = None,
        jacobi_window: int = 0,
    ) -> list[Image.Image]:
        """Images for `prompts` (English, Chinese, any text the tokenizer reads).

        Returns `num_images_per_prompt` images per prompt, prompt-major; image i uses seed
        `seed + i`, or `seed[i]` when `seed` is a list with one seed per image (the server batches
        requests with different seeds this way). `batch_size` images are made at once (twice the
        rows with guidance).
        Sampling settings left at None take the model's defaults (`generation_config`: its
        generation_config.json, else cfg_scale 4, top_k 0, top_p 1, temperature 1).
        `image_size` defaults to the model's. On CUDA each token's decode step is replayed as one
        CUDA graph (eager steps are a few hundred kernel launches: 8x slower at 7B, batch 1, on an
        H200); `compile` also compiles the step (worth it for many batches of the same shape).
        `negative_prompt` (one for all prompts, or one per prompt; "" = the null prompt) takes the
        null prompt's place in guidance, steering the images away from it; it needs cfg_scale != 1.
        `rerank` > 1 draws that many candidates per image and keeps the one under which the model,
        reading it back, finds the prompt the likeliest caption, plus `rerank_drawing_weight` times
        the log-likelihood of its codes after the prompt (`mars.rerank.best_candidates`; None = the
        model's default, `rerank_config`: the "rerank" entry of its generation_config.json, else 0);
        candidate k of the image with seed s uses seed `s + k * RERANK_SEED_STRIDE`, so candidate 0
        is the image that `rerank=1` makes.
        `jacobi_window` > 0 decodes each image by speculative Jacobi decoding with that many drafted
        codes per forward (`mars.jacobi`): images of the same distribution from fewer forwards, each
        image of a batch at its own pace (the speed-up is at batch 1: batches of 4-8 are faster one
        code per forward; on a CPU 3 drafts is about best; not with `compile`; on CUDA without CUDA
        graphs); 0 = one code per forward.
        """
        prompt_list = [self.model_prompt(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        sampling = SampleConfig(**self.sampling_settings(cfg_scale, top_k, top_p, temperature))
        grid = self._grid(image_size)
        ids = self.encode_prompts(prompt_list, grid * grid)
        _check_count("num_images_per_prompt", num_images_per_prompt)
        _check_count("batch_size", batch_size)
        _check_count("rerank", rerank)
        check_jacobi_window(jacobi_window, compile)
        judging = self.rerank_settings(rerank_drawing_weight)
        if rerank > 1:
            check_fits(self.model, self.tokenizer, prompt_list, grid * grid)
        texts = [p for p in prompt_list for _ in range(num_images_per_prompt)]
        jobs = [p for p in ids for _ in range(num_images_per_prompt)]
        negatives = None
        if negative_prompt is not None:
            negative_ids = self.encode_negative_prompts(negative_prompt, len(prompt_list), grid * grid)
            negatives = [n for n in negative_ids for _ in range(num_images_per_prompt)]
        kept = self._draw_codes(jobs, rerank, _image_seeds(seed, len(jobs)), sampling, grid, batch_size, progress,
                                compile, negatives, jacobi_window)  # (len(jobs) * rerank, h, w)
        if rerank > 1:
            kept = best_candidates(self.model, self.tokenizer, texts, kept, rerank, judging.drawing_weight)
        return [image for start in range(0, len(kept), batch_size)
                for image in self.decode_codes(kept[start : start + batch_size])]

    def draw_candidates(self, prompts: Sequence[str], per_prompt: int, seed: int = 0, batch_size: int = 8,
                        progress: bool = False) -> torch.Tensor:
        """The image codes (len(prompts) * per_prompt, h, w) that `generate(prompts, rerank=per_prompt,
        seed=seed)` chooses among, each prompt's candidates one after the other, with the model's
        sampling settings (`mars.train.preferences` judges them to make preference pairs)."""
        _check_count("per_prompt", per_prompt)
        _check_count("batch_size", batch_size)
        grid = self._grid(None)
        ids = self.encode_prompts([self.model_prompt(p) for p in prompts], grid * grid)
        sampling = SampleConfig(**self.sampling_settings())
        return self._draw_codes(ids, per_prompt, _image_seeds(seed, len(ids)), sampling, grid, batch_size, progress)

    def _draw_codes(self, jobs: list[list[int]], per_job: int, job_seeds: list[int], sampling: SampleConfig,
                    grid: int, batch_size: int, progress: bool, compile: bool = False,
                    negatives: list[list[int]] | None = None, jacobi_window: int = 0) -> torch.Tensor:
        """Codes (len(jobs) * per_job, h, w) of `per_job` candidates per prompt (text ids), one job's
        after the other; candidate k of the job with seed s uses seed `s + k * RERANK_SEED_STRIDE`;
        by speculative Jacobi decoding with `jacobi_window` drafts per forward when > 0."""
        candidates = [job for job in jobs for _ in range(per_job)]
        seeds = [s + k * RERANK_SEED_STRIDE for s in job_seeds for k in range(per_job)]
        candidate_negatives = [n for n in negatives for _ in range(per_job)] if negatives else None
        codes = []
        with tqdm(total=len(candidates), desc="images", disable=not progress) as bar:
            for start in range(0, len(candidates), batch_size):
                chunk = candidates[start : start + batch_size]
                generators = make_generators(seeds[start : start + batch_size], self.device)
                chunk_negatives = candidate_negatives[start : start + batch_size] if candidate_negatives else None
                if jacobi_window:
                    made = generate_image_tokens_jacobi(self.model, chunk, generators, grid * grid, sampling,
                                                        jacobi_window, progress, negative_prompts=chunk_negatives)
                else:
                    made = generate_image_tokens(self.model, chunk, generators, grid * grid, sampling, compile=compile,
                                                 cuda_graph=True, progress=progress, negative_prompts=chunk_negatives)
                codes.append(made.view(-1, grid, grid))
                bar.update(len(chunk))
        return torch.cat(codes)

    def generate_with_text(
        self,
        prompt: str,
        cfg_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        seed: int = 0,
        text_temperature: float = 0.0,
        max_new_tokens: int = 64,
        image_size: int | None = None,
        jacobi_window: int = 0,
        instruction: str | None = None,
    ) -> tuple[Image.Image, str]:
        """Joint generation: an image for `prompt`, then the text the model writes after `</img>`.

        `instruction` (default none) is read after `</img>` before the model writes, e.g. the
        caption instruction of the prompt's language (`CAPTION_INSTRUCTIONS[lang]`), so the text is
        about the image it drew (how well depends on the model's training: README). `jacobi_window`
        > 0 draws the image by speculative Jacobi decoding (as in `generate`)."""
        check_jacobi_window(jacobi_window)
        settings = self.sampling_settings(cfg_scale, top_k, top_p, temperature)
        sampling = SampleConfig(**settings)
        text_sampling = SampleConfig(temperature=text_temperature, top_k=settings["top_k"], top_p=settings["top_p"],
                                     cfg_scale=1.0)
        grid = self._grid(image_size)
        _check_count("max_new_tokens", max_new_tokens)
        read = ([] if instruction is None else  # room for the image, the text and a prompt of one token
                self._encode_text(instruction, self._prompt_limit(grid * grid + max_new_tokens + 1), "instruction"))
        ids = self.encode_prompts([self.model_prompt(prompt)], grid * grid + len(read) + max_new_tokens)
        generators, eos, limit = make_generators([seed], self.device), self.tokenizer.eos_id, self.tokenizer.vocab_size
        if jacobi_window:
            codes, texts = generate_image_and_text_jacobi(self.model, ids, generators, grid * grid, eos, limit,
                                                          jacobi_window, max_new_tokens, sampling, text_sampling,
                                                          instruction=read)
        else:
            codes, texts = generate_image_and_text(self.model, ids, generators, grid * grid, eos, limit,
                                                   max_new_tokens, sampling, text_sampling, instruction=read)
        return self.decode_codes(codes.view(-1, grid, grid))[0], self.tokenizer.decode(texts[0]).strip()

    @torch.inference_mode()
    def decode_codes(self, codes: torch.Tensor) -> list[Image.Image]:
        """VQ codes (B, h, w) -> PIL images."""
        return [tensor_to_pil(img) for img in self.vq.decode_codes(codes)]

    # --- image to text ---------------------------------------------------------------------------
    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        lang: str = "en",
        temperature: float = 0.0,
        max_new_tokens: int = 64,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        cfg_scale: float | None = None,
        plausibility: float | None = None,
        rerank: int = 1,
        refine: int | None = None,
    ) -> list[str]:
        """A caption per image (PIL images or file paths), in English (`lang="en"`) or Chinese ("zh").

        Greedy by default; with `temperature > 0` caption i is drawn with seed `seed + i`.
        `cfg_scale` > 1 guides each caption by its image against the language model reading the
        instruction alone, so what the image shows outweighs what the text usually says; only words
        at least `plausibility` times as likely as the best one given the image are candidates
        (`mars.generate.guide_text`).
        `rerank` > 1 also draws `rerank - 1` captions per image at temperature 1 (candidate k of
        caption i with seed `seed + i + k * RERANK_SEED_STRIDE`, same filters and guidance) and keeps,
        of those and the caption `rerank=1` gives, the one under which the model finds the image's
        codes likeliest when drawing (`mars.rerank.best_caption`).
        `refine` > 0 then edits each caption for up to that many rounds: one token at a time, to
        one of the words the model finds nearly as likely there, kept when the image drawn from the
        caption and the caption read from the image both gain (`mars.rerank.refine_caption`; each
        round costs about one forward per edit tried, tens per caption).
        `cfg_scale`, `plausibility` and `refine` left at None take the model's defaults
        (`caption_config`: the "caption" entry of its generation_config.json, else no guidance and no
        edits).
        """
        if lang not in CAPTION_INSTRUCTIONS:
            raise MarsError(f"lang must be one of {', '.join(CAPTION_INSTRUCTIONS)}, got {lang!r}")
        guidance = self.caption_settings(cfg_scale, plausibility, refine)
        sampling = SampleConfig(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=guidance.cfg_scale)
        _check_count("max_new_tokens", max_new_tokens)
        _check_count("batch_size", batch_size)
        _check_count("rerank", rerank)
        items = [images] if isinstance(images, (Image.Image, str, os.PathLike)) else list(images)
        if not items:
            raise MarsError("no images to caption")
        instruction = self.tokenizer.encode(CAPTION_INSTRUCTIONS[lang])
        config = self.model.config
        length = config.image_tokens + 2 + len(instruction) + max_new_tokens
        if length > config.max_seq_len:
            raise MarsError(f"max_new_tokens {max_new_tokens} is too many: an image, the instruction and the "
                            f"caption need {length} tokens, the model's context holds {config.max_seq_len}")
        captions: list[str] = []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            codes = self.encode_images(chunk)  # (B, h, w)
            prefixes = [caption_prefix(self.model, c, instruction) for c in codes]
            seeds = [int(seed) + start + i for i in range(len(chunk))]
            texts = self._caption_ids(prefixes, seeds, instruction, max_new_tokens, sampling, guidance.plausibility)
            if rerank > 1:
                drawn = dataclasses.replace(sampling, temperature=1.0)
                drawn_seeds = [s + k * RERANK_SEED_STRIDE for s in seeds for k in range(1, rerank)]
                others = self._caption_ids(prefixes, drawn_seeds, instruction, max_new_tokens, drawn,
                                           guidance.plausibility, copies=rerank - 1)
                texts = [best_caption(self.model, [text, *others[i * (rerank - 1) : (i + 1) * (rerank - 1)]], c)
                         for i, (text, c) in enumerate(zip(texts, codes))]
            if guidance.refine:
                texts = [refine_caption(self.model, self.tokenizer, c, instruction, text, guidance.refine)
                         for text, c in zip(texts, codes)]
            captions.extend(self.tokenizer.decode(t).strip() for t in texts)
        return captions

    def _caption_ids(self, prefixes: list[list[int]], seeds: list[int], instruction: list[int], max_new_tokens: int,
                     sampling: SampleConfig, plausibility: float, copies: int = 1) -> list[list[int]]:
        """Caption text ids after each `<img> codes </img> instruction` prefix, `copies` per prefix
        (one seed each), guided against the instruction alone when `sampling.cfg_scale != 1`."""
        return generate_text(self.model, prefixes, make_generators(seeds, self.device), self.tokenizer.eos_id,
                             self.tokenizer.vocab_size, max_new_tokens, sampling,
                             unconditional_prefixes=[instruction] * len(prefixes), plausibility=plausibility,
                             copies=copies)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images (PIL or paths) -> VQ codes (B, h, w) at the model's resolution (center crop)."""
        size = self.model.config.image_size
        tensors = []
        for item in images:
            if not isinstance(item, Image.Image):
                try:
                    item = load_image(item)
                except UnusableImage as err:
                    raise MarsError(f"cannot read image {item}: {err}") from None
            tensors.append(pil_to_tensor(resize_center_crop(item.convert("RGB"), size)))
        return self.vq.encode_to_codes(torch.stack(tensors))

    # --- checks ----------------------------------------------------------------------------------
    def image_tokens(self, image_size: int | None = None) -> int:
        """Codes per image at `image_size` (None: the model's default resolution)."""
        return self._grid(image_size) ** 2

    def _grid(self, image_size: int | None) -> int:
        config = self.model.config
        size = config.image_size if image_size is None else image_size
        f = config.image_downsample
        if isinstance(size, bool) or not isinstance(size, int) or size < f or size % f:
            raise MarsError(f"image_size must be a positive multiple of {f} (the VQ-GAN's downsampling), got {size!r}")
        if config.image_positions == "2d" and size != config.image_size:
            raise MarsError(f"this model places image codes on a {config.image_grid} x {config.image_grid} grid "
                            f"(image_positions 2d): it draws {config.image_size} px images only, not {size}")
        return size // f

    def encode_negative_prompts(self, negative: str | Sequence[str], n: int, extra_tokens: int) -> list[list[int]]:
        """Token ids of one negative prompt per prompt ("" = the null prompt: no ids)."""
        negatives = [negative] * n if isinstance(negative, str) else list(negative)
        if len(negatives) != n:
            raise MarsError(f"{len(negatives)} negative prompts for {n} prompts (give one, or one per prompt)")
        limit = self._prompt_limit(extra_tokens)
        return [self._encode_text(t, limit, f"negative prompt {i}") if not isinstance(t, str) or t.strip() else []
                for i, t in enumerate(negatives)]

    def encode_prompts(self, prompts: list[str], extra_tokens: int) -> list[list[int]]:
        """Token ids of each prompt; each must leave room for `<img>`, `extra_tokens` (the image
        tokens, and any text after it) and `</img>`. Empty or over-long prompts raise MarsError."""
        if not prompts:
            raise MarsError("no prompts given")
        limit = self._prompt_limit(extra_tokens)
        return [self._encode_text(prompt, limit, f"prompt {i}") for i, prompt in enumerate(prompts)]

    def _prompt_limit(self, extra_tokens: int) -> int:
        limit = self.model.config.max_seq_len - extra_tokens - 2
        if limit < 1:
            raise MarsError(f"an image of this size does not fit the model's context of "
                            f"{self.model.config.max_seq_len} tokens")
        return limit

    def _encode_text(self, text: str, limit: int, label: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise MarsError(f"{label} is empty" if isinstance(text, str) else f"{label} is not a string")
        tokens = self.tokenizer.encode(text)
        if len(tokens) > limit:
            raise MarsError(f"{label} is too long: {len(tokens)} tokens, the model's context of "
                            f"{self.model.config.max_seq_len} leaves room for {limit} beside the image")
        return tokens


CAPTION_KEY = "caption"  # generation_config.json entry of the caption defaults (CaptionConfig fields)
RERANK_KEY = "rerank"  # ... and of how candidate images are judged (RerankConfig fields)
PROMPT_ORDER_KEY = "prompt_order"  # ... and of how prompts are restated (AS_WRITTEN or READING)


def check_prompt_order(order: str) -> str:
    """`order` if it is one of PROMPT_ORDERS, else a MarsError naming them."""
    if order not in PROMPT_ORDERS:
        raise MarsError(f"{PROMPT_ORDER_KEY} must be one of {', '.join(PROMPT_ORDERS)}, got {order!r}")
    return order


def _read_generation_config(model_dir: str | os.PathLike) -> tuple[Path, dict]:
    path = Path(model_dir) / GENERATION_CONFIG
    return path, (read_config_file(path) if path.is_file() else {})  # its errors name the file


def load_generation_config(model_dir: str | os.PathLike) -> SampleConfig:
    """A model folder's default sampling settings (its generation_config.json), else SampleConfig()."""
    path, data = _read_generation_config(model_dir)
    for key in (CAPTION_KEY, RERANK_KEY, PROMPT_ORDER_KEY):
        data.pop(key, None)
    try:
        return from_dict(SampleConfig, data)
    except MarsError as err:
        raise MarsError(f"{path}: {err}") from None


def _load_section(model_dir: str | os.PathLike, key: str, cls: type[T]) -> T:
    path, data = _read_generation_config(model_dir)
    section = data.get(key, {})
    if not isinstance(section, dict):
        raise MarsError(f"{path}: {key} must be a mapping of {cls.__name__} fields, got {section!r}")
    try:
        return from_dict(cls, section, prefix=f"{key}.")
    except MarsError as err:
        raise MarsError(f"{path}: {err}") from None


def load_caption_config(model_dir: str | os.PathLike) -> CaptionConfig:
    """A model folder's default caption decoding (generation_config.json's "caption"), else CaptionConfig()."""
    return _load_section(model_dir, CAPTION_KEY, CaptionConfig)


def load_rerank_config(model_dir: str | os.PathLike) -> RerankConfig:
    """How a model folder judges candidate images (generation_config.json's "rerank"), else RerankConfig()."""
    return _load_section(model_dir, RERANK_KEY, RerankConfig)


def load_prompt_order(model_dir: str | os.PathLike) -> str:
    """How a model folder restates prompts (generation_config.json's "prompt_order"), else "as-written"."""
    path, data = _read_generation_config(model_dir)
    try:
        return check_prompt_order(data.get(PROMPT_ORDER_KEY, AS_WRITTEN))
    except MarsError as err:
        raise MarsError(f"{path}: {err}") from None


def save_generation_config(model_dir: str | os.PathLike, config: SampleConfig, caption: CaptionConfig | None = None,
                           rerank: RerankConfig | None = None, prompt_order: str = AS_WRITTEN) -> None:
    """Write a model folder's generation_config.json: `config`, and `caption`, `rerank` and
    `prompt_order` unless they are the defaults (what `load_generation_config`, `load_caption_config`,
    `load_rerank_config`, `load_prompt_order` read)."""
    data = dataclasses.asdict(config)
    for key, section in ((CAPTION_KEY, caption), (RERANK_KEY, rerank)):
        if section is not None and section != type(section)():
            data[key] = dataclasses.asdict(section)
    if check_prompt_order(prompt_order) != AS_WRITTEN:
        data[PROMPT_ORDER_KEY] = prompt_order
    (Path(model_dir) / GENERATION_CONFIG).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_prompt_order(model_dir: str | os.PathLike, order: str) -> None:
    """Set a model folder's "prompt_order", keeping its other generation settings (or the defaults)."""
    save_generation_config(model_dir, load_generation_config(model_dir), load_caption_config(model_dir),
                           load_rerank_config(model_dir), order)


def _image_seeds(seed: int | Sequence[int], count: int) -> list[int]:
    """The seed of each of `count` images: `seed + i`, or a list given one per image."""
    if isinstance(seed, Sequence):
        if len(seed) != count:
            raise MarsError(f"seed: {len(seed)} seeds given for {count} images (one per image, or one int)")
        return [int(s) for s in seed]
    return [int(seed) + i for i in range(count)]


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MarsError(f"{name} must be a positive integer, got {value!r}")


__all__ = ["MarsPipeline", "resolve_device", "resolve_dtype"]
