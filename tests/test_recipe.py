"""The built-in model (mars/assets/shapes-demo) and the recipe that trains it (mars recipe shapes-demo)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from mars.cli import main as mars_main
from mars.data.sequences import INSTRUCTION_EN, INSTRUCTION_ZH
from mars.errors import MarsError
from mars.generate import CaptionConfig, SampleConfig
from mars.model_dir import ASSETS
from mars.pipeline import MarsPipeline
from mars.recipes.cli import parse_settings
from mars.recipes.shapes_demo import REPO_CONFIGS, STEPS, Recipe, folder_bytes, ship_model

SHIPPED = ASSETS / "shapes-demo"


# --------------------------------------------------------------------------- the shipped model

def test_shipped_model_is_small_and_complete():
    assert (SHIPPED / "config.json").is_file() and (SHIPPED / "model.safetensors").is_file()
    assert (SHIPPED / "tokenizer" / "tokenizer.json").is_file() and (SHIPPED / "vq" / "config.json").is_file()
    assert folder_bytes(SHIPPED) <= 60 * 2**20


def test_shipped_model_loads_by_name():
    pipe = MarsPipeline.from_pretrained("shapes-demo", device="cpu")
    cfg = pipe.model.config
    assert cfg.name == "shapes-demo" and cfg.image_size == 256 and cfg.image_grid == 16
    assert cfg.image_vocab_size == pipe.vq.config.codebook_size  # the model predicts this VQ's codes
    assert next(pipe.model.parameters()).dtype == torch.float32  # CPU inference in fp32
    # The bilingual BPE covers English and Chinese in few ids, and round-trips both.
    english, chinese = "a red circle to the left of a blue square", "一个红色的圆形在一个蓝色的正方形的左边"
    for text in (english, chinese):
        ids = pipe.tokenizer.encode(text)
        assert max(ids) < cfg.text_vocab_size and len(ids) < len(text.encode("utf-8")) // 2
        assert pipe.tokenizer.decode(ids) == text
    # It was trained on captions in reading order, and reads a position prompt restated that way.
    assert pipe.prompt_order == "reading"
    assert pipe.model_prompt("a red circle to the right of a blue square") == "a blue square to the left of a red circle"


def test_shipped_model_captions_with_default_length():
    # The context must hold an image, the instruction and `caption`'s default 64 new tokens.
    from mars.data.shapes import render_scene, scene_for_index

    pipe = MarsPipeline.from_pretrained("shapes-demo", device="cpu")
    captions = pipe.caption([render_scene(scene_for_index(7, 0))], lang="zh")
    assert len(captions) == 1 and isinstance(captions[0], str)


def test_ship_model_stores_fp16_weights_that_load_in_the_running_dtype(tmp_path, tiny_model_dir):
    from mars.model.weights import load_weights

    shipped = ship_model(tiny_model_dir, tmp_path / "shipped", weights_dtype=torch.float16)
    stored = load_weights(shipped)
    assert {v.dtype for v in stored.values()} == {torch.float16}
    assert folder_bytes(shipped) < folder_bytes(tiny_model_dir)
    source = MarsPipeline.from_pretrained(tiny_model_dir, device="cpu").model
    loaded = MarsPipeline.from_pretrained(shipped, device="cpu").model
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(b, a.half().float()), name


def test_ship_model_with_new_sampling_defaults_keeps_the_models_judge_and_prompt_order(tmp_path, tiny_model_dir):
    from mars.pipeline import load_caption_config, load_generation_config, load_prompt_order, load_rerank_config

    source = Path(shutil.copytree(tiny_model_dir, tmp_path / "source"))
    (source / "generation_config.json").write_text(json.dumps(
        {"cfg_scale": 2.0, "rerank": {"drawing_weight": 0.25}, "prompt_order": "reading"}))
    sampling, caption = SampleConfig(cfg_scale=3.0, top_k=2), CaptionConfig(refine=1)
    shipped = ship_model(source, tmp_path / "shipped", generation=sampling, caption=caption)
    assert (load_generation_config(shipped), load_caption_config(shipped)) == (sampling, caption)
    assert load_rerank_config(shipped).drawing_weight == 0.25 and load_prompt_order(shipped) == "reading"


def test_generate_without_model_writes_a_256px_png(tmp_path):
    out = tmp_path / "demo.png"
    prompt = "a red circle to the left of a blue square"
    assert mars_main(["generate", prompt, "-o", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as image:
        assert image.size == (256, 256) and image.mode == "RGB"


# --------------------------------------------------------------------------- the recipe

def _tiny_configs(folder: Path) -> Path:
    """The repo's recipe configs, shrunk to seconds: 16 px-grid images at 64 px, a 2-layer model."""
    folder.mkdir()
    for name in ("recipe", "vq", "vq-refine", "vq-patch", "vq-decoder", "vq-sharpen", "stage0", "stage1", "stage2"):
        shutil.copy(REPO_CONFIGS / f"{name}.yaml", folder / f"{name}.yaml")

    def edit(name: str, **changes) -> None:
        data = yaml.safe_load((folder / f"{name}.yaml").read_text())
        data.update(changes)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(data))

    edit("recipe", data="shapes:12:3", caption_scenes=40, text_vocab_size=300, resolution=64, shard_size=8)
    for name in ("vq-decoder", "vq-sharpen"):
        edit(name, data="shapes:8:1", resolution=64, crop_size=64, batch_size=2, steps=2, ckpt_every=1,
             image_every=0)
    tiny = dict(preset="shapes-demo", num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=16,
                intermediate_size=64, text_vocab_size=300, max_seq_len=96)  # image_size: recipe.resolution
    edit("stage0", model=tiny, max_steps=3, batch_size=4, micro_batch_size=4, warmup_steps=1, save_every=2)
    for stage in ("stage1", "stage2"):
        edit(stage, max_steps=3, batch_size=4, micro_batch_size=2, warmup_steps=1, save_every=2,
             data={"shards": "unused", "max_text_len": 24})
    return folder


