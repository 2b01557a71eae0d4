"""The prompt probe: counterfactual prompts change exactly one fact, and its gaps are likelihood differences."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mars.cli import main
from mars.data.captions import parse_canonical, reading_order_prompt
from mars.data.images import pil_to_tensor
from mars.data.sequences import build_t2i, collate_t2i
from mars.data.shapes import INVERSE_RELATION, RELATIONS, render_scene
from mars.eval.prompt_probe import PROBES, probe_prompts, run_prompt_probe
from mars.pipeline import MarsPipeline
from mars.rerank import caption_ids, caption_log_likelihood
from mars.train.losses import t2i_loss


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_each_counterfactual_changes_exactly_its_one_fact(lang):
    for probe in PROBES:
        for scene, own, other in probe_prompts(probe, lang, n=12, seed=3):
            assert own != other
            a = parse_canonical(own)
            if probe == "size":  # "a large A and a small B" is outside the canonical grammar
                small, large = ("small", "large") if lang == "en" else ("小的", "大的")
                assert other == own.replace(small, "\0").replace(large, small).replace("\0", large)
                continue
            b = parse_canonical(other)
            if probe == "layout":
                assert b.category == "two" and b.objects == a.objects and a.relation is not None
            elif probe == "relation":
                assert b.objects == a.objects and b.relation == INVERSE_RELATION[a.relation]
            elif probe == "axis":  # the other axis, the same object first
                (axis_a, sign_a), (axis_b, sign_b) = RELATIONS[a.relation], RELATIONS[b.relation]
                assert b.objects == a.objects and axis_b != axis_a and sign_b == sign_a
            elif probe == "binding":
                (c1, s1), (c2, s2) = a.objects
                assert c1 != c2 and s1 != s2 and b.objects == ((c1, s2), (c2, s1))
            elif probe == "count":
                assert set(b.objects) == set(a.objects) and len(b.objects) != len(a.objects)
            else:  # colour
                assert b.objects[0][1] == a.objects[0][1] and b.objects[0][0] != a.objects[0][0]
            assert Counter(scene.pairs()) == Counter(a.objects)


def test_gaps_are_differences_of_full_forward_likelihoods(tiny_model_dir):
    pipe = MarsPipeline.from_pretrained(tiny_model_dir)
    result = run_prompt_probe(pipe.model, pipe.tokenizer, pipe.vq, n=3, langs=("en",), probes=("relation",),
                              batch_size=2)
    triples = probe_prompts("relation", "en", n=3)
    for (scene, own, other), example in zip(triples, result["examples"]):
        image = pil_to_tensor(render_scene(scene, pipe.model.config.image_size))[None]
        codes = pipe.vq.encode_to_codes(image).reshape(-1)

        def nll(prompt):  # one row, the whole sequence in one forward (no prefix cache)
            batch = collate_t2i([build_t2i(pipe.model.vocab, pipe.tokenizer.encode(prompt), codes)],
                                pipe.tokenizer.eos_id)
            with torch.no_grad():
                return float(t2i_loss(pipe.model, batch, prefix_no_grad=False, vocab="visual")[0])

        def read(prompt):  # the prompt as the image's caption, one row
            return float(caption_log_likelihood(pipe.model, codes[None], *caption_ids(pipe.tokenizer, prompt))[0])

        assert example["counterfactual"] == other
        assert example["gap"] == pytest.approx(nll(other) - nll(own), rel=1e-4, abs=1e-4)
        assert example["read_gap"] == pytest.approx(read(own) - read(other), rel=1e-4, abs=1e-4)
    summary = result["summary"]["relation"]["en"]
    gaps = [e["gap"] for e in result["examples"]]
    read_gaps = [e["read_gap"] for e in result["examples"]]
    assert summary["gap"] == pytest.approx(sum(gaps) / 3, rel=1e-5)
    assert summary["preferred"] == pytest.approx(sum(g > 0 for g in gaps) / 3)
    assert summary["read_gap"] == pytest.approx(sum(read_gaps) / 3, rel=1e-5, abs=1e-6)
    assert summary["read_preferred"] == pytest.approx(sum(g > 0 for g in read_gaps) / 3)


def test_cli_prints_every_probe_and_writes_json(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert main(["eval", "prompt-probe", "--model", str(tiny_model_dir), "--n", "2", "--lang", "zh",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert all(probe in printed for probe in PROBES) and "reads: gap" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert set(saved["summary"]) == set(PROBES) and len(saved["examples"]) == 2 * len(PROBES)


def test_a_reading_order_model_is_probed_on_its_restated_prompts(tiny_model_dir):
    """restate = the pipeline's model_prompt: the relation probe compares the same words in the
    other order ("B left of A" vs "A left of B")."""
    pipe = MarsPipeline.from_pretrained(tiny_model_dir)
    kwargs = dict(n=6, langs=("en", "zh"), probes=("relation",), batch_size=3)
    plain = run_prompt_probe(pipe.model, pipe.tokenizer, pipe.vq, **kwargs)["examples"]
    restated = run_prompt_probe(pipe.model, pipe.tokenizer, pipe.vq, restate=reading_order_prompt, **kwargs)["examples"]
    for before, after in zip(plain, restated):
        own, other = parse_canonical(after["prompt"]), parse_canonical(after["counterfactual"])
        assert own.relation == other.relation in ("left of", "above")
        assert own.objects == other.objects[::-1]
        assert (after["prompt"], after["counterfactual"]) == (reading_order_prompt(before["prompt"]),
                                                              reading_order_prompt(before["counterfactual"]))
