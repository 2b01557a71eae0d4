"""VQ-GAN training losses: reconstruction + perceptual + codebook/commitment + PatchGAN (hinge),
with taming's adaptive generator weight and a delayed discriminator start."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mars.vq.discriminator import NLayerDiscriminator
from mars.vq.perceptual import PerceptualLoss
from mars.vq.quantizer import QuantizerOutput


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|grad nll| / |grad g_loss| at the decoder's last layer: balances the GAN term against the
    reconstruction terms whatever their scales (Esser et al. 2021, eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class VQGANLoss(nn.Module):
    """The generator and discriminator objectives; holds the discriminator and the perceptual net."""

    def __init__(self, *, rec_loss: str = "l1", rec_weight: float = 1.0, perceptual_weight: float = 1.0,
                 perceptual_stages: tuple[int, ...] = (0, 1, 2, 3), codebook_weight: float = 1.0,
                 entropy_weight: float = 0.0,
                 disc_start: int = 0, disc_weight: float = 0.5, adaptive_disc_weight: bool = True,
                 disc_ndf: int = 64, disc_layers: int = 3):
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}")
        self.rec_loss, self.rec_weight = rec_loss, rec_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual = PerceptualLoss(perceptual_stages) if perceptual_weight > 0 else None
        self.codebook_weight = codebook_weight
        self.entropy_weight = entropy_weight
        self.disc_start, self.disc_weight = disc_start, disc_weight
        self.adaptive_disc_weight = adaptive_disc_weight
        self.discriminator = NLayerDiscriminator(ndf=disc_ndf, n_layers=disc_layers)

    def disc_active(self, step: int) -> bool:
        return self.disc_weight > 0 and step >= self.disc_start

    def generator_loss(self, images: torch.Tensor, recon: torch.Tensor, quant: QuantizerOutput,
                       last_layer: torch.Tensor, step: int,
                       quantized: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of the tokenizer for one batch; `images`, `recon` (B, 3, H, W) in [-1, 1].

        quantized=False (autoencoder warm-up): the codebook and commitment terms are left out.
        """
        diff = (recon.float() - images.float())
        rec = diff.abs().mean() if self.rec_loss == "l1" else diff.square().mean()
        nll = self.rec_weight * rec
        logs = {"rec_loss": rec.item(), "mse": diff.square().mean().item()}
        if self.perceptual is not None:
            p_loss = self.perceptual(recon, images).mean()
            nll = nll + self.perceptual_weight * p_loss
            logs["perceptual_loss"] = p_loss.item()
        loss = nll
        if quantized:
            loss = loss + self.codebook_weight * (quant.codebook_loss + quant.commit_loss)
        logs["codebook_loss"] = quant.codebook_loss.item()
        logs["commit_loss"] = quant.commit_loss.item()
        if self.entropy_weight > 0 and quantized:
            loss = loss + self.entropy_weight * quant.entropy_loss
            logs["entropy_loss"] = quant.entropy_loss.item()
        if self.disc_active(step):
            g_loss = -self.discriminator(recon).float().mean()
            weight = (adaptive_weight(nll, g_loss, last_layer) if self.adaptive_disc_weight and self.training
                      else torch.tensor(1.0, device=recon.device))
            loss = loss + self.disc_weight * weight * g_loss
            logs["g_loss"], logs["d_weight"] = g_loss.item(), weight.item()
        logs["loss"] = loss.item()
        return loss, logs

    def discriminator_loss(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of the PatchGAN on real `images` and (detached) reconstructions."""
        logits_real = self.discriminator(images.detach()).float()
        logits_fake = self.discriminator(recon.detach()).float()
        d_loss = hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                        "logits_fake": logits_fake.mean().item()}