def _tiny_vq(folder: Path) -> Path:
    from mars.vq.config import VQConfig
    from mars.vq.model import VQModel

    torch.manual_seed(0)
    cfg = VQConfig.load(dict(preset="shapes-small", ch=16, ch_mult=[1, 1, 1, 1, 1], z_channels=16,
                             norm_groups=8, codebook_size=64))
    VQModel(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_recipe_runs_every_step_then_skips_and_resumes(tmp_path, monkeypatch):
    configs = _tiny_configs(tmp_path / "configs")
    vq = _tiny_vq(tmp_path / "vq")
    out, ship = tmp_path / "run", tmp_path / "shipped"
    order = []  # training stages and waits for the decoder process, in turn
    train, wait = Recipe.train, Recipe._wait_for_decoder
    monkeypatch.setattr(Recipe, "train", lambda self, stage: (order.append(stage), train(self, stage))[1])
    monkeypatch.setattr(Recipe, "_wait_for_decoder", lambda self: (order.append("wait"), wait(self))[1])

    status = Recipe(out, vq=vq, ship_to=ship, config_dir=configs, progress=False,
                    overrides=parse_settings(["recipe.threads=1", "recipe.threads_alone=2"])).run()
    # The decoder step ran in a second process beside preprocess and stage 0; stage I, which then
    # has both cores, waited for it.
    assert order == ["stage0", "wait", "stage1", "stage2"]
    assert status == {step: "ran" for step in STEPS} | {"vq": "skipped", "vq_decoder": "ran in parallel"}
    assert "tokenizer" in (out / "vq-decoder.log").read_text()
    times = json.loads((out / "recipe_times.json").read_text())
    assert set(times) == set(status) - {"vq"} and all(t["runs"] == 1 for t in times.values())
    # Stage 0 sized the image rows from the VQ and the image from recipe.resolution; the shipped
    # folder is a loadable model.
    stage0 = json.loads((out / "stage0/final/config.json").read_text())
    assert stage0["image_vocab_size"] == 64 and stage0["image_size"] == 64  # recipe.resolution, not the preset's 256
    pipe = MarsPipeline.from_pretrained(ship, device="cpu")
    assert pipe.generation_config == SampleConfig(cfg_scale=2.0, top_k=10)  # recipe.yaml's `generation`
    assert pipe.caption_config == CaptionConfig(cfg_scale=1.5, plausibility=0.1, refine=3)  # ... and `caption`
    # The shipped VQ is the fine-tuned decoder: other weights, but exactly the codes the model learnt.
    from mars.data.images import pil_to_tensor
    from mars.data.shapes import render_scene, scene_for_index
    from mars.vq.io import load_tokenizer

    original = load_tokenizer(vq)
    assert pipe.vq.identity_hash() != original.identity_hash()
    images = torch.stack([pil_to_tensor(render_scene(scene_for_index(5, i), 64)) for i in range(3)])
    assert torch.equal(pipe.vq.encode_to_codes(images), original.encode_to_codes(images))
    # ... the last decoder stage's, which started from the one before it
    sharpened = load_tokenizer(out / "vq-sharpen" / "final")
    assert pipe.vq.identity_hash() == sharpened.identity_hash()
    sharpen_config = yaml.safe_load((out / "vq-sharpen" / "train_config.yaml").read_text())
    assert sharpen_config["init_from"] == str(out / "vq-decoder" / "final")

    # Everything done: a second run does nothing (shipping aside).
    status = Recipe(out, vq=vq, config_dir=configs, progress=False).run()
    assert set(status.values()) == {"skipped"}

    # A run killed after stage II's last checkpoint but before final/: only stage II runs again,
    # from that checkpoint (no step is redone: metrics.jsonl keeps one line per step).
    shutil.rmtree(out / "stage2" / "final")
    status = Recipe(out, vq=vq, config_dir=configs, progress=False).run()
    assert status["stage2"] == "ran" and [s for s, v in status.items() if v == "ran"] == ["stage2"]
    assert "resumed from" in (out / "stage2" / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (out / "stage2/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert json.loads((out / "recipe_times.json").read_text())["stage2"]["runs"] == 2


def test_recipe_until_stops_and_settings_override(tmp_path):
    configs = _tiny_configs(tmp_path / "configs")
    recipe = Recipe(tmp_path / "run", vq=_tiny_vq(tmp_path / "vq"), config_dir=configs, progress=False,
                    overrides=parse_settings(["recipe.caption_scenes=5", "stage1.max_steps=7"]))
    assert recipe.run(until="text_tokenizer") == {"captions": "ran", "vq": "skipped", "text_tokenizer": "ran"}
    assert not (tmp_path / "run" / "vq-decoder").exists()  # --until before it: no decoder process
    assert len(recipe.captions.read_text(encoding="utf-8").splitlines()) == 10  # 5 scenes x (en, zh)
    assert len(recipe.caption_pairs.read_text(encoding="utf-8").splitlines()) == 5  # 5 scenes, one pair each
    assert not (tmp_path / "run" / "codes").exists()
    assert recipe.stage_config("stage1").max_steps == 7
    assert recipe.stage_config("stage0").data.text == str(recipe.caption_pairs)  # recipe.yaml: pairs
    captions = Recipe(tmp_path / "run", vq=tmp_path / "vq", config_dir=configs, progress=False,
                      overrides=parse_settings(["recipe.stage0_text=captions"]))
    assert captions.stage_config("stage0").data.text == str(recipe.captions)
    with pytest.raises(MarsError, match="stage0_text"):
        Recipe(tmp_path / "run", vq=tmp_path / "vq", config_dir=configs, overrides=parse_settings(["recipe.stage0_text=x"]))


def test_recipe_steps_use_every_core_once_no_decoder_process_runs_beside(tmp_path):
    recipe = Recipe(tmp_path / "run", vq=_tiny_vq(tmp_path / "vq"), config_dir=_tiny_configs(tmp_path / "configs"),
                    progress=False, overrides=parse_settings(["recipe.threads=1", "recipe.threads_alone=0"]))
    assert recipe._step_threads(default=2) == 2  # no decoder process: torch's default
    recipe._decoder_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert recipe._step_threads(default=2) == 1  # one core each while it runs
    finally:
        recipe._decoder_process.kill()
        recipe._decoder_process.wait()
    assert recipe._step_threads(default=2) == 2  # finished


def test_recipe_trains_the_vq_stages_in_turn(tmp_path):
    configs = _tiny_configs(tmp_path / "configs")
    small = ["data=shapes:8:1", "resolution=64", "crop_size=32", "batch_size=2", "steps=2", "ckpt_every=1",
             "image_every=0", "warmup_steps=1", "model.codebook_size=64"]
    recipe = Recipe(tmp_path / "run", config_dir=configs, progress=False,
                    overrides={"vq": [*small, "entropy_until=0"], "vq-refine": small, "vq-patch": small})
    assert recipe.run(only="vq") == {"vq": "ran"}
    assert recipe.vq_dir == tmp_path / "run" / "vq-patch" / "final" and (recipe.vq_dir / "config.json").is_file()
    for stage, previous in (("vq-refine", "vq"), ("vq-patch", "vq-refine")):  # each from the one before
        config = yaml.safe_load((tmp_path / "run" / stage / "train_config.yaml").read_text())
        assert config["init_from"] == str(tmp_path / "run" / previous / "final")
    assert json.loads((recipe.vq_dir / "config.json").read_text())["patch_local"]  # the codes the LM learns
    assert not recipe.captions.exists()  # --only: nothing else ran


@pytest.mark.parametrize("config_dir", [REPO_CONFIGS, REPO_CONFIGS.parent / "shapes-gpu"], ids=["cpu", "gpu"])
def test_recipe_presets_parse_and_fit_together(tmp_path, config_dir):
    """Every YAML of a recipe preset parses with the paths the recipe sets, and the pieces agree:
    an f16 tokenizer, a decoder stage that cannot change codes, a model whose image rows match the
    tokenizer's codebook and whose context holds the longest training sequence."""
    from mars.train.trainer import resolve_model_config
    from mars.vq.train import load_train_config as load_vq_config

    recipe = Recipe(tmp_path, vq=SHIPPED / "vq", config_dir=config_dir, progress=False,
                    overrides={"recipe": ["generation.top_k=7"]})
    assert isinstance(recipe.config.generation, SampleConfig) and recipe.config.generation.top_k == 7
    previous, previous_model = None, None
    for name in recipe.config.vq_stages:
        vq = load_vq_config(recipe._config_file(name), [f"out_dir={tmp_path / name}"]
                            + ([f"init_from={previous}"] if previous else []))
        assert vq.trainable == "all" and vq.model.downsample == 16, name
        if previous_model is not None:  # init_from loads the previous stage: only patch_local may differ
            assert dataclasses.replace(vq.model, patch_local=previous_model.patch_local) == previous_model, name
        previous, previous_model = tmp_path / name / "final", vq.model
    assert previous_model.patch_local  # the LM learns patch codes
    for name in recipe.config.vq_decoder_stages:
        decoder = load_vq_config(recipe._config_file(name), [f"model={SHIPPED / 'vq'}"])
        assert decoder.trainable == "decoder" and decoder.restart_dead_codes_every == 0, name
    stage0 = recipe.stage_config("stage0")
    model = resolve_model_config(stage0)
    assert model.image_vocab_size == json.loads((SHIPPED / "vq" / "config.json").read_text())["codebook_size"]
    assert model.image_size == recipe.config.resolution  # the pictures preprocess encodes
    tokenizer = MarsPipeline.from_pretrained("shapes-demo").tokenizer
    for stage in ("stage1", "stage2"):
        cfg = recipe.stage_config(stage)
        assert cfg.stage == stage and str(cfg.init_from) == str(recipe.final("stage0" if stage == "stage1" else "stage1"))
        # <img> codes </img> instruction caption <eos>, with the shipped BPE (the recipes train one like it)
        instruction = max(len(tokenizer.encode(text)) for text in (INSTRUCTION_EN, INSTRUCTION_ZH))
        longest_i2t = model.image_tokens + 2 + instruction + cfg.data.max_text_len + 1
        assert longest_i2t <= model.max_seq_len


def test_gpu_configs_train_the_shipped_architecture():
    """configs/shapes-demo/gpu/ (the stages the built-in model was trained with on one GPU) parse,
    chain stage 0 -> I -> II -> the swap fine-tune, and build the architecture of the model that ships."""
    from mars.model.semvie import load_model_config
    from mars.train.config import load_train_config
    from mars.train.trainer import resolve_model_config

    folder = REPO_CONFIGS / "gpu"
    names = ("stage0", "stage1", "stage2", "swaps")
    stages = {name: load_train_config(folder / f"{name}.yaml", []) for name in names}
    assert [cfg.stage for cfg in stages.values()] == ["stage0", "stage1", "stage2", "stage1"]
    for name, previous in (("stage1", "stage0"), ("stage2", "stage1"), ("swaps", "stage2")):
        assert str(stages[name].init_from) == str(Path(stages[previous].out_dir) / "final"), name
    assert str(stages["stage1"].vq) == str(stages["swaps"].vq) == "mars/assets/shapes-demo/vq"
    assert stages["swaps"].t2i_contrast_swaps and stages["swaps"].t2i_contrast_steps < stages["swaps"].max_steps
    built = dataclasses.asdict(resolve_model_config(stages["stage0"]))
    shipped = dataclasses.asdict(load_model_config(SHIPPED))
    assert built == shipped


def test_the_preference_stage_of_the_built_in_model_parses():
    """configs/shapes-demo/dpo.yaml (the built-in model's first preference stage) is a DPO stage on pairs,
    from the GPU preset's averaged model, with the shipped model's T2I vocabulary setting."""
    from mars.train.config import load_train_config

    gpu = load_train_config(REPO_CONFIGS / "gpu" / "swaps.yaml", [])
    cfg = load_train_config(REPO_CONFIGS / "dpo.yaml", [])
    assert cfg.tasks == {"dpo": 1.0} and cfg.data.preferences and cfg.dpo_chosen_nll_weight > 0
    assert str(cfg.init_from) == str(Path(gpu.out_dir).parent / "average") and cfg.dpo_reference is None
    assert cfg.t2i_loss_vocab == gpu.t2i_loss_vocab == "visual"


def test_the_checker_judged_preference_stage_follows_the_self_judged_one():
    """configs/shapes-demo/dpo-checker.yaml continues from dpo.yaml's final model, with its own pairs."""
    from mars.train.config import load_train_config

    first = load_train_config(REPO_CONFIGS / "dpo.yaml", [])
    cfg = load_train_config(REPO_CONFIGS / "dpo-checker.yaml", [])
    assert set(cfg.tasks) == {"dpo", "t2i"} and cfg.data.shards and cfg.dpo_min_score_gap == 1.0
    assert cfg.dpo_reference is None
    assert str(cfg.init_from) == str(Path(first.out_dir) / "final") and cfg.data.preferences != first.data.preferences
    assert cfg.t2i_loss_vocab == first.t2i_loss_vocab and cfg.out_dir != first.out_dir


def test_recipe_rejects_bad_arguments(tmp_path):
    with pytest.raises(MarsError, match="not of the form"):
        parse_settings(["max_steps=3"])
    with pytest.raises(MarsError, match="unknown recipe config"):
        Recipe(tmp_path, overrides={"stage9": ["max_steps=1"]})
    with pytest.raises(MarsError, match="not a VQ-GAN folder"):
        Recipe(tmp_path, vq=tmp_path)


def test_the_reading_order_stages_follow_each_other_from_the_stop_35_model():
    """configs/shapes-demo/reading-order*.yaml: the first starts from the stop-35 built-in model on
    reading-order codes, the second from the first's final model, both with the shipped T2I vocabulary
    setting."""
    from mars.train.config import load_train_config

    first = load_train_config(REPO_CONFIGS / "reading-order.yaml", [])
    second = load_train_config(REPO_CONFIGS / "reading-order-position.yaml", [])
    assert str(first.init_from) == "runs/stop35/shapes-demo"
    assert str(second.init_from) == str(Path(first.out_dir) / "final") and second.out_dir != first.out_dir
    assert first.data.shards != second.data.shards
    assert first.t2i_loss_vocab == second.t2i_loss_vocab == "visual" and first.tasks == second.tasks
