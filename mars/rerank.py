"""Best-of-N by self-captioning: the model judges its own candidate images by reading them back.

A MARS model is also a captioner (image-to-text, stage I), and it reads some facts more reliably
than it draws them: the built-in model, reading, prefers the true caption to one with the sizes or
the colour-shape binding exchanged in 90-100 % of scenes, but draws the binding of two objects right
in about half of its images (`mars eval prompt-probe`, docs/shapes-demo.md). So for each
requested image, `MarsPipeline.generate(..., rerank=N)` draws N candidates and keeps the one under
which the prompt, read as that image's caption, is most likely:

    score(image) = log p(prompt, <eos> | <img> codes </img> instruction)

with the caption instruction and form of the prompt's language (English captions follow the
instruction after a space, as in training). Every candidate is scored on the same text, so the
scores compare directly; the end-of-text term also penalises images with more than the prompt
asks for. This is reranking with the model itself, as DALL-E reranked with CLIP: no second model.
A model may add the drawing direction (`rerank_drawing_weight`, its generation_config.json's
"rerank" entry):

    score(image) += w * log p(codes | prompt <img>)

which prefers, among images the prompt explains equally well, the one it would most likely draw:
fewer stray codes, so fewer extra objects (the built-in model reads "four red circles" on five
circles as well as on four, its captions never having said "five"; with the drawing term, w = 0.1
chosen on validation prompts, it keeps the right count far more often: docs/shapes-demo.md).

Captions are reranked the other way round (`MarsPipeline.caption(..., rerank=N)`): of N candidate
captions of an image, the one kept is the one under which the model, drawing, finds the image's own
codes the likeliest (`image_log_likelihood`), i.e. the caption that best explains the image by
Bayes' rule with the text-to-image direction as the likelihood.

A caption can also be refined (`MarsPipeline.caption(..., refine=R)`, `refine_caption`): up to R
rounds of local search over one-token edits, where each token may be replaced by one the model,
reading the image, finds nearly as likely there; an edit is kept when it raises

    score(caption) = log p(codes | caption as prompt) + log p(caption, <eos> | <img> codes </img> instruction)

(the drawing direction as the likelihood, the reading direction as the prior that keeps the text
fluent). Sampled candidates rarely hold a word the language model's prior opposes, such as the
shape of a colour-shape pair no training caption named; an edit proposes it directly.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from mars.data.sequences import INSTRUCTION_EN, INSTRUCTION_ZH
from mars.errors import MarsError
from mars.generate import caption_prefix, left_pad, model_device_dtype, prefill, repeat_rows
from mars.model.semvie import SemVIE
from mars.text_tokenizer import TextTokenizer

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def prompt_language(prompt: str) -> str:
    """"zh" when the prompt holds Chinese characters, else "en" (the two caption languages)."""
    return "zh" if _CJK.search(prompt) else "en"


def caption_ids(tokenizer: TextTokenizer, prompt: str) -> tuple[list[int], list[int]]:
    """(instruction ids, caption ids ending in <eos>) that read `prompt` as a caption, in its language."""
    lang = prompt_language(prompt)
    instruction = tokenizer.encode(INSTRUCTION_ZH if lang == "zh" else INSTRUCTION_EN)
    caption = tokenizer.encode(prompt if lang == "zh" else " " + prompt)
    return instruction, [*caption, tokenizer.eos_id]


def check_fits(model: SemVIE, tokenizer: TextTokenizer, prompts: list[str], image_tokens: int) -> None:
    """Raise MarsError, before any image is drawn, when a prompt read as a caption does not fit the
    context beside an image of `image_tokens` codes."""
    for prompt in prompts:
        instruction, caption = caption_ids(tokenizer, prompt)
        length = image_tokens + 2 + len(instruction) + len(caption)
        if length > model.config.max_seq_len:
            raise MarsError(f"the prompt is too long to rerank by: an image, the caption instruction and the prompt "
                            f"need {length} tokens, the model's context holds {model.config.max_seq_len}")


@torch.inference_mode()
def caption_log_likelihoods(model: SemVIE, codes: torch.Tensor,
                            captions: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """log p(caption_i | <img> codes_i </img> instruction_i) per row: codes (N, h, w) and N
    (instruction ids, caption ids) pairs -> (N,) in nats.

    One full forward over the N sequences, right padded (causal attention keeps padding out of
    the real tokens); `check_fits` first.
    """
    if len(captions) != len(codes):
        raise ValueError(f"{len(captions)} captions for {len(codes)} images")
    device, _ = model_device_dtype(model)
    rows = [caption_prefix(model, c, instruction) + caption for c, (instruction, caption) in zip(codes, captions)]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)  # (N, L)
    inputs = ids[:, :-1]
    hidden = model.forward_hidden(inputs, model.image_mask(inputs))  # (N, L-1, C)
    # the columns whose next token is a caption token: [len(row) - len(caption) - 1, len(row) - 1)
    row_of = torch.cat([torch.full((len(caption),), i) for i, (_, caption) in enumerate(captions)]).to(device)
    column = torch.cat([torch.arange(len(row) - len(caption) - 1, len(row) - 1)
                        for row, (_, caption) in zip(rows, captions)]).to(device)
    log_probs = F.log_softmax(model.logits(hidden[row_of, column]).float(), dim=-1)  # (M, V)
    token_log_probs = log_probs.gather(-1, ids[row_of, column + 1][:, None]).squeeze(-1)  # (M,)
    return torch.zeros(len(rows), device=device).index_add(0, row_of, token_log_probs)


def caption_log_likelihood(model: SemVIE, codes: torch.Tensor, instruction: list[int],
                           caption: list[int]) -> torch.Tensor:
    """log p(caption | <img> codes </img> instruction) of every image: codes (N, h, w) -> (N,) in nats."""
    return caption_log_likelihoods(model, codes, [(instruction, caption)] * len(codes))


def candidate_scores(model: SemVIE, tokenizer: TextTokenizer, prompts: list[str], codes: torch.Tensor,
                     per_image: int, drawing_weight: float = 0.0) -> torch.Tensor:
    """(len(prompts), per_image) scores of each prompt's candidates: the caption likelihood of the
    prompt, plus `drawing_weight` times the codes' likelihood after the prompt, in nats.

    `codes` (len(prompts) * per_image, h, w) holds each prompt's candidates one after the other.
    """
    if len(codes) != len(prompts) * per_image:
        raise ValueError(f"{len(codes)} candidates for {len(prompts)} prompts x {per_image}")
    rows = []
    for i, prompt in enumerate(prompts):
        candidates = codes[i * per_image : (i + 1) * per_image]
        instruction, caption = caption_ids(tokenizer, prompt)
        scores = caption_log_likelihood(model, candidates, instruction, caption)
        if drawing_weight:
            scores = scores + drawing_weight * drawing_log_likelihoods(model, [tokenizer.encode(prompt)] * per_image,
                                                                      candidates)
        rows.append(scores)
    return torch.stack(rows)


def best_candidates(model: SemVIE, tokenizer: TextTokenizer, prompts: list[str], codes: torch.Tensor,
                    per_image: int, drawing_weight: float = 0.0) -> torch.Tensor:
    """Keep, for each prompt, the candidate with the highest `candidate_scores`.

    `codes` (len(prompts) * per_image, h, w) holds each prompt's candidates one after the other;
    returns (len(prompts), h, w).
    """
    best = candidate_scores(model, tokenizer, prompts, codes, per_image, drawing_weight).argmax(dim=1)  # (P,)
    return codes.view(len(prompts), per_image, *codes.shape[1:])[torch.arange(len(prompts), device=codes.device),
                                                                  best.to(codes.device)]


@torch.inference_mode()
def drawing_log_likelihoods(model: SemVIE, prompts: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
    """log p(codes_i | prompt_i <img>) per row: N prompts (text ids) and codes (N, h, w) -> (N,) in nats.

    One forward over the N left-padded sequences `prompt <img> c_1 .. c_n` (the text-to-image
    sequence form), each code's probability normalised over the image codes, as images are drawn
    (the conditional model alone, without guidance).
    """
    if len(prompts) != len(codes):
        raise ValueError(f"{len(prompts)} prompts for {len(codes)} images")
    vocab = model.vocab
    device, _ = model_device_dtype(model)
    images = vocab.codes_to_ids(codes.flatten(1).cpu()).tolist()  # (N, n)
    ids, pad = left_pad([[*prompt, vocab.boi_id, *image] for prompt, image in zip(prompts, images)], device)
    inputs, n = ids[:, :-1], codes[0].numel()  # ids (N, L)
    hidden = model.forward_hidden(inputs, model.image_mask(inputs), pad_lengths=pad)[:, -n:]  # (N, n, C)
    log_probs = F.log_softmax(model.logits(hidden, rows=vocab.image_ids).float(), dim=-1)  # (N, n, K)
    targets = ids[:, -n:] - vocab.image_ids.start  # (N, n) code indices
    return log_probs.gather(-1, targets[..., None]).squeeze(-1).sum(-1)


def image_log_likelihood(model: SemVIE, prompts: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
    """log p(codes | prompt <img>) of one image's codes (h, w) under each prompt (text ids) -> (N,) in nats."""
    return drawing_log_likelihoods(model, prompts, codes.expand(len(prompts), *codes.shape))


