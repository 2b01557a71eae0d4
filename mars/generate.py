"""Sampling and decoding: filters, classifier-free guidance, prefill/decode, T2I, I2T, image + text.

Everything here works on token ids; `mars.pipeline.MarsPipeline` adds the text tokenizer, the VQ
decoder and PIL images on top.

Sequences (PAPER.md §2, §4):

    text-to-image    prompt <img> c_1 .. c_N                 (then </img>, never sampled)
    image + text     prompt <img> c_1 .. c_N </img> t_1 ..    (text until eos)
    image-to-text    <img> c_1 .. c_N </img> instruction t_1 ..

How the engine is fast:
- one prefill of the left-padded prompts fills a static `KVCache` sized exactly to what the
  request needs; each decode step feeds one token per row;
- an image decode step runs the visual expert alone (`image_mask=True`, no routing) and computes
  logits only for the image rows of the head (`vocab.image_ids`), so image mode also cannot emit a
  text id or a special;
- classifier-free guidance runs the conditional and the unconditional (null prompt: `<img>` alone)
  rows in ONE batch and combines them on the small image slice; `cfg_scale == 1` skips the doubling;
  captions can be guided the same way, by the image against the instruction alone (`guide_text`);
- the loop keeps every token on the device (no host sync per image step);
- optionally the decode step is compiled (`torch.compile`) and, on CUDA, captured once and
  replayed as a CUDA graph (one launch per token); uncompiled on the CPU it is `CPUImageStep`
  (`mars.model.cpu_decode`), the same computation with less work per step.

Reproducibility: each image has its own `torch.Generator` (seeded from its seed), and every random
number of row i comes from generator i, so an image is the same whether made alone or in a batch.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from mars.data.sequences import INSTRUCTION_EN, INSTRUCTION_ZH
from mars.errors import MarsError
from mars.model.cpu_decode import CPUImageStep, uses_cpu_step
from mars.model.semvie import KVCache, SemVIE

# Instruction that follows `</img>` in image-to-text sequences: the strings training used.
CAPTION_INSTRUCTIONS = {"en": INSTRUCTION_EN, "zh": INSTRUCTION_ZH}
PAD_ID = 0  # id written into left padding; padded slots are never attended to

Generators = list[torch.Generator] | None


# ---------------------------------------------------------------------------------------------
# Sampling: pure functions of the logits (no in-place edits)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleConfig:
    """How tokens are drawn. Filters apply in the order top-k -> temperature -> top-p (DESIGN.md).

    temperature 0 = greedy; top_k 0 = off; top_p 1 = off; cfg_scale 1 = no guidance (no extra rows),
    0 = the unconditional model alone.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 4.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise MarsError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise MarsError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise MarsError(f"top_p must lie in (0, 1], got {self.top_p}")
        check_cfg_scale(self.cfg_scale)

    @property
    def guided(self) -> bool:
        """Whether the unconditional rows run (anything but cfg_scale 1)."""
        return self.cfg_scale != 1.0


@dataclass(frozen=True)
class CaptionConfig:
    """A model's default caption decoding (the "caption" entry of its generation_config.json).

    cfg_scale 1 = the image-conditioned model alone; > 1 guides by the image against the language
    model reading the instruction alone; plausibility: see `guide_text`; refine: rounds of one-word
    edits after decoding (`mars.rerank.refine_caption`; 0 = off).
    """

    cfg_scale: float = 1.0
    plausibility: float = 0.1
    refine: int = 0

    def __post_init__(self) -> None:
        check_cfg_scale(self.cfg_scale)
        check_plausibility(self.plausibility)
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise MarsError(f"refine must be an integer >= 0 (rounds of edits; 0 = off), got {self.refine!r}")


@dataclass(frozen=True)
class RerankConfig:
    """How a model judges its candidate images with `rerank` > 1 (the "rerank" entry of its
    generation_config.json).

    drawing_weight: the weight of the drawing term log p(codes | prompt) beside the reading term
    log p(prompt | image) in a candidate's score (`mars.rerank.best_candidates`; 0 = reading alone).
    """

    drawing_weight: float = 0.0

    def __post_init__(self) -> None:
        weight = self.drawing_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:  # NaN too
            raise MarsError(f"drawing_weight must be a finite number >= 0 (0 = reading alone), got {weight!r}")


