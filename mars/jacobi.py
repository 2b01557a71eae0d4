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

Each image is decoded on its own (its conditional and unconditional rows): images in a batch
accept different numbers of codes per forward, and a batch already reads the weights once for
many codes. Each image uses only its own generator, so an image does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from mars.errors import MarsError
from mars.generate import (
    SampleConfig,
    check_negative_prompts,
    check_num_tokens,
    guided_logits,
    image_rows,
    prefill,
    top_p_filter,
)
from mars.model.cpu_decode import CPUImageStep, uses_cpu_step
from mars.model.semvie import KVCache, SemVIE


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
    """`(ids (R, T), t) -> image logits (R, T, K)`: codes t .. t + T - 1 fed at once after the
    prefill, at slots `slot + t - 1` ..; the CPU step in fp32 on the CPU, else the model's forward."""

    def __init__(self, model: SemVIE, cache: KVCache, slot: int) -> None:
        self.model, self.cache, self.slot = model, cache, slot
        self.cpu_step = CPUImageStep(model, cache, slot) if uses_cpu_step(model, cache) else None

    def __call__(self, ids: torch.Tensor, t: int) -> torch.Tensor:
        if self.cpu_step is not None:
            return self.cpu_step.window(ids, t)
        first = self.slot + t - 1
        positions = torch.arange(first, first + ids.shape[1], device=ids.device)
        hidden = self.model.forward_hidden(ids, True, positions, self.cache)  # (R, T, C)
        return self.model.logits(hidden, rows=self.model.vocab.image_ids).float()


def decode_image_jacobi(model: SemVIE, prompt: list[int], generator: torch.Generator, num_tokens: int,
                        sampling: SampleConfig, window: int, negative_prompt: list[int] | None = None,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One image's codes (N,) by speculative Jacobi decoding with `window` drafts per forward;
    also the guided logits each code was drawn from (N, K) and the number of forwards."""
    vocab = model.vocab
    rows = image_rows(model, [prompt], sampling.guided, None if negative_prompt is None else [negative_prompt])
    cache, hidden, slot = prefill(model, rows, num_tokens - 1)
    step = WindowStep(model, cache, slot)
    first = guided_logits(model.logits(hidden, rows=vocab.image_ids).float(), sampling.cfg_scale)[0]  # (K,)
    device = first.device
    codes = torch.empty(num_tokens, dtype=torch.long, device=device)
    logits = torch.empty(num_tokens, first.shape[-1], device=device)
    guesses = candidates(first[None], sampling)  # what the next codes are drafted from
    codes[0], logits[0] = draw(guesses[0], generator), first
    done, forwards = 1, 0
    with tqdm(total=num_tokens, initial=1, desc="image tokens", disable=not progress, leave=False) as bar:
        while done < num_tokens:
            width = min(window, num_tokens - 1 - done)  # the last code is drawn, never fed
            guesses = guesses.extended(width)
            drafts = draw(guesses, generator)  # (width,)
            fed = torch.cat([codes[done - 1 : done], drafts]) + vocab.image_offset  # (width + 1,)
            window_logits = step(fed[None].expand(len(rows), -1), done)  # (R, width + 1, K)
            guided = guided_logits(window_logits, sampling.cfg_scale)[0]  # (width + 1, K)
            probs = candidates(guided, sampling)
            new = verify(drafts, guesses, probs, generator)  # (n + 1,)
            codes[done : done + len(new)], logits[done : done + len(new)] = new, guided[: len(new)]
            done, forwards = done + len(new), forwards + 1
            guesses = probs[len(new) :] if len(new) <= width else probs[-1:]
            bar.update(len(new))
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
    each code was drawn from (B, num_tokens, K). Each image is decoded on its own, from its own
    generator (one per prompt)."""
    check_jacobi_window(window)
    if window == 0:
        raise MarsError("a Jacobi window of 0 drafts nothing: decode with mars.generate.generate_image_tokens")
    check_num_tokens(model, num_tokens)
    if len(generators) != len(prompts):
        raise MarsError(f"{len(prompts)} prompts but {len(generators)} generators")
    check_negative_prompts(prompts, negative_prompts, sampling)
    made = [decode_image_jacobi(model, prompt, generator, num_tokens, sampling, window,
                                None if negative_prompts is None else negative_prompts[b], progress)
            for b, (prompt, generator) in enumerate(zip(prompts, generators))]
    codes = torch.stack([c for c, _, _ in made])
    return (codes, torch.stack([lg for _, lg, _ in made])) if return_logits else codes