def best_caption(model: SemVIE, candidates: list[list[int]], codes: torch.Tensor) -> list[int]:
    """The candidate caption (text ids) under which the image's codes (h, w) are the likeliest."""
    scores = image_log_likelihood(model, candidates, codes)
    return candidates[int(scores.argmax())]


@torch.inference_mode()
def one_token_edits(model: SemVIE, tokenizer: TextTokenizer, codes: torch.Tensor, instruction: list[int],
                    caption: list[int], top_k: int, floor: float) -> list[list[int]]:
    """Every caption that differs from `caption` (text ids, no <eos>) in one token, the new token
    among the `top_k` likeliest there given the image and the caption so far, and at least `floor`
    times as likely as the likeliest one. One forward over `<img> codes </img> instruction caption`."""
    if not caption:
        return []
    prefix = caption_prefix(model, codes, instruction)
    device, _ = model_device_dtype(model)
    ids = torch.tensor([prefix + caption[:-1]], device=device)  # (1, L): predicts caption[j] at column len(prefix)-1+j
    hidden = model.forward_hidden(ids, model.image_mask(ids))[0, len(prefix) - 1 :]  # (len(caption), C)
    log_probs = F.log_softmax(model.logits(hidden, rows=slice(0, tokenizer.vocab_size)).float(), dim=-1)
    top = log_probs.topk(min(top_k + 1, tokenizer.vocab_size), dim=-1)  # +1: the current token may be among them
    edits = []
    for j, (values, tokens) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
        lowest = values[0] + math.log(floor)  # values are sorted: the likeliest first
        words = [t for v, t in zip(values, tokens) if v >= lowest and t not in (caption[j], tokenizer.eos_id)]
        edits.extend(caption[:j] + [t] + caption[j + 1 :] for t in words[:top_k])
    return edits