T = TypeVar("T")


def with_given(config: T, **settings) -> T:
    """A copy of a settings dataclass with the given (non-None) settings replaced, validated again."""
    return dataclasses.replace(config, **{k: v for k, v in settings.items() if v is not None})


def check_cfg_scale(cfg_scale: float) -> None:
    if not cfg_scale >= 0:  # also rejects NaN
        raise MarsError(f"cfg_scale must be >= 0, got {cfg_scale}")


def check_plausibility(plausibility: float) -> None:
    if not 0 <= plausibility < 1:  # also rejects NaN
        raise MarsError(f"plausibility must lie in [0, 1), got {plausibility}")


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept), -inf elsewhere.

    k <= 0 or k >= vocabulary: no filtering.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token is kept when the probability of the tokens strictly more likely than it is below p,
    so the most likely token always survives. p >= 1: no filtering.
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: torch.Tensor,  # (B, V)
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generators: Generators = None,
) -> torch.Tensor:
    """Draw one id per row -> (B,) long. top-k -> temperature -> top-p; temperature 0 = argmax.

    Row b uses only `generators[b]` (None: the global RNG), so a row's draw does not depend on
    the other rows of the batch. Drawing is the exponential race `argmax(p / E)`, E ~ Exp(1),
    which samples exactly from p and needs no host sync. With top-k the rest of the work (and the
    random numbers) covers only the k candidates, not the whole vocabulary; a tie with the k-th
    logit is then broken by `torch.topk` instead of kept as `top_k_filter` keeps it.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    candidates = None
    if 0 < top_k < logits.shape[-1]:
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k) each, largest first
    logits = logits.float() / temperature
    logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V) or (B, k)
    if generators is None:
        uniform = torch.rand_like(probs)
    else:
        if len(generators) != probs.shape[0]:
            raise ValueError(f"{probs.shape[0]} rows but {len(generators)} generators")
        uniform = torch.stack([torch.rand(probs.shape[1:], generator=g, device=probs.device) for g in generators])
    # E = -log U ~ Exp(1) (U = 0 gives E = inf: that candidate loses); a fraction of the cost of
    # `exponential_`, which has a large fixed cost per call
    choice = (probs / -uniform.log()).argmax(dim=-1)  # (B,)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


def make_generators(seeds: list[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image, on the device where its random numbers are drawn."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def guide(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """(2B, V) stacked [cond; uncond] rows -> (B, V) guided logits `u + s * (c - u)`."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------
# Batches, prefill and the decode steps
# ---------------------------------------------------------------------------------------------


