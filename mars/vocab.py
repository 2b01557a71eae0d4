"""The multimodal vocabulary: the ONLY place that knows where text, image codes and specials live.

Layout (PAPER.md §2), for a backbone with `text_size` embedding rows and a VQ codebook of
`image_size` codes:

    [0, text_size)                               text tokens of the pretrained LLM (frozen rows)
    [text_size, text_size + image_size)          image codes 0 .. image_size - 1
    [text_size + image_size, ... + num_special)  <img>, </img>, then reserved specials

For Qwen-7B that is 151,936 + 8,192 + 8 = 160,136 ids. Everything at or above `text_size` is a
"visual-side" id: a new, trainable embedding / output row, routed to the visual expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mars.errors import MarsError

SPECIAL_NAMES = ("<img>", "</img>")


@dataclass(frozen=True)
class MultimodalVocab:
    text_size: int
    image_size: int
    num_special: int = 8

    @classmethod
    def from_config(cls, config) -> "MultimodalVocab":
        return cls(config.text_vocab_size, config.image_vocab_size, config.num_special_tokens)

    # --- offsets -----------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def special_offset(self) -> int:
        return self.text_size + self.image_size

    @property
    def size(self) -> int:
        return self.text_size + self.image_size + self.num_special

    @property
    def num_new_rows(self) -> int:
        """Rows added to the pretrained vocabulary (image codes + specials)."""
        return self.image_size + self.num_special

    @property
    def boi_id(self) -> int:
        """`<img>`: begins an image."""
        return self.special_offset

    @property
    def eoi_id(self) -> int:
        """`</img>`: ends an image."""
        return self.special_offset + 1

    @property
    def image_ids(self) -> slice:
        """The slice of the vocabulary (and of the logits) that holds image codes."""
        return slice(self.image_offset, self.special_offset)

    def special_name(self, token_id: int) -> str:
        index = token_id - self.special_offset
        if not 0 <= index < self.num_special:
            raise MarsError(f"id {token_id} is not a special token")
        return SPECIAL_NAMES[index] if index < len(SPECIAL_NAMES) else f"<reserved_{index - len(SPECIAL_NAMES)}>"

    # --- conversion --------------------------------------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """VQ codes (any shape, 0 .. image_size-1) -> vocabulary ids."""
        codes = torch.as_tensor(codes).long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.image_size):
            raise MarsError(f"image codes must lie in [0, {self.image_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return codes + self.image_offset

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids of image codes -> VQ codes; any other id is an error."""
        ids = torch.as_tensor(ids).long()
        if ids.numel() and not bool(self.is_image_code(ids).all()):
            raise MarsError("ids_to_codes got ids that are not image codes")
        return ids - self.image_offset

    # --- masks -------------------------------------------------------------------------------
    def is_image_code(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.image_offset) & (ids < self.special_offset)

    def is_visual(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows routed to the visual expert: image codes and the image specials (the new rows)."""
        return ids >= self.text_size

    def is_text(self, ids: torch.Tensor) -> torch.Tensor:
        return ids < self.text_size

    # --- initialisation ----------------------------------------------------------------------
    def new_rows_init(self, text_rows: torch.Tensor) -> torch.Tensor:
        """Initial values of the new rows: the mean of the pretrained text rows (PAPER.md §2).

        `text_rows` is (text_size, C) (an embedding or an output head); returns (num_new_rows, C).
        """
        if text_rows.shape[0] != self.text_size:
            raise MarsError(f"expected {self.text_size} text rows, got {text_rows.shape[0]}")
        mean = text_rows.float().mean(dim=0, keepdim=True)  # (1, C)
        return mean.expand(self.num_new_rows, -1).to(text_rows.dtype).clone()
