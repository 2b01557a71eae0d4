"""Speculative Jacobi decoding of image codes: several codes per forward, the same distribution.

At batch 1 a decode step is bound by reading the weights, not by arithmetic (on this project's CPU
a forward of 4 codes per row costs about 1.2x one of a single code). Speculative Jacobi decoding
(Teng et al., 2024, "Accelerating Auto-regressive Text-to-Image Generation with Training-free
Speculative Jacobi Decoding") uses that: each forward feeds the last accepted code followed by a
window of drafted codes and verifies the drafts in order.

- Draft j was drawn from a guess q_j (the distributions the previous forward computed for those
  places, from a context that was still partly drafted; the last one repeats past its end).
- This forward gives p_j, the model's distribution after the accepted codes and drafts 0..j-1
  (guided and filtered exactly as `mars.generate.sample` filters).
- Draft j is accepted with probability min(1, p_j(x) / q_j(x)); at the first rejection a code is
  drawn from the residual max(0, p_j - q_j) (normalised) instead, and the rest of the window is
  dropped; when every draft is accepted, one more code is drawn from the last p.

This is speculative sampling's rule (Leviathan et al., 2023; Chen et al., 2023), so every accepted
code is distributed exactly as p given the codes before it: the images are samples of the same
distribution as one-code-per-step decoding (not the same images for a seed: the random numbers are
used differently). With temperature 0 it is Jacobi decoding of the greedy image, code for code.

The images of a batch accept different numbers of codes per forward, so each goes at its own
pace: a forward feeds every image's window at its own codes (on the CPU, rows at different slots
of one cache; elsewhere one forward per image). Image b draws every random number from its own
generator, in an order that depends on its own codes alone, so an image does not depend on its
batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mars.errors import MarsError
from mars.generate import (
    SampleConfig,
    cache_rows,
    caption_prefix,
    check_negative_prompts,
    check_num_tokens,
    check_text_after_image,
    generate_text,
    guided_logits,
    image_rows,
    prefill,
    top_p_filter,
)
from mars.model.cpu_decode import CPUImageStep, uses_cpu_step
from mars.model.semvie import SemVIE


def check_jacobi_window(window: int, compile: bool = False) -> None:
    """Refuse, by name, a Jacobi window that is not an integer >= 0 (0 = off), or one with `compile`."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise MarsError(f"the Jacobi window (drafted codes per forward) must be an integer >= 0 (0 = off), "
                        f"got {window!r}")
    if window and compile:
        raise MarsError("speculative Jacobi decoding runs eager window steps: it does not combine with compile")


@dataclass(frozen=True)
class Candidates:
    """Distributions over image codes, kept as the codes they can draw: ids (..., k) and their
    probabilities (..., k) (the top-k codes, as `mars.generate.sample` draws among them)."""

    ids: torch.Tensor
    probs: torch.Tensor

    def __getitem__(self, index) -> Candidates:
        return Candidates(self.ids[index], self.probs[index])

    def __len__(self) -> int:
        return len(self.ids)

    def prob_of(self, codes: torch.Tensor) -> torch.Tensor:
        """The probability of `codes`: one per distribution (codes (...,) for ids (..., k)), or, for
        one distribution (ids (k,)), of each of the codes (n,) -> (n,)."""
        return (self.probs * (self.ids == codes[..., None])).sum(-1)

    def extended(self, places: int) -> Candidates:
        """The first `places` distributions, the last one repeated past the end."""
        extra = max(places - len(self), 0)
        return Candidates(torch.cat([self.ids, self.ids[-1:].expand(extra, -1)])[:places],
                          torch.cat([self.probs, self.probs[-1:].expand(extra, -1)])[:places])


def candidates(logits: torch.Tensor, sampling: SampleConfig) -> Candidates:
    """(..., K) logits -> the distributions `mars.generate.sample` draws from, filtered in its order:
    top-k (`torch.topk`) -> temperature -> top-p; temperature 0 = the argmax alone."""
    if sampling.temperature == 0:
        ids = logits.argmax(-1, keepdim=True)
        return Candidates(ids, torch.ones(ids.shape, device=ids.device))
    k = sampling.top_k if 0 < sampling.top_k < logits.shape[-1] else logits.shape[-1]
    values, ids = torch.topk(logits, k, dim=-1)  # (..., k), largest first
    return Candidates(ids, top_p_filter(values.float() / sampling.temperature, sampling.top_p).softmax(dim=-1))


