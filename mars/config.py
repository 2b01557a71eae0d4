"""Typed configs, named presets, and YAML + `key=value` overrides.

Every config in the project is a dataclass. `load_config` reads one from YAML, `apply_overrides`
applies command-line `key=value` pairs (dotted keys reach nested dataclasses), and both reject
unknown keys and values of the wrong type with a one-line `MarsError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mars.errors import MarsError

T = TypeVar("T")


@dataclass
class SemVIEConfig:
    """Architecture of a SemVIE model: a decoder-only LLM whose every layer holds a frozen language
    expert and a trainable visual expert (PAPER.md §1), plus the multimodal vocabulary (§2)."""

    name: str = "custom"
    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 4  # < num_heads: grouped-query attention (Qwen2, Llama)
    head_dim: int = 16
    intermediate_size: int = 128  # SwiGLU inner width (Qwen v1 config says 2x this)
    qkv_bias: bool = True  # Qwen v1 / Qwen2 have a bias on q, k, v only; Llama has none
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    text_vocab_size: int = 512  # rows of the pretrained embedding (151,936 for Qwen-7B)
    image_vocab_size: int = 8192  # VQ codebook size
    num_special_tokens: int = 8  # <img>, </img> and reserved
    max_seq_len: int = 2048
    image_size: int = 256  # default generation resolution (pixels)
    image_downsample: int = 16  # VQ downsampling factor: 256 px -> 16 x 16 codes
    text_tokenizer: str = "qwen"  # "qwen", "bytes", or "hf" (tokenizer.json in the model folder)
    init_std: float = 0.02
    # "1d": one RoPE position per token, the image a raster of grid**2 positions (the paper's model);
    # "2d": image codes rotate by their row and column (even / odd frequency pairs), text as "1d"
    image_positions: str = "1d"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = ["num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "text_vocab_size", "image_vocab_size", "max_seq_len",
                    "image_size", "image_downsample"]
        for key in positive:
            if getattr(self, key) <= 0:
                raise MarsError(f"config {key} must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            raise MarsError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise MarsError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_special_tokens < 2:
            raise MarsError("num_special_tokens must be at least 2 (<img> and </img>)")
        if self.image_size % self.image_downsample:
            raise MarsError(f"image_size {self.image_size} is not a multiple of image_downsample {self.image_downsample}")
        if self.image_tokens + 2 >= self.max_seq_len:
            raise MarsError(f"max_seq_len {self.max_seq_len} cannot hold an image of {self.image_tokens} tokens and a prompt")
        if self.text_tokenizer not in ("qwen", "bytes", "hf"):
            raise MarsError(f"text_tokenizer must be qwen, bytes or hf, got {self.text_tokenizer!r}")
        if self.image_positions not in ("1d", "2d"):
            raise MarsError(f"image_positions must be 1d or 2d, got {self.image_positions!r}")

    @property
    def vocab_size(self) -> int:
        """Total rows of the multimodal vocabulary (text + image codes + specials)."""
        return self.text_vocab_size + self.image_vocab_size + self.num_special_tokens

    @property
    def image_grid(self) -> int:
        """Codes per image side at the default resolution (16 for 256 px at f16)."""
        return self.image_size // self.image_downsample

    @property
    def image_tokens(self) -> int:
        return self.image_grid**2

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "SemVIEConfig":
        """A named preset (see `PRESETS`), optionally with fields replaced."""
        if name not in PRESETS:
            raise MarsError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, SemVIEConfig] = {
    # Exactly Qwen-7B (v1): 32 x 4096, 32 heads x 128, SwiGLU 11008, QKV bias, untied embeddings.
    # 151,936 text rows + 8,192 image codes + 8 specials = 160,136 ids (PAPER.md §2).
    "qwen-7b": SemVIEConfig(
        name="qwen-7b", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32, head_dim=128,
        intermediate_size=11008, qkv_bias=True, rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=False, text_vocab_size=151936, image_vocab_size=8192, num_special_tokens=8,
        max_seq_len=2048, text_tokenizer="qwen",
    ),
    # Tiny model for tests: byte-level text, GQA, 4x4 image grid at 64 px.
    "debug": SemVIEConfig(
        name="debug", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        intermediate_size=128, qkv_bias=True, text_vocab_size=384, image_vocab_size=256,
        num_special_tokens=8, max_seq_len=256, image_size=64, image_downsample=16, text_tokenizer="bytes",
    ),
    # The built-in model (mars/assets/shapes-demo, docs/shapes-demo.md): trained on MARS-Shapes on a
    # 2-core CPU in about an hour. 512-id bilingual BPE, GQA 6 x 32 heads / 2 kv, 16 x 16 codes of
    # the shapes-small VQ (the recipe sets image_vocab_size from the VQ it trains on). max_seq_len
    # 384 leaves room for `mars caption`'s default 64 new tokens after 258 image tokens.
    "shapes-demo": SemVIEConfig(
        name="shapes-demo", num_layers=4, hidden_size=192, num_heads=6, num_kv_heads=2, head_dim=32,
        intermediate_size=512, qkv_bias=True, text_vocab_size=512, image_vocab_size=4096,
        num_special_tokens=8, max_seq_len=384, image_size=256, image_downsample=16, text_tokenizer="hf",
    ),
}


# ---------------------------------------------------------------------------------------------
# Generic dataclass <-> dict / YAML / key=value machinery
# ---------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_error(key: str, cls: type, known: list[str]) -> MarsError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return MarsError(f"unknown key {key!r} for {cls.__name__}{hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the annotated type `hint`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        last_error: MarsError | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MarsError as err:
                last_error = err
        raise last_error or MarsError(f"{key}: cannot use {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise MarsError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(hint, value, prefix=f"{key}.")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise MarsError(f"{key}: expected a list, got {value!r}")
        item_hint = args[0] if args else Any
        items = [_coerce(v, item_hint, key) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise MarsError(f"{key}: expected a mapping, got {value!r}")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise MarsError(f"{key}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise MarsError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise MarsError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise MarsError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if hint is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise MarsError(f"{key}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise MarsError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and mistyped values."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(prefix + key, cls, names)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise MarsError(f"{cls.__name__}: {err}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def apply_overrides(obj: T, overrides: list[str] | dict[str, Any]) -> T:
    """Return a copy of dataclass `obj` with `key=value` overrides applied.

    Dotted keys reach nested dataclasses (`model.num_layers=4`). Values are parsed by the field's
    type; the result is validated again (`__post_init__`), so bad combinations are rejected.
    """
    if isinstance(overrides, dict):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            if "=" not in item:
                raise MarsError(f"override {item!r} is not of the form key=value")
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value))
    data = to_dict(obj)
    hints_cls: type = type(obj)
    for key, value in pairs:
        _set_dotted(data, key, value, hints_cls)
    return from_dict(type(obj), data)


def _set_dotted(data: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        if part not in names:
            raise _unknown_key_error(".".join(parts[: i + 1]), node_cls, names)
        hint = _field_types(node_cls)[part]
        if i == len(parts) - 1:
            node[part] = _coerce(value, hint, key)
            if dataclasses.is_dataclass(node[part]):
                node[part] = to_dict(node[part])
            return
        if not dataclasses.is_dataclass(hint):
            raise MarsError(f"{'.'.join(parts[: i + 1])} is not a section, cannot set {key}")
        node, node_cls = node[part], hint


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (or `.json`) config file; a missing, unparsable or non-mapping file
    is a one-line MarsError."""
    path = Path(path)
    if not path.is_file():
        raise MarsError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else (yaml.safe_load(text) or {})
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise MarsError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MarsError(f"{path} must hold a mapping of config keys")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read dataclass `cls` from a YAML (or JSON) file, then apply `key=value` overrides."""
    data = read_config_file(path) if path is not None else {}
    config = from_dict(cls, data)
    return apply_overrides(config, overrides or [])


def model_config_from(spec: str | dict[str, Any] | SemVIEConfig) -> SemVIEConfig:
    """A model config from a preset name, a mapping (optionally with `preset:`), or a config."""
    if isinstance(spec, SemVIEConfig):
        return spec
    if isinstance(spec, str):
        return SemVIEConfig.from_name(spec)
    data = dict(spec)
    preset = data.pop("preset", None)
    base = SemVIEConfig.from_name(preset) if preset else SemVIEConfig()
    return apply_overrides(base, data)


__all__ = [
    "PRESETS",
    "SemVIEConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "read_config_file",
    "model_config_from",
    "to_dict",
]
