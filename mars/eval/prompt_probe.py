"""Which parts of a prompt does a model read? Likelihood probes on MARS-Shapes, without sampling.

For n held-out scenes per probe, the image's codes are scored after the scene's canonical prompt
and after a counterfactual prompt that changes one fact:

    colour    single objects: the colour replaced      "a red circle" -> "a blue circle"
    count     counting: the number replaced            "three red stars" -> "four red stars"
    relation  position: the relation reversed          "A to the left of B" -> "A to the right of B"
    axis      position: the relation turned to the     "A to the left of B" -> "A above B"
              other axis (A still first)
    layout    position: the relation dropped           "A to the left of B" -> "A and B"
    size      size: the size words exchanged           "a small A and a large B" -> "a large A and a small B"
    binding   two (colours and shapes both differ):    "a red circle and a blue square" ->
              the shapes exchanged                     "a red square and a blue circle"

Both directions of the model are probed on the same scenes:

- draws (text to image): gap = NLL(image | counterfactual) - NLL(image | own prompt), in nats per
  image: how much of the image the model explains by that fact. 0 means the model ignores it, and
  its samples will too; a model that reads it pays many nats for the wrong prompt.
- reads (image to text): read_gap = log p(own prompt | image) - log p(counterfactual | image), each
  prompt read as the image's caption (the caption instruction of its language, `mars.rerank`), in
  nats per caption: whether the model, looking at the image, can tell the fact. A reader that
  cannot tell a relation cannot pick the right one among candidate images either (`--rerank`).

A model whose training captions state relations in reading order (`prompt_order` "reading") reads
both prompts restated that way (`restate`, the pipeline's `model_prompt`): its relation probe then
compares "A left of B" with "B left of A", the same words in the other order.

`preferred` / `read_preferred` is the fraction of scenes whose own prompt is the likelier one (0.5
= chance). The images are exact renders encoded with the model's own VQ, so the probe measures how
the model reads a prompt or an image, not how well it draws, and costs four forwards per scene.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mars.data.captions import COUNT_WORDS_EN, COUNT_WORDS_ZH, RELATION_EN, RELATION_ZH, canonical_caption
from mars.data.images import pil_to_tensor
from mars.data.negatives import swap_words
from mars.data.sequences import build_t2i, collate_t2i
from mars.data.shapes import COLOURS, COLOURS_ZH, SHAPES, SHAPES_ZH, Scene, render_scene, scene_for_index
from mars.errors import MarsError
from mars.rerank import caption_ids, caption_log_likelihoods
from mars.train.losses import t2i_image_nll

# probe -> (scene category, {lang: word groups of the one fact it changes})
PROBES: dict[str, tuple[str, dict[str, list[list[str]]]]] = {
    "colour": ("single", {"en": [list(COLOURS)], "zh": [list(COLOURS_ZH.values())]}),
    "count": ("counting", {"en": [[COUNT_WORDS_EN[n] for n in (2, 3, 4)]],
                           "zh": [[COUNT_WORDS_ZH[n] + "个" for n in (2, 3, 4)]]}),
    "relation": ("position", {
        "en": [[RELATION_EN["left of"], RELATION_EN["right of"]], [RELATION_EN["above"], RELATION_EN["below"]]],
        "zh": [[RELATION_ZH["left of"], RELATION_ZH["right of"]], [RELATION_ZH["above"], RELATION_ZH["below"]]]}),
    "axis": ("position", {
        "en": [[RELATION_EN["left of"], RELATION_EN["above"]], [RELATION_EN["right of"], RELATION_EN["below"]]],
        "zh": [[RELATION_ZH["left of"], RELATION_ZH["above"]], [RELATION_ZH["right of"], RELATION_ZH["below"]]]}),
    "layout": ("position", {}),  # not a swap: the `two` caption of the same objects
    "size": ("size", {"en": [["small", "large"]], "zh": [["小的", "大的"]]}),
    "binding": ("two", {"en": [list(SHAPES)], "zh": [list(SHAPES_ZH.values())]}),
}


def _usable(scene: Scene, probe: str) -> bool:
    """Binding needs two objects that differ in both colour and shape (else the swap says the same)."""
    if probe != "binding":
        return True
    (c1, s1), (c2, s2) = scene.pairs()
    return c1 != c2 and s1 != s2


def probe_prompts(probe: str, lang: str, n: int, seed: int = 0) -> list[tuple[Scene, str, str]]:
    """n (scene, own prompt, counterfactual prompt) triples of evaluation-split scenes."""
    if probe not in PROBES:
        raise MarsError(f"unknown probe {probe!r}; choose from {', '.join(PROBES)}")
    category, groups = PROBES[probe]
    rng = np.random.default_rng([seed, list(PROBES).index(probe)])
    triples, index = [], 0
    while len(triples) < n:
        scene = scene_for_index(seed, index, "eval", category)
        index += 1
        if _usable(scene, probe):
            own = canonical_caption(scene, lang)
            if probe == "layout":  # training scenes with a relation put the pair on one axis; `two` anywhere
                other = canonical_caption(Scene(scene.objects, "two", None), lang)
            else:
                other = swap_words(own, groups[lang], rng)
            triples.append((scene, own, other))
    return triples


@torch.inference_mode()
def _image_nll(model, text_tokenizer, prompts: list[str], codes: torch.Tensor) -> torch.Tensor:
    batch = collate_t2i([build_t2i(model.vocab, text_tokenizer.encode(p), c) for p, c in zip(prompts, codes)],
                        text_tokenizer.eos_id)
    return t2i_image_nll(model, batch.to(codes.device), vocab="visual").cpu()


def _caption_log_likelihood(model, text_tokenizer, prompts: list[str], codes: torch.Tensor) -> torch.Tensor:
    """log p(prompt read as a caption | image) per row; codes (b, h*w)."""
    return caption_log_likelihoods(model, codes, [caption_ids(text_tokenizer, p) for p in prompts]).cpu()


@torch.inference_mode()
def run_prompt_probe(model, text_tokenizer, vq, n: int = 48, langs: tuple[str, ...] = ("en", "zh"),
                     probes: tuple[str, ...] = tuple(PROBES), seed: int = 0, batch_size: int = 16,
                     restate: Callable[[str], str] = lambda prompt: prompt) -> dict:
    """{"summary": {probe: {lang: {"gap", "median_gap", "preferred", "read_gap", "read_preferred", "n"}}},
    "examples": [{"probe", "lang", "prompt", "counterfactual", "gap", "read_gap"}, ...]}; both prompts
    of a scene are read as `restate` gives them."""
    if n < 1 or batch_size < 1:
        raise MarsError(f"need n >= 1 and batch_size >= 1, got {n} and {batch_size}")
    device = next(model.parameters()).device
    size = model.config.image_size
    summary, examples = {}, []
    for probe in probes:
        summary[probe] = {}
        for lang in langs:
            triples = [(scene, restate(own), restate(other)) for scene, own, other in probe_prompts(probe, lang, n, seed)]
            gaps, read_gaps = [], []
            for start in range(0, n, batch_size):
                chunk = triples[start:start + batch_size]
                images = torch.stack([pil_to_tensor(render_scene(s, size)) for s, _, _ in chunk]).to(device)
                codes = vq.encode_to_codes(images).reshape(len(chunk), -1)  # (b, h*w)
                own = _image_nll(model, text_tokenizer, [t[1] for t in chunk], codes)
                other = _image_nll(model, text_tokenizer, [t[2] for t in chunk], codes)
                gaps.append(other - own)
                read_gaps.append(_caption_log_likelihood(model, text_tokenizer, [t[1] for t in chunk], codes)
                                 - _caption_log_likelihood(model, text_tokenizer, [t[2] for t in chunk], codes))
            gap, read_gap = torch.cat(gaps), torch.cat(read_gaps)
            summary[probe][lang] = {"gap": float(gap.mean()), "median_gap": float(gap.median()),
                                    "preferred": float((gap > 0).float().mean()),
                                    "read_gap": float(read_gap.mean()),
                                    "read_preferred": float((read_gap > 0).float().mean()), "n": n}
            examples += [{"probe": probe, "lang": lang, "prompt": t[1], "counterfactual": t[2], "gap": float(g),
                          "read_gap": float(r)} for t, g, r in zip(triples, gap, read_gap)]
    return {"summary": summary, "examples": examples}
