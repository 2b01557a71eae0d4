"""Vector quantizer (VQ-VAE) with a straight-through estimator, and dead-code restarts.

Parameter name `embedding.weight` follows taming-transformers' `VectorQuantizer`, so its
checkpoints load strictly. Two matching modes:
- plain (taming): nearest code by Euclidean distance in `codebook_embed_dim` dimensions;
- `l2_norm` (LlamaGen): encoder output and codes are unit-normalised, so the nearest code is the
  one with the largest cosine similarity. With low-dimensional codes (8) this keeps most of the
  codebook in use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def _no_autocast(device: torch.device):
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()  # e.g. the meta device, which has no autocast


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, D, h, w) quantized vectors, gradients pass straight through to z
    codes: torch.Tensor  # (B, h, w) long
    codebook_loss: torch.Tensor  # scalar, || sg(z) - e ||^2: moves codes towards the encoder output
    commit_loss: torch.Tensor  # scalar, beta * || z - sg(e) ||^2: keeps the encoder near its codes
    z: torch.Tensor  # (B, D, h, w) encoder output in code space before matching (with gradients)
    entropy_loss: torch.Tensor  # scalar; 0 unless `entropy_temperature` > 0 in training


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantizer over `codebook_size` codes of `embed_dim` dimensions."""

    def __init__(self, codebook_size: int, embed_dim: int, beta: float = 0.25, l2_norm: bool = False):
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        # Set by the trainer: > 0 adds an entropy regulariser on soft code assignments (training only).
        self.entropy_temperature = 0.0

    def codebook(self) -> torch.Tensor:
        """The code vectors as used for matching, (K, D) float32."""
        weight = self.embedding.weight.float()
        return F.normalize(weight, dim=-1) if self.l2_norm else weight

    def prepare(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output in code space, float32 and (if l2_norm) unit length along dim 1."""
        z = z.float()
        return F.normalize(z, dim=1) if self.l2_norm else z

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared distances (up to a per-row constant) from each row of `z_flat` (N, D) to every
        code, (N, K). ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, and ||z||^2 is the same for all codes."""
        codebook = self.codebook()  # (K, D)
        if self.l2_norm:  # unit vectors: ||z - e||^2 = 2 - 2 z.e
            return 2.0 - 2.0 * (z_flat @ codebook.t())
        return codebook.square().sum(dim=1)[None, :] - 2.0 * (z_flat @ codebook.t())

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of `z_flat` (N, D) -> (N,)."""
        return self.distances(z_flat).argmin(dim=1)

    def entropy_loss(self, distances: torch.Tensor) -> torch.Tensor:
        """Per-token entropy minus batch entropy of soft assignments softmax(-d / T): low when every
        token picks one code confidently and the batch spreads over many codes. It keeps the
        encoder from collapsing onto a handful of codes early in training (as in MAGVIT/LlamaGen)."""
        logits = -distances / self.entropy_temperature  # (N, K)
        probs, log_probs = logits.softmax(dim=1), logits.log_softmax(dim=1)
        token_entropy = -(probs * log_probs).sum(dim=1).mean()
        mean_probs = probs.mean(dim=0)
        batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-8)).sum()
        return token_entropy - batch_entropy

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize `z` (B, D, h, w)."""
        with _no_autocast(z.device):  # distances in float32
            z = self.prepare(z)  # (B, D, h, w)
            B, D, h, w = z.shape
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D)
            distances = self.distances(z_flat)  # (N, K)
            codes = distances.argmin(dim=1)
            entropy = (self.entropy_loss(distances) if self.training and self.entropy_temperature > 0
                       else z.new_zeros(()))
            z_q = self.codebook()[codes].view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
            codebook_loss = F.mse_loss(z_q, z.detach())
            commit_loss = self.beta * F.mse_loss(z, z_q.detach())
            z_st = z + (z_q - z).detach()  # straight-through: forward z_q, backward identity
        return QuantizerOutput(z_st, codes.view(B, h, w), codebook_loss, commit_loss, z, entropy)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for a grid of indices: (B, h, w) long -> (B, D, h, w)."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), "
                             f"got [{int(codes.min())}, {int(codes.max())}]")
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator) -> int:
        """Move the codes flagged in `dead` (K,) bool onto randomly chosen `candidates` (N, D).

        Candidates are encoder outputs in code space (see `prepare`), so a restarted code is
        immediately the nearest code for at least one real input. Returns how many moved.
        """
        index = dead.nonzero().flatten()
        n, m = index.numel(), candidates.shape[0]
        if n == 0 or m == 0:
            return 0
        # distinct candidates when there are enough, else with replacement
        pick = (torch.randperm(m, generator=generator, device=generator.device)[:n] if m >= n
                else torch.randint(m, (n,), generator=generator, device=generator.device))
        weight = self.embedding.weight
        weight[index.to(weight.device)] = candidates.detach()[pick.to(candidates.device)].to(weight)
        return int(index.numel())


class CodeUsage:
    """Counts how often each code was chosen since the last reset (for logging and restarts)."""

    def __init__(self, codebook_size: int):
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten().cpu(), minlength=self.counts.numel())

    def fraction_used(self) -> float:
        return float((self.counts > 0).float().mean())

    def dead(self) -> torch.Tensor:
        return self.counts == 0

    def reset(self) -> None:
        self.counts.zero_()