def caption_as_prompt(tokenizer: TextTokenizer, caption: list[int]) -> list[int]:
    """A caption's ids re-encoded as a prompt is (stripped text, the tokenizer's own merges); [] when
    it is blank or not whole text (an edit can split a multi-byte character)."""
    text = tokenizer.decode(caption)
    if "\ufffd" in text or not text.strip():
        return []
    return tokenizer.encode(text.strip())


def caption_scores(model: SemVIE, tokenizer: TextTokenizer, codes: torch.Tensor, instruction: list[int],
                   captions: list[list[int]], chunk: int = 16) -> torch.Tensor:
    """log p(codes | caption as prompt) + log p(caption <eos> | image, instruction) of each caption of
    one image (codes (h, w)) -> (N,) in nats, `chunk` captions per forward; `caption_as_prompt` must
    be non-empty for each."""
    prompts = [caption_as_prompt(tokenizer, c) for c in captions]
    if not all(prompts):
        raise ValueError("a caption that is blank or not whole text is not a prompt to score")
    prefix = caption_prefix(model, codes, instruction)
    scores = []
    for start in range(0, len(captions), chunk):
        part = captions[start : start + chunk]
        drawn = image_log_likelihood(model, prompts[start : start + chunk], codes)
        read = continuation_log_likelihoods(model, prefix, [[*c, tokenizer.eos_id] for c in part])
        scores.append(drawn + read)
    return torch.cat(scores)


@torch.inference_mode()
def continuation_log_likelihoods(model: SemVIE, prefix: list[int], continuations: list[list[int]]) -> torch.Tensor:
    """log p(continuation_i | prefix) of text continuations of one shared prefix -> (N,) in nats.

    The prefix runs once into a KV cache that every continuation then reads (its rows repeated);
    the continuations run right padded, one forward, so padding follows every real token.
    """
    width = max(map(len, continuations))
    cache, last, free = prefill(model, [prefix], width)  # last: (1, C)
    cache = repeat_rows(cache, len(continuations))
    device = last.device
    ids = torch.tensor([c + [0] * (width - len(c)) for c in continuations], device=device)  # (N, W)
    hidden = model.forward_hidden(ids, model.image_mask(ids), torch.arange(free, free + width, device=device), cache)
    # continuation token t is predicted by the prefix's last state (t = 0) or by token t - 1's
    before = torch.cat([last.expand(len(continuations), -1)[:, None], hidden[:, :-1]], dim=1)  # (N, W, C)
    log_probs = F.log_softmax(model.logits(before).float(), dim=-1).gather(-1, ids[..., None]).squeeze(-1)  # (N, W)
    lengths = torch.tensor([len(c) for c in continuations], device=device)
    real = torch.arange(width, device=device)[None] < lengths[:, None]  # (N, W): not padding
    return torch.where(real, log_probs, 0.0).sum(-1)


def refine_caption(model: SemVIE, tokenizer: TextTokenizer, codes: torch.Tensor, instruction: list[int],
                   caption: list[int], rounds: int, top_k: int = 5, floor: float = 0.003) -> list[int]:
    """Up to `rounds` rounds of hill climbing on `caption_scores` over `one_token_edits` of an
    image's caption (text ids, no <eos>); returns the caption it ends on (the given one when no
    edit scores higher). Edits that do not decode to whole text, or whose prompt would not fit the
    context beside the image, are not tried."""
    room = model.config.max_seq_len - codes.numel() - 1  # prompt tokens that fit before <img> codes
    if not 0 < len(caption_as_prompt(tokenizer, caption)) <= room:
        return caption
    best = caption_scores(model, tokenizer, codes, instruction, [caption])[0].item()
    for _ in range(rounds):
        candidates = [edit for edit in one_token_edits(model, tokenizer, codes, instruction, caption, top_k, floor)
                      if 0 < len(caption_as_prompt(tokenizer, edit)) <= room]
        if not candidates:
            break
        scores = caption_scores(model, tokenizer, codes, instruction, candidates)
        top = int(scores.argmax())
        if scores[top].item() <= best:
            break
        best, caption = scores[top].item(), candidates[top]
    return caption
