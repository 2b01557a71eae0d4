"""Backbone conversion without transformers: real config.json files -> SemVIEConfig, key round trips
(SemVIE -> HF layout -> `mars init` -> SemVIE), dtypes, folder handling, and one-line errors for
broken checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mars.cli import main
from mars.config import PRESETS, SemVIEConfig
from mars.errors import MarsError
from mars.model import SemVIE
from mars.model.convert import semvie_config_from_hf, semvie_to_hf

# config.json of Qwen/Qwen-7B (v1.0) and Qwen/Qwen2.5-7B as published, and the rope_scaling of Llama 3.1.
QWEN_7B = {
    "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0, "bf16": False, "emb_dropout_prob": 0.0,
    "fp16": False, "fp32": False, "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 22016,
    "kv_channels": 128, "layer_norm_epsilon": 1e-06, "max_position_embeddings": 32768, "model_type": "qwen",
    "no_bias": True, "num_attention_heads": 32, "num_hidden_layers": 32, "onnx_safe": None,
    "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": True, "seq_length": 2048,
    "tokenizer_class": "QWenTokenizer", "use_cache": True, "use_dynamic_ntk": True, "use_flash_attn": "auto",
    "use_logn_attn": True, "vocab_size": 151936,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 131072, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def test_qwen_7b_config_gives_the_qwen_7b_preset():
    config = semvie_config_from_hf(QWEN_7B)  # intermediate_size 22016 = 2 x 11008, untied when absent
    assert dataclasses.replace(config, name="qwen-7b") == PRESETS["qwen-7b"]


def test_qwen25_config_with_classic_rope_fields():
    config = semvie_config_from_hf(QWEN25_7B, image_vocab_size=16384)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (28, 4, 128)
    assert config.rope_theta == 1e6 and config.qkv_bias and config.text_tokenizer == "hf"
    assert config.vocab_size == 152064 + 16384 + 8 and config.max_seq_len == 131072


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported backbone architecture 'gpt2'"),
    ({"rope_scaling": LLAMA3_SCALING}, "RoPE scaling 'llama3'"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"num_hidden_layers": None}, "lacks 'num_hidden_layers'"),
])
def test_unsupported_qwen2_configs_are_refused(change, message):
    with pytest.raises(MarsError, match=message):
        semvie_config_from_hf({**QWEN25_7B, **change})


@pytest.mark.parametrize("change, kwargs, message", [
    ({"rotary_pct": 0.5}, {}, "rotary_pct=0.5"),
    ({"no_bias": False}, {}, "no_bias=false"),
    ({"intermediate_size": 22017}, {}, "must be even"),
    ({"kv_channels": 64}, {}, "differs from hidden_size"),
    ({}, {"max_seq_len": 4096}, "exceeds Qwen's seq_length 2048"),
])
def test_unsupported_qwen_v1_configs_are_refused(change, kwargs, message):
    with pytest.raises(MarsError, match=message):
        semvie_config_from_hf({**QWEN_7B, **change}, **kwargs)


# --- tiny checkpoints written from a random SemVIE ----------------------------------------------


def _tokenizer_files(folder: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(30)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _source(arch: str, tied: bool) -> SemVIE:
    """A random SemVIE whose text side plays the pretrained backbone."""
    torch.manual_seed(0)
    config = SemVIEConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8,
                          intermediate_size=48, qkv_bias=arch == "qwen2", tie_word_embeddings=tied,
                          text_vocab_size=40, image_vocab_size=16, image_size=64, max_seq_len=512,
                          rms_norm_eps=1e-5, rope_theta=5e5, text_tokenizer="hf")
    model = SemVIE(config)
    with torch.no_grad():
        for p in model.parameter_groups()["norms"].values():
            p.uniform_(0.5, 1.5)
    return model


def _hf_config(arch: str, config: SemVIEConfig) -> dict:
    return {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"], "model_type": arch,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": None, "tie_word_embeddings": config.tie_word_embeddings,
        "vocab_size": config.text_vocab_size, "max_position_embeddings": config.max_seq_len, "hidden_act": "silu",
    }


def _write(folder: Path, state: dict[str, torch.Tensor], hf_config: dict, fmt: str = "safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config))
    _tokenizer_files(folder)
    return folder


def _init(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["init", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.parametrize("arch, tied", [("qwen2", False), ("llama", True)])
def test_round_trip_and_visual_initialisation(arch, tied, tmp_path, capsys):
    source = _source(arch, tied)
    hf_state = semvie_to_hf(source, arch)
    _write(tmp_path / "hf", hf_state, _hf_config(arch, source.config))
    rc, out, err = _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "mars"),
                         "--image-vocab-size", "16", "--image-size", "64")
    assert rc == 0, err
    model = SemVIE.from_pretrained(tmp_path / "mars")
    assert dataclasses.replace(model.config, name="x") == dataclasses.replace(source.config, name="x")

    got, want = model.parameter_groups(), source.parameter_groups()
    for group in ("text_expert", "text_vocab", "norms"):
        assert all(torch.equal(p, want[group][name]) for name, p in got[group].items()), group
    for block in model.layers:  # visual expert = copy of the language expert
        text = block.text.state_dict()
        assert all(torch.equal(v, text[k]) for k, v in block.visual.state_dict().items())
    for table in model.output_tables():  # new rows = mean of the text rows
        assert torch.allclose(table.new_weight, table.text_weight.mean(0).expand_as(table.new_weight))
    back = semvie_to_hf(model, arch)
    assert back.keys() == hf_state.keys() and all(torch.equal(back[k], hf_state[k]) for k in back)

    counts = {g: sum(p.numel() for p in ps.values()) for g, ps in got.items()}
    assert f"{counts['visual_expert'] + counts['new_vocab']:,} trainable" in out
    assert f"{sum(counts.values()):,} total" in out


def test_dtype_is_kept_unless_asked(tmp_path, capsys):
    source = _source("qwen2", False)
    hf_state = {k: v.to(torch.bfloat16) for k, v in semvie_to_hf(source, "qwen2").items()}
    _write(tmp_path / "hf", hf_state, _hf_config("qwen2", source.config))
    assert _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "a"))[0] == 0
    assert {t.dtype for t in load_file(str(tmp_path / "a" / "model.safetensors")).values()} == {torch.bfloat16}
    assert _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "b"), "--dtype", "fp32")[0] == 0
    assert {t.dtype for t in load_file(str(tmp_path / "b" / "model.safetensors")).values()} == {torch.float32}


def test_bin_with_tied_head_copy_and_rotary_buffers(tmp_path, capsys):
    """Exporters that saved the tied head and the rotary tables: both are dropped by name."""
    source = _source("qwen2", True)
    hf_state = semvie_to_hf(source, "qwen2")
    hf_state["lm_head.weight"] = hf_state["model.embed_tokens.weight"].clone()
    hf_state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    _write(tmp_path / "hf", hf_state, _hf_config("qwen2", source.config), fmt="bin")
    rc, _, err = _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "mars"))
    assert rc == 0, err
    assert torch.equal(SemVIE.from_pretrained(tmp_path / "mars").embed.text_weight, source.embed.text_weight)


def _break_truncated(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_state(edit):
    def apply(folder: Path) -> None:
        state = load_file(str(folder / "model.safetensors"))
        edit(state)
        save_file(state, str(folder / "model.safetensors"))
    return apply


def _edit_config(edit):
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


def _drop_layer_1(state):
    for key in [k for k in state if k.startswith("model.layers.1.")]:
        del state[key]


BROKEN = {
    "truncated": ("qwen2", _break_truncated, "cannot read weights file"),
    "missing-layer": ("qwen2", _edit_state(_drop_layer_1), "missing tensor model.layers.1.input_layernorm.weight (layer 1 of 2)"),
    "mis-shaped": ("qwen2", _edit_state(lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(40, 32)})),
                   "tensor model.layers.0.mlp.up_proj.weight has shape (40, 32), expected (48, 32)"),
    "unexpected": ("qwen2", _edit_state(lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)})),
                   "unexpected tensor model.layers.0.self_attn.q_norm.weight"),
    "extra-layer": ("qwen2", _edit_config(lambda c: c.update(num_hidden_layers=1)), "unexpected tensor model.layers.1."),
    "unknown-arch": ("qwen2", _edit_config(lambda c: c.update(model_type="mistral", architectures=["MistralForCausalLM"])),
                     "unsupported backbone architecture 'mistral'"),
    "llama3-rope": ("llama", _edit_config(lambda c: c.update(rope_scaling=LLAMA3_SCALING)), "RoPE scaling 'llama3'"),
    "bias-flag-without-biases": ("llama", _edit_config(lambda c: c.update(attention_bias=True)),
                                 "missing tensor model.layers.0.self_attn.q_proj.bias"),
    "tied-head-differs": ("qwen2", _edit_state(lambda s: s.update({"lm_head.weight": torch.zeros(40, 32)})),
                          "lm_head.weight differs from model.embed_tokens.weight"),
    "no-tokenizer": ("qwen2", lambda f: (f / "tokenizer.json").unlink(), "has no tokenizer.json"),
    "no-config": ("qwen2", lambda f: (f / "config.json").unlink(), "has no config.json"),
    "bad-index": ("qwen2", lambda f: (f / "model.safetensors.index.json").write_text("{}"), "not a valid weight index"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoints_fail_with_one_line(case, tmp_path, capsys):
    arch, breaker, message = BROKEN[case]
    source = _source(arch, tied=case == "tied-head-differs")
    _write(tmp_path / "hf", semvie_to_hf(source, arch), _hf_config(arch, source.config))
    breaker(tmp_path / "hf")
    rc, _, err = _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "mars"))
    assert rc == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not (tmp_path / "mars" / "config.json").exists()


def test_nonzero_llama_o_proj_bias_is_refused(tmp_path, capsys):
    source = _source("qwen2", tied=False)  # q/k/v biases, as Llama with attention_bias has them
    state = {**semvie_to_hf(source, "llama"), "model.layers.1.self_attn.o_proj.bias": torch.zeros(32),
             "model.layers.0.self_attn.o_proj.bias": torch.full((32,), 0.5)}
    _write(tmp_path / "hf", state, {**_hf_config("llama", source.config), "attention_bias": True})
    rc, _, err = _init(capsys, "--backbone", str(tmp_path / "hf"), "--out", str(tmp_path / "mars"))
    assert rc == 2 and "model.layers.0.self_attn.o_proj.bias is not zero" in err


def test_out_folder_rules(tmp_path, capsys):
    source = _source("qwen2", False)
    hf = _write(tmp_path / "hf", semvie_to_hf(source, "qwen2"), _hf_config("qwen2", source.config))
    out = tmp_path / "mars"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    rc, _, err = _init(capsys, "--backbone", str(hf), "--out", str(out))
    assert rc == 2 and "is not empty; pass --overwrite" in err
    rc, _, err = _init(capsys, "--backbone", str(hf), "--out", str(hf), "--overwrite")
    assert rc == 2 and "must differ" in err

    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale shard of an older model")
    assert _init(capsys, "--backbone", str(hf), "--out", str(out), "--overwrite")[0] == 0
    assert not (out / "model-00001-of-00002.safetensors").exists()  # would confuse the loader
    assert (out / "notes.txt").read_text() == "keep me"  # not ours: left alone
    SemVIE.from_pretrained(out)
