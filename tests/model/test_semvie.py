"""Invariants of the SemVIE transformer (independent of any checkpoint format)."""

import pytest
import torch

from mars.config import SemVIEConfig
from mars.errors import MarsError
from mars.model import semvie
from mars.model.semvie import KVCache, Linear, SemVIE, load_model_config, matmul_t


def debug_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return SemVIE(SemVIEConfig.from_name("debug", **overrides)).eval()


def perturb_visual_side(model, seed=1):
    """Make the visual side differ from the copy init, so routing mistakes show up."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".visual." in name or name.endswith("new_weight"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def mixed_ids(model, batch=2, text=5, image=7, seed=0):
    """(B, T) ids: text prompt, <img>, image codes."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.vocab
    prompt = torch.randint(0, vocab.text_size, (batch, text), generator=gen)
    codes = vocab.codes_to_ids(torch.randint(0, vocab.image_size, (batch, image), generator=gen))
    boi = torch.full((batch, 1), vocab.boi_id)
    return torch.cat([prompt, boi, codes], dim=1)


def test_cached_decoding_equals_uncached_step_by_step():
    model = perturb_visual_side(debug_model())
    ids = mixed_ids(model, batch=2, text=6, image=1)
    vocab = model.vocab
    cache = KVCache(model.config, batch_size=2, max_len=40)
    with torch.no_grad():
        hidden = model.forward_hidden(ids, model.image_mask(ids), torch.arange(ids.shape[1]), cache)
        for _ in range(12):
            pos = ids.shape[1]
            step_logits = model.logits(hidden[:, -1:], rows=vocab.image_ids)  # (B, 1, K)
            full_logits = model.logits(model.forward_hidden(ids, model.image_mask(ids))[:, -1:], rows=vocab.image_ids)
            assert torch.allclose(step_logits, full_logits, atol=1e-5)
            nxt = vocab.codes_to_ids(step_logits.argmax(-1))  # greedy, (B, 1)
            assert torch.equal(nxt, vocab.codes_to_ids(full_logits.argmax(-1)))
            ids = torch.cat([ids, nxt], dim=1)
            # every new token is visual: the decode step runs the visual expert alone
            hidden = model.forward_hidden(nxt, True, torch.tensor([pos]), cache)


def test_decode_fast_path_equals_routed_path():
    model = perturb_visual_side(debug_model())
    ids = mixed_ids(model)
    codes = ids[:, -4:]
    with torch.no_grad():
        a = model(codes, True)
        b = model(codes, model.image_mask(codes))
    assert torch.equal(a, b)


def test_left_padded_batch_equals_one_by_one():
    model = perturb_visual_side(debug_model())
    long = mixed_ids(model, batch=1, text=9, image=3, seed=1)[0]
    short = mixed_ids(model, batch=1, text=4, image=3, seed=2)[0]
    pad = long.numel() - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    pad_lengths = torch.tensor([0, pad])
    with torch.no_grad():
        together = model(batch, model.image_mask(batch), pad_lengths=pad_lengths)
        alone_long = model(long[None], model.image_mask(long[None]))
        alone_short = model(short[None], model.image_mask(short[None]))
        # the same through a cache, prefill + decode
        cache = KVCache(model.config, 2, batch.shape[1] + 1, pad_lengths=pad_lengths)
        cached = model(batch, model.image_mask(batch), torch.arange(batch.shape[1]), cache)
    assert torch.allclose(together[0], alone_long[0], atol=1e-5)
    assert torch.allclose(together[1, pad:], alone_short[0], atol=1e-5)
    assert torch.allclose(cached[1, pad:], alone_short[0], atol=1e-5)


def test_each_expert_runs_only_on_its_own_rows():
    model = debug_model()
    ids = mixed_ids(model, batch=2, text=5, image=7)
    seen = {"text": 0, "visual": 0}

    def counter(kind):
        def hook(module, args):
            seen[kind] += args[0].shape[0]
        return hook

    block = model.layers[0]
    block.text.mlp.register_forward_pre_hook(counter("text"))
    block.visual.mlp.register_forward_pre_hook(counter("visual"))
    with torch.no_grad():
        model(ids, model.image_mask(ids))
    assert seen == {"text": 2 * 5, "visual": 2 * 8}  # <img> is a visual-side token


def test_copy_init_makes_image_tokens_see_the_language_expert():
    """Right after init, routing image rows to the visual expert changes nothing."""
    model = debug_model()
    ids = mixed_ids(model)
    with torch.no_grad():
        routed = model.forward_hidden(ids, model.image_mask(ids))
        language_only = model.forward_hidden(ids, False)
    assert torch.allclose(routed, language_only, atol=1e-6)
    emb = model.embed
    assert torch.allclose(emb.new_weight, emb.text_weight.mean(0).expand_as(emb.new_weight), atol=1e-6)


