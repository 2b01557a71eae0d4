import pytest

from mars.config import PRESETS, SemVIEConfig, apply_overrides, load_config, model_config_from
from mars.errors import MarsError


def test_qwen_7b_preset_is_exactly_qwen_7b():
    cfg = SemVIEConfig.from_name("qwen-7b")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (32, 4096, 32, 32, 128)
    assert cfg.intermediate_size == 11008 and cfg.qkv_bias and not cfg.tie_word_embeddings
    assert cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0
    assert (cfg.text_vocab_size, cfg.image_vocab_size, cfg.num_special_tokens) == (151936, 8192, 8)
    assert cfg.vocab_size == 160136
    assert cfg.image_tokens == 256


def test_every_preset_validates():
    for name in PRESETS:
        SemVIEConfig.from_name(name).validate()


def test_overrides_parse_types_and_revalidate():
    cfg = apply_overrides(SemVIEConfig.from_name("debug"), ["num_layers=3", "qkv_bias=false", "rope_theta=5e5"])
    assert cfg.num_layers == 3 and cfg.qkv_bias is False and cfg.rope_theta == 500000.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_layer=3", "did you mean 'num_layers'"),
        ("num_layers=three", "expected an integer"),
        ("num_layers=2.5", "expected an integer"),
        ("qkv_bias=maybe", "expected true/false"),
        ("num_kv_heads=3", "multiple of num_kv_heads"),
        ("head_dim=15", "head_dim must be even"),
        ("image_size=100", "not a multiple"),
        ("max_seq_len=10", "cannot hold an image"),
        ("novalue", "key=value"),
    ],
)
def test_bad_overrides_are_rejected_with_a_clear_message(override, message):
    with pytest.raises(MarsError, match=message):
        apply_overrides(SemVIEConfig.from_name("debug"), [override])


def test_yaml_round_trip_and_errors(tmp_path):
    good = tmp_path / "model.yaml"
    good.write_text("num_layers: 3\nhidden_size: 32\nhead_dim: 8\nimage_vocab_size: 64\n")
    cfg = load_config(SemVIEConfig, good, ["num_heads=2", "num_kv_heads=1"])
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (3, 32, 2, 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_layers: 3\nwings: 2\n")
    with pytest.raises(MarsError, match="unknown key 'wings'"):
        load_config(SemVIEConfig, bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("num_layers: [3\n")
    with pytest.raises(MarsError, match="cannot parse"):
        load_config(SemVIEConfig, broken)
    with pytest.raises(MarsError, match="not found"):
        load_config(SemVIEConfig, tmp_path / "missing.yaml")


def test_model_config_from_preset_mapping():
    cfg = model_config_from({"preset": "debug", "num_layers": 5})
    assert cfg.num_layers == 5 and cfg.hidden_size == PRESETS["debug"].hidden_size
    with pytest.raises(MarsError, match="unknown model preset"):
        model_config_from("qwen-70b")