def draw(dist: Candidates, generator: torch.Generator) -> torch.Tensor:
    """One code per distribution -> (...,) long, by the exponential race `argmax(p / E)`."""
    uniform = torch.rand(dist.probs.shape, generator=generator, device=dist.probs.device)
    choice = (dist.probs / -uniform.log()).argmax(dim=-1, keepdim=True)
    return dist.ids.gather(-1, choice).squeeze(-1)


def verify(drafts: torch.Tensor, guesses: Candidates, probs: Candidates, generator: torch.Generator) -> torch.Tensor:
    """The codes a window yields: drafts (L,) drawn from guesses (L), the model's distributions
    (L + 1) after each of them -> the accepted drafts and one code more, (n + 1,) with n <= L accepted."""
    window = drafts.shape[0]
    uniform = torch.rand(window, generator=generator, device=drafts.device)
    accepted = uniform * guesses.prob_of(drafts) < probs[:window].prob_of(drafts)  # P = min(1, p / q)
    n = int(accepted.long().cumprod(0).sum())
    if n < window:  # rejected: draw from what p has beyond q (p itself if nothing, a rounding tie)
        p = probs[n]
        residual = (p.probs - guesses[n].prob_of(p.ids)).clamp(min=0)
        extra = draw(Candidates(p.ids, residual) if residual.sum() > 0 else p, generator)
    else:
        extra = draw(probs[window], generator)
    return torch.cat([drafts[:n], extra[None]])