def left_pad(rows: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of different lengths -> ids (B, L) padded on the left, pad_lengths (B,)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = torch.tensor(row, dtype=torch.long)
    pad = torch.tensor([length - len(r) for r in rows], dtype=torch.long)
    return ids.to(device), pad.to(device)


def model_device_dtype(model: SemVIE) -> tuple[torch.device, torch.dtype]:
    weight = model.norm.weight
    return weight.device, weight.dtype


def prefill(model: SemVIE, rows: list[list[int]], cache_len: int, round_to: int = 1,
            split: int | None = None) -> tuple[KVCache, torch.Tensor, int]:
    """Run the left-padded `rows` once, filling a new static cache.

    The cache holds `cache_len` slots beyond the longest row (rounded up to a multiple of
    `round_to`, so compiled steps see few distinct shapes). With `split`, rows[:split] and
    rows[split:] run as two forwards, each over only its own longest row's slots (the rest are
    padding either way): guided captions pair long image rows with short instruction-only rows.
    Returns the cache, the hidden state of each row's last token (R, C) and the first free slot.
    """
    device, dtype = model_device_dtype(model)
    ids, pad = left_pad(rows, device)  # (R, L)
    length = ids.shape[1]
    max_len = length + cache_len
    max_len = max(max_len, min(-(-max_len // round_to) * round_to, model.config.max_seq_len))
    cache = KVCache(model.config, ids.shape[0], max_len, device, dtype, pad)
    groups = [slice(0, split), slice(split, len(rows))] if split is not None else [slice(0, len(rows))]
    last = []
    for group in groups:
        width = max(len(row) for row in rows[group])
        part = ids[group, length - width :]  # (R_g, width): the slots any row of the group fills
        slots = torch.arange(length - width, length, device=device)
        hidden = model.forward_hidden(part, model.image_mask(part), slots, cache_rows(cache, group))
        last.append(hidden[:, -1])
    return cache, torch.cat(last), length


def cache_rows(cache: KVCache, rows: slice) -> KVCache:
    """A view of some rows of a cache: writes land in the full cache."""
    view = copy.copy(cache)
    view.k = [k[rows] for k in cache.k]
    view.v = [v[rows] for v in cache.v]
    view.pad_lengths = cache.pad_lengths[rows]
    view.image_start = cache.image_start[rows]
    return view


def repeat_rows(cache: KVCache, copies: int) -> KVCache:
    """A new cache with every row repeated `copies` times in place (row r -> rows r*copies ..)."""
    repeated = copy.copy(cache)
    repeated.k = [k.repeat_interleave(copies, dim=0) for k in cache.k]
    repeated.v = [v.repeat_interleave(copies, dim=0) for v in cache.v]
    repeated.pad_lengths = cache.pad_lengths.repeat_interleave(copies)
    repeated.image_start = cache.image_start.repeat_interleave(copies)
    return repeated


def keep_rows(cache: KVCache, n: int) -> KVCache:
    """A view of the first n rows of a cache (drops the unconditional rows after an image)."""
    return cache_rows(cache, slice(0, n))


def cache_window(cache: KVCache, length: int) -> KVCache:
    """A view of the first `length` slots of a cache (eager decoding), so attention reads only the
    filled part instead of the whole static cache; writes land in the full cache."""
    view = copy.copy(cache)
    view.k = [k[:, :, :length] for k in cache.k]
    view.v = [v[:, :, :length] for v in cache.v]
    view.max_len = length
    return view


def image_step(model: SemVIE, ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
               cfg_scale: float) -> torch.Tensor:
    """One cached image decode step: ids (R, 1) at slot input_pos (1,) -> guided image logits (B, K).

    Every fed token is an image code, so the visual expert runs alone (`image_mask=True`), and
    only the image rows of the head are computed.
    """
    hidden = model.forward_hidden(ids, True, input_pos, cache)  # (R, 1, C)
    logits = model.logits(hidden[:, -1], rows=model.vocab.image_ids).float()  # (R, K)
    return guided_logits(logits, cfg_scale)


def guided_logits(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """`guide` the stacked rows, unless `cfg_scale` is 1 (no guidance: rows are images)."""
    return guide(logits, cfg_scale) if cfg_scale != 1.0 else logits


@functools.cache
def compiled_image_step() -> Callable:
    """`image_step` under torch.compile (static shapes: the cache is rounded up, see `prefill`)."""
    return torch.compile(image_step, dynamic=False)


class CUDAGraphStep:
    """One decode step captured as a CUDA graph and replayed: a whole step costs one launch.

    The token ids and the slot are copied into static buffers before each replay; the cache
    tensors are captured in place. The returned logits are overwritten by the next replay.
    """

    def __init__(self, step: Callable, model: SemVIE, cache: KVCache, rows: int, cfg_scale: float) -> None:
        device = cache.k[0].device
        self.ids = torch.full((rows, 1), model.vocab.image_offset, dtype=torch.long, device=device)
        # warm-up and capture write their K/V into the last slot, which nothing attends to before a
        # real token is written there
        self.pos = torch.full((1,), cache.max_len - 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles (when `step` is compiled) and settles the allocator
                step(model, self.ids, self.pos, cache, cfg_scale)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(model, self.ids, self.pos, cache, cfg_scale)

    def __call__(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.pos.copy_(input_pos)
        self.graph.replay()
        return self.logits


def make_step(model: SemVIE, cache: KVCache, slot: int, rows: int, cfg_scale: float, compile: bool,
              cuda_graph: bool) -> Callable:
    """The image decode step `(ids (R, 1), t) -> guided logits`, for code t fed at slot `slot + t - 1`.

    On CUDA (with `cuda_graph`) the step is captured once and replayed as a CUDA graph over the
    static cache; `compile` runs it through torch.compile first. Otherwise, uncompiled, each step
    attends over the filled slots only: on the CPU in fp32 as `CPUImageStep`, the same computation
    with less work per step.
    """
    positions = torch.arange(slot, cache.max_len, device=cache.k[0].device)  # positions[t - 1]: slot of code t
    graph = cuda_graph and cache.k[0].device.type == "cuda"
    if not (compile or graph):
        if uses_cpu_step(model, cache):
            cpu_step = CPUImageStep(model, cache, slot)
            return lambda ids, t: guided_logits(cpu_step(ids, t), cfg_scale)
        return lambda ids, t: image_step(model, ids, positions[t - 1 : t], cache_window(cache, slot + t), cfg_scale)
    step = compiled_image_step() if compile else image_step
    if graph:
        graphed = CUDAGraphStep(step, model, cache, rows, cfg_scale)
        return lambda ids, t: graphed(ids, positions[t - 1 : t])
    return lambda ids, t: step(model, ids, positions[t - 1 : t], cache, cfg_scale)


# ---------------------------------------------------------------------------------------------
# Text-to-image
# ---------------------------------------------------------------------------------------------


def image_rows(model: SemVIE, prompts: list[list[int]], guided: bool,
               negative_prompts: list[list[int]] | None = None) -> list[list[int]]:
    """`prompt <img>` per prompt, followed, with guidance, by `negative <img>` per prompt: the null
    (empty) prompt, or the prompt's negative prompt when given."""
    boi = model.vocab.boi_id
    rows = [list(p) + [boi] for p in prompts]
    if not guided:
        return rows
    negatives = negative_prompts if negative_prompts is not None else [[] for _ in prompts]
    return rows + [list(n) + [boi] for n in negatives]


def check_num_tokens(model: SemVIE, num_tokens: int) -> None:
    """Refuse, by name, an image of fewer than one code or of more than a 2-D model's grid holds."""
    if num_tokens < 1:
        raise MarsError(f"num_tokens must be >= 1, got {num_tokens}")
    if model.config.image_positions == "2d" and num_tokens > model.config.image_tokens:
        raise MarsError(f"this model places image codes on a {model.config.image_grid} x {model.config.image_grid} "
                        f"grid (image_positions 2d): it draws at most {model.config.image_tokens} codes, "
                        f"not {num_tokens}")


def check_negative_prompts(prompts: list[list[int]], negative_prompts: list[list[int]] | None,
                           sampling: SampleConfig) -> None:
    """Refuse negative prompts without guidance, or not one per prompt."""
    if negative_prompts is None:
        return
    if not sampling.guided:
        raise MarsError("a negative prompt works through guidance: set cfg_scale != 1")
    if len(negative_prompts) != len(prompts):
        raise MarsError(f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts")


@torch.inference_mode()
def generate_image_tokens(
    model: SemVIE,
    prompts: list[list[int]],
    generators: Generators,
    num_tokens: int,
    sampling: SampleConfig = SampleConfig(),
    use_cache: bool = True,
    compile: bool = False,
    cuda_graph: bool = False,
    progress: bool = False,
    return_logits: bool = False,
    negative_prompts: list[list[int]] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sample `num_tokens` image codes after each prompt -> codes (B, num_tokens) in [0, K).

    `prompts` are text token ids (without `<img>`), of any lengths. `use_cache=False` recomputes
    the whole sequence at every step (the reference the cache is tested and benchmarked against).
    `compile` runs the decode step through torch.compile (worth it for many batches of one shape);
    `cuda_graph` replays it as a CUDA graph on CUDA (one launch per token). With `return_logits`,
    also the guided logits each code was drawn from, (B, num_tokens, K). `negative_prompts` (one per
    prompt, text ids) replace the null prompt in guidance: `u + s * (c - u)` with u after the
    negative prompt steers away from it; they need guidance (`cfg_scale != 1`).
    """
    check_negative_prompts(prompts, negative_prompts, sampling)
    tokens, logits, _, _ = _decode_image(model, prompts, generators, num_tokens, sampling, use_cache,
                                         compile, cuda_graph, progress, return_logits, extra_slots=0,
                                         negative_prompts=negative_prompts)
    return (tokens, logits) if return_logits else tokens


def _decode_image(model, prompts, generators, num_tokens, sampling, use_cache, compile, cuda_graph, progress,
                  return_logits, extra_slots, negative_prompts=None):
    """The image loop shared by T2I and joint generation.

    Returns codes (B, N), the stacked logits (or None), and, for a cached run, the cache and the
    slot of the last sampled code (not yet fed), so text can continue in the same cache.
    """
    check_num_tokens(model, num_tokens)
    vocab, B = model.vocab, len(prompts)
    guided = sampling.guided
    rows = image_rows(model, prompts, guided, negative_prompts)
    device, _ = model_device_dtype(model)
    copies = 2 if guided else 1

    if use_cache:
        # codes 1..N-1 are fed (code N too with `extra_slots`, for joint generation)
        cache, hidden, slot = prefill(model, rows, num_tokens - 1 + extra_slots, round_to=128 if compile else 1)
        logits = model.logits(hidden, rows=vocab.image_ids).float()  # (R, K)
        logits = guided_logits(logits, sampling.cfg_scale)
        next_logits = make_step(model, cache, slot, len(rows), sampling.cfg_scale, compile, cuda_graph)
    else:
        cache, slot = None, None
        ids, pad = left_pad(rows, device)  # (R, L)
        length = ids.shape[1]
        ids = torch.cat([ids, ids.new_full((ids.shape[0], num_tokens), PAD_ID)], dim=1)  # (R, L + N)

        def full_logits(end: int) -> torch.Tensor:
            seq = ids[:, :end]
            hidden = model.forward_hidden(seq, model.image_mask(seq), pad_lengths=pad)[:, -1]
            out = model.logits(hidden, rows=vocab.image_ids).float()
            return guided_logits(out, sampling.cfg_scale)

        def next_logits(new_ids: torch.Tensor, t: int) -> torch.Tensor:
            ids[:, length + t - 1] = new_ids[:, 0]
            return full_logits(length + t)

        logits = full_logits(length)

    codes = torch.empty(B, num_tokens, dtype=torch.long, device=device)
    kept = []
    for t in tqdm(range(num_tokens), desc="image tokens", disable=not progress, leave=False):
        if t:
            new_ids = (codes[:, t - 1] + vocab.image_offset).repeat(copies)[:, None]  # (R, 1)
            logits = next_logits(new_ids, t)
        if return_logits:
            kept.append(logits.clone())  # a CUDA graph reuses its output buffer
        codes[:, t] = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generators)
    stacked = torch.stack(kept, dim=1) if return_logits else None
    last_slot = slot + num_tokens - 1 if use_cache else None
    return codes, stacked, cache, last_slot


# ---------------------------------------------------------------------------------------------
# Text decoding (image-to-text, and the text after a generated image)
# ---------------------------------------------------------------------------------------------


def guide_text(logits: torch.Tensor, cfg_scale: float, plausibility: float) -> torch.Tensor:
    """(2R, V) stacked [with image; without] text logits -> (R, V) image-guided logits.

    `u + s * (c - u)` weighs what the image adds over the language model's own prior (so a caption
    can name a pair the text never paired, where the prior alone would overrule the image); only
    tokens whose probability given the image is at least `plausibility` times the likeliest one's
    stay candidates (the adaptive plausibility rule of contrastive decoding, Li et al. 2023), so
    guidance cannot promote a token the image makes unlikely merely because the prior finds it rarer.
    """
    cond, uncond = logits.chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    if plausibility <= 0:
        return guided
    log_probs = cond.log_softmax(dim=-1)
    floor = log_probs.max(dim=-1, keepdim=True).values + math.log(plausibility)
    return guided.masked_fill(log_probs < floor, float("-inf"))


def _decode_text(model, cache, hidden, slot, generators, sampling, eos_id, vocab_limit, max_new_tokens,
                 plausibility=0.0):
    """Text tokens after `hidden` until each row's eos or `max_new_tokens`.

    `hidden` is (R, C), or with guidance (2R, C): the R conditional rows, then their R unconditional
    rows, which are fed the same tokens (`guide_text`). Generated text is fed through the language
    expert alone (`image_mask=False`); logits cover only the first `vocab_limit` text rows. Returns
    one list per row, without the eos.
    """
    rows = slice(0, vocab_limit)
    guided = sampling.guided
    R = hidden.shape[0] // 2 if guided else hidden.shape[0]
    device = hidden.device
    out = torch.full((R, max_new_tokens), eos_id, dtype=torch.long, device=device)
    done = torch.zeros(R, dtype=torch.bool, device=device)
    positions = torch.arange(slot, slot + max_new_tokens, device=device)

    def next_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = model.logits(hidden, rows=rows).float()  # (R or 2R, V_text)
        return guide_text(logits, sampling.cfg_scale, plausibility) if guided else logits

    logits = next_logits(hidden)
    for t in range(max_new_tokens):
        token = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, generators)
        out[:, t] = token  # a finished row goes on, but its text is cut at its first eos
        done = done | (token == eos_id)
        if t + 1 == max_new_tokens or bool(done.all()):  # one host sync per text token
            break
        window = cache_window(cache, slot + t + 1)
        fed = torch.cat([token, token]) if guided else token
        hidden = model.forward_hidden(fed[:, None], False, positions[t : t + 1], window)[:, -1]
        logits = next_logits(hidden)
    texts = []
    for row in out.tolist():
        texts.append(row[: row.index(eos_id)] if eos_id in row else row)
    return texts


def _check_text_settings(model: SemVIE, eos_id: int, vocab_limit: int, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise MarsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= eos_id < vocab_limit <= model.vocab.text_size:
        raise MarsError(f"text tokenizer (eos {eos_id}, {vocab_limit} ids) does not fit the model's "
                        f"{model.vocab.text_size} text rows")


@torch.inference_mode()
def generate_text(
    model: SemVIE,
    prefixes: list[list[int]],
    generators: Generators,
    eos_id: int,
    vocab_limit: int,
    max_new_tokens: int = 64,
    sampling: SampleConfig = SampleConfig(temperature=0.0, cfg_scale=1.0),
    unconditional_prefixes: list[list[int]] | None = None,
    plausibility: float = 0.0,
    copies: int = 1,
) -> list[list[int]]:
    """Continue each prefix (any mix of text and image ids) with text, one list of ids per row.

    Rows stop independently at `eos_id` (not included) or after `max_new_tokens`; only ids below
    `vocab_limit` (the text tokenizer's size) can be drawn. With `sampling.cfg_scale != 1` each
    prefix is guided against its `unconditional_prefixes` entry (for a caption: the instruction
    without the image), in the same batch; see `guide_text` for `plausibility`. `copies` > 1
    continues each prefix that many times from one prefill (rows `i * copies ..`, one generator
    each): what drawing several captions of one image needs.
    """
    _check_text_settings(model, eos_id, vocab_limit, max_new_tokens)
    check_plausibility(plausibility)
    rows, split = prefixes, None
    if sampling.guided:
        if unconditional_prefixes is None or len(unconditional_prefixes) != len(prefixes):
            given = "none" if unconditional_prefixes is None else len(unconditional_prefixes)
            raise MarsError(f"guided text (cfg_scale {sampling.cfg_scale}) needs one unconditional prefix per "
                            f"prefix: {len(prefixes)} prefixes, {given} unconditional")
        rows, split = [*prefixes, *unconditional_prefixes], len(prefixes)  # the short rows prefill on their own
    cache, hidden, slot = prefill(model, rows, max_new_tokens - 1, split=split)
    if copies > 1:
        cache, hidden = repeat_rows(cache, copies), hidden.repeat_interleave(copies, dim=0)
    return _decode_text(model, cache, hidden, slot, generators, sampling, eos_id, vocab_limit, max_new_tokens,
                        plausibility)


def caption_prefix(model: SemVIE, codes: torch.Tensor, instruction: list[int]) -> list[int]:
    """`<img> c_1 .. c_N </img> instruction` for one image's codes (h, w) or (N,)."""
    vocab = model.vocab
    ids = vocab.codes_to_ids(codes.flatten().cpu()).tolist()
    return [vocab.boi_id, *ids, vocab.eoi_id, *instruction]


def check_text_after_image(model: SemVIE, eos_id: int, vocab_limit: int, max_new_tokens: int,
                           text_sampling: SampleConfig) -> None:
    """Refuse, before any image is drawn, text settings joint generation cannot use: a tokenizer
    that does not fit the model, no new tokens, or guided text (the text continues the prompt's
    rows alone)."""
    _check_text_settings(model, eos_id, vocab_limit, max_new_tokens)
    if text_sampling.guided:
        raise MarsError("the text after a generated image is not guided: text_sampling needs cfg_scale 1")


@torch.inference_mode()
def generate_image_and_text(
    model: SemVIE,
    prompts: list[list[int]],
    generators: Generators,
    num_tokens: int,
    eos_id: int,
    vocab_limit: int,
    max_new_tokens: int = 64,
    sampling: SampleConfig = SampleConfig(),
    text_sampling: SampleConfig = SampleConfig(temperature=0.0, cfg_scale=1.0),
    compile: bool = False,
    progress: bool = False,
    instruction: Sequence[int] = (),
) -> tuple[torch.Tensor, list[list[int]]]:
    """Joint generation: `prompt <img> c_1..c_N </img> instruction` then text in the same sequence
    and cache.

    `instruction` (text ids, default none) is read after `</img>` before the model writes, e.g.
    the caption instruction, so the text says what the image shows. Returns the codes (B, N) and
    the text ids written after it per prompt. With guidance, the unconditional rows are dropped
    once the image is done; the text continues from the prompt's rows.
    """
    check_text_after_image(model, eos_id, vocab_limit, max_new_tokens, text_sampling)
    vocab, B = model.vocab, len(prompts)
    # slots beyond the image: c_N, </img> and the instruction are fed, then up to max_new_tokens - 1 text tokens
    codes, _, cache, slot = _decode_image(model, prompts, generators, num_tokens, sampling, True, compile,
                                          compile, progress, False, extra_slots=len(instruction) + max_new_tokens + 1)
    cache = keep_rows(cache, B)
    read = torch.tensor([vocab.eoi_id, *instruction], device=codes.device).expand(B, -1)  # (B, 1 + len(instruction))
    tail = torch.cat([codes[:, -1:] + vocab.image_offset, read], dim=1)
    positions = torch.arange(slot, slot + tail.shape[1], device=codes.device)
    hidden = model.forward_hidden(tail, model.image_mask(tail), positions, cache)[:, -1]
    texts = _decode_text(model, cache, hidden, slot + tail.shape[1], generators, text_sampling, eos_id, vocab_limit,
                         max_new_tokens)
    return codes, texts


__all__ = [
    "CAPTION_INSTRUCTIONS",
    "CaptionConfig",
    "SampleConfig",
    "caption_prefix",
    "check_text_after_image",
    "generate_image_and_text",
    "generate_image_tokens",
    "generate_text",
    "guide",
    "guide_text",
    "left_pad",
    "make_generators",
    "sample",
    "top_k_filter",
    "top_p_filter",
]