def test_frozen_side_gets_no_gradient_from_image_loss():
    model = debug_model()
    groups = model.parameter_groups()
    for name in ("text_expert", "text_vocab", "norms"):
        for p in groups[name].values():
            p.requires_grad_(False)
    text_rows_before = model.embed.text_weight.detach().clone()
    ids = mixed_ids(model)
    logits = model(ids, model.image_mask(ids))
    targets = ids[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, -4:-1].reshape(-1, logits.shape[-1]), targets[:, -3:].reshape(-1))
    loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    opt.step()
    for name in ("text_expert", "text_vocab", "norms"):
        assert all(p.grad is None for p in groups[name].values()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["visual_expert"].values())
    assert torch.equal(model.embed.text_weight, text_rows_before)


def test_qwen_7b_parameter_counts_on_meta():
    with torch.device("meta"):
        model = SemVIE(SemVIEConfig.from_name("qwen-7b"))
    groups = {k: sum(p.numel() for p in v.values()) for k, v in model.parameter_groups().items()}
    total = sum(groups.values())
    trainable = groups["visual_expert"] + groups["new_vocab"]
    assert total == 14_264_897_536
    assert trainable == 6_543_572_992
    assert sum(p.numel() for p in model.parameters()) == total


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tmp_path, tied):
    model = perturb_visual_side(debug_model(tie_word_embeddings=tied))
    model.save_pretrained(tmp_path)
    loaded = SemVIE.from_pretrained(tmp_path)
    ids = mixed_ids(model)
    with torch.no_grad():
        assert torch.equal(model(ids, model.image_mask(ids)), loaded(ids, loaded.image_mask(ids)))
    assert load_model_config(tmp_path) == model.config


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = debug_model()
    model.save_pretrained(tmp_path, max_shard_bytes=64 * 1024)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    loaded = SemVIE.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_bad_checkpoints_fail_with_one_line_reason(tmp_path):
    model = debug_model()
    model.save_pretrained(tmp_path / "ok")
    with pytest.raises(MarsError, match="config.json missing"):
        SemVIE.from_pretrained(tmp_path / "nothing")
    # truncated weights
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_bytes((tmp_path / "ok" / "config.json").read_bytes())
    data = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (tmp_path / "torn" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MarsError, match="cannot read weights file") as err:
        SemVIE.from_pretrained(tmp_path / "torn")
    assert "\n" not in str(err.value)
    # architecture that does not fit the weights
    cfg = (tmp_path / "ok" / "config.json").read_text().replace('"num_layers": 2', '"num_layers": 3')
    (tmp_path / "deeper").mkdir()
    (tmp_path / "deeper" / "config.json").write_text(cfg)
    (tmp_path / "deeper" / "model.safetensors").write_bytes(data)
    with pytest.raises(MarsError, match="missing tensor layers.2"):
        SemVIE.from_pretrained(tmp_path / "deeper")
    cfg = (tmp_path / "ok" / "config.json").read_text().replace('"intermediate_size": 128', '"intermediate_size": 96')
    (tmp_path / "narrow").mkdir()
    (tmp_path / "narrow" / "config.json").write_text(cfg)
    (tmp_path / "narrow" / "model.safetensors").write_bytes(data)
    with pytest.raises(MarsError, match=r"has shape \(128, 64\), expected \(96, 64\)"):
        SemVIE.from_pretrained(tmp_path / "narrow")


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 12])
def test_few_row_cpu_product_equals_the_plain_linear(rows, monkeypatch):
    monkeypatch.setattr(semvie, "FEW_ROWS", 4)  # the weight-first layout (chosen on AMD CPUs) on any CPU
    torch.manual_seed(rows)
    layer = Linear(48, 80, bias=True)
    plain = torch.nn.Linear(48, 80, bias=True)
    plain.load_state_dict(layer.state_dict())  # the same parameters and state-dict keys
    x = torch.randn(rows, 1, 48)
    out = layer(x)
    assert out.shape == (rows, 1, 80) and out.is_contiguous()
    torch.testing.assert_close(out, plain(x), rtol=1e-5, atol=1e-5)
    weight = torch.randn(30, 48)
    torch.testing.assert_close(matmul_t(x, weight), x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_the_weight_first_layout_is_chosen_on_amd_cpus_only(tmp_path):
    amd, intel = tmp_path / "amd", tmp_path / "intel"
    amd.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    intel.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R)\n")
    assert semvie.cpu_vendor(str(amd)) == "AuthenticAMD" and semvie.cpu_vendor(str(intel)) == "GenuineIntel"
    assert semvie.cpu_vendor(str(tmp_path / "missing")) == ""  # not Linux: the usual layout
    assert semvie.FEW_ROWS == (4 if semvie.cpu_vendor() == "AuthenticAMD" else 0)


def test_rms_norm_fp32_fast_path_equals_the_upcast_formula():
    torch.manual_seed(0)
    norm = semvie.RMSNorm(48, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48)
    reference = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), reference, rtol=1e-5, atol=1e-6)
    half = norm.to(torch.bfloat16)
    torch.testing.assert_close(half(x.bfloat16()).float(), reference, rtol=2e-2, atol=2e-2)