class WindowStep:
    """Prefills the prompts, then `(codes (B, T), t (B,)) -> guided image logits (B, T, K)`: image b
    gets codes t_b .. t_b + T - 1 fed at once (its conditional and unconditional rows alike).

    An image's rows sit next to each other in one cache. On the CPU in fp32 one `CPUImageStep`
    feeds every row at its own codes; elsewhere each image's rows run the model's forward on their
    part of the cache. `first` (B, K) are the guided logits of each image's first code.
    """

    def __init__(self, model: SemVIE, prompts: list[list[int]], sampling: SampleConfig,
                 negative_prompts: list[list[int]] | None, cache_len: int) -> None:
        self.model, self.cfg_scale = model, sampling.cfg_scale
        self.copies = 2 if sampling.guided else 1  # rows per image: [prompt, negative or null prompt]
        negatives = negative_prompts or [None] * len(prompts)
        rows = [row for prompt, negative in zip(prompts, negatives)
                for row in image_rows(model, [prompt], sampling.guided, None if negative is None else [negative])]
        self.cache, hidden, self.slot = prefill(model, rows, cache_len)
        self.first = self._guided(model.logits(hidden, rows=model.vocab.image_ids).float())  # (B, K)
        self.cpu_step = CPUImageStep(model, self.cache, self.slot) if uses_cpu_step(model, self.cache) else None

    def _guided(self, logits: torch.Tensor) -> torch.Tensor:
        """(B copies, ...) logits, each image's rows together -> (B, ...) guided."""
        by_image = logits.view(-1, self.copies, *logits.shape[1:])
        return guided_logits(by_image.transpose(0, 1).reshape(logits.shape), self.cfg_scale)

    def __call__(self, codes: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ids = (codes + self.model.vocab.image_offset).repeat_interleave(self.copies, dim=0)  # (B copies, T)
        if self.cpu_step is not None:
            return self._guided(self.cpu_step.window(ids, t.repeat_interleave(self.copies)))
        logits = []
        for b, first_code in enumerate(t.tolist()):
            rows = slice(b * self.copies, (b + 1) * self.copies)
            first = self.slot + first_code - 1
            positions = torch.arange(first, first + ids.shape[1], device=ids.device)
            hidden = self.model.forward_hidden(ids[rows], True, positions, cache_rows(self.cache, rows))
            logits.append(self.model.logits(hidden, rows=self.model.vocab.image_ids).float())  # (copies, T, K)
        return self._guided(torch.cat(logits))


def decode_images_jacobi(model: SemVIE, prompts: list[list[int]], generators: list[torch.Generator],
                         num_tokens: int, sampling: SampleConfig, window: int,
                         negative_prompts: list[list[int]] | None = None, progress: bool = False,
                         return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Codes (B, N) by speculative Jacobi decoding with `window` drafts per forward, every image at
    its own code; also, with `return_logits`, the guided logits each code was drawn from (B, N, K)
    (else None), and the number of forwards. Image b draws every random number from generators[b],
    in an order that depends on its own codes alone."""
    B, N = len(prompts), num_tokens
    # a window may reach `window` slots past the last fed code (unused drafts of a nearly done image)
    step = WindowStep(model, prompts, sampling, negative_prompts, N - 1 + window)
    device = step.first.device
    codes = torch.zeros(B, N, dtype=torch.long, device=device)
    logits = torch.empty(B, N, step.first.shape[-1], device=device) if return_logits else None
    first = candidates(step.first, sampling)
    guesses = [first[b : b + 1] for b in range(B)]  # what each image's next codes are drafted from
    for b, generator in enumerate(generators):
        codes[b, 0] = draw(guesses[b][0], generator)
    if return_logits:
        logits[:, 0] = step.first
    done, forwards = [1] * B, 0
    with tqdm(total=B * N, initial=B, desc="image tokens", disable=not progress, leave=False) as bar:
        while min(done) < N:
            widths = [min(window, N - 1 - d) if d < N else 0 for d in done]  # the last code is drawn, never fed
            drafts = []
            for b, generator in enumerate(generators):
                guesses[b] = guesses[b].extended(widths[b])
                drafts.append(draw(guesses[b], generator) if widths[b] else codes.new_empty(0))
            # a finished image feeds its last fed code again: its slots stay within the cache
            t = torch.tensor([min(d, N - 1) for d in done], device=device)  # (B,)
            padded = torch.stack([torch.cat([d, d.new_zeros(window - len(d))]) for d in drafts])  # (B, window)
            guided = step(torch.cat([codes.gather(1, t[:, None] - 1), padded], dim=1), t)  # (B, window + 1, K)
            for b, generator in enumerate(generators):
                if done[b] == N:
                    continue
                probs = candidates(guided[b, : widths[b] + 1], sampling)
                new = verify(drafts[b], guesses[b], probs, generator)  # (n + 1,)
                codes[b, done[b] : done[b] + len(new)] = new
                if return_logits:
                    logits[b, done[b] : done[b] + len(new)] = guided[b, : len(new)]
                done[b] += len(new)
                guesses[b] = probs[len(new) :] if len(new) <= widths[b] else probs[-1:]
                bar.update(len(new))
            forwards += 1
    return codes, logits, forwards


@torch.inference_mode()
def generate_image_tokens_jacobi(
    model: SemVIE,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    num_tokens: int,
    sampling: SampleConfig,
    window: int,
    progress: bool = False,
    return_logits: bool = False,
    negative_prompts: list[list[int]] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`mars.generate.generate_image_tokens` by speculative Jacobi decoding with `window` drafted
    codes per forward (>= 1): codes (B, num_tokens), and with `return_logits` the guided logits
    each code was drawn from (B, num_tokens, K). Each image goes at its own pace, from its own
    generator (one per prompt)."""
    check_jacobi_window(window)
    if window == 0:
        raise MarsError("a Jacobi window of 0 drafts nothing: decode with mars.generate.generate_image_tokens")
    check_num_tokens(model, num_tokens)
    if len(generators) != len(prompts):
        raise MarsError(f"{len(prompts)} prompts but {len(generators)} generators")
    check_negative_prompts(prompts, negative_prompts, sampling)
    codes, logits, _ = decode_images_jacobi(model, prompts, generators, num_tokens, sampling, window,
                                            negative_prompts, progress, return_logits)
    return (codes, logits) if return_logits else codes


@torch.inference_mode()
def generate_image_and_text_jacobi(
    model: SemVIE,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    num_tokens: int,
    eos_id: int,
    vocab_limit: int,
    window: int,
    max_new_tokens: int = 64,
    sampling: SampleConfig = SampleConfig(),
    text_sampling: SampleConfig = SampleConfig(temperature=0.0, cfg_scale=1.0),
    progress: bool = False,
    instruction: Sequence[int] = (),
) -> tuple[torch.Tensor, list[list[int]]]:
    """`mars.generate.generate_image_and_text` with the image by speculative Jacobi decoding: codes
    (B, num_tokens), then the text the model writes after `prompt <img> codes </img> instruction`
    (one prefill of that sequence, then one token per step), from the same generators."""
    check_text_after_image(model, eos_id, vocab_limit, max_new_tokens, text_sampling)
    codes = generate_image_tokens_jacobi(model, prompts, generators, num_tokens, sampling, window, progress)
    prefixes = [list(prompt) + caption_prefix(model, codes[b], list(instruction)) for b, prompt in enumerate(prompts)]
    return codes, generate_text(model, prefixes, generators, eos_id, vocab_limit, max_new_tokens, text_sampling)
