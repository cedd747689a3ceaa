"""Segmentation heads on a backbone's last map: DeepLabV3 (ASPP), PSPNet (pyramid pooling), and
the FCN auxiliary head on layer3.

    head = DeepLabV3Head(in_channels=2048, num_classes=19, channels=256, rates=(12, 24, 36))
    embed, logits = head(feats["layer4"])      # both at the input map's resolution

The main heads return `(embed, logits)`: `embed` is the map right before the classifier, which
feature distillation methods use. Global (1x1) pooled branches carry a conv bias and no
BatchNorm, because BatchNorm on a (B, C, 1, 1) map fails in training when a worker gets B = 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.models.resnet import init_weights


def init_classifier(conv: nn.Conv2d) -> None:
    """N(0, 0.01) weights and zero bias (as mmsegmentation's conv_seg): near-uniform initial
    predictions. Kaiming init here gives logits with a std of ~5 and a first loss of ~6, which
    slows training from scratch badly."""
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)


class AtrousConv2d(nn.Conv2d):
    """A zero-padded dilated 3x3 conv that skips the work its padding makes pointless.

    When the dilation is at least the map's height and width, every off-centre tap reads
    padding (zeros), so the result is exactly the centre tap as a 1x1 conv. That is the case for
    ASPP's large rates on small maps (CPU runs, small crops), where PyTorch's dilated-conv kernel
    on CPU is slow. Same parameters and state_dict keys as nn.Conv2d.
    """

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        same = self.padding == tuple(d * (k // 2) for d, k in zip(self.dilation, self.kernel_size))
        if (
            same
            and self.dilation[0] >= h
            and self.dilation[1] >= w
            and self.padding_mode == "zeros"
        ):
            k = self.kernel_size[0] // 2, self.kernel_size[1] // 2
            centre = self.weight[:, :, k[0] : k[0] + 1, k[1] : k[1] + 1]
            return F.conv2d(x, centre, self.bias, self.stride, 0, 1, self.groups)
        return super().forward(x)


def _conv_bn_relu(cin: int, cout: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    conv = nn.Conv2d if dilation == 1 else AtrousConv2d
    return nn.Sequential(
        conv(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _PoolBranch(nn.Module):
    """Average-pool to bins x bins, 1x1 conv, upsample back to the input size."""

    def __init__(self, cin: int, cout: int, bins: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bins)
        if bins == 1:
            self.conv = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        else:
            self.conv = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, cin, h, w) -> (B, cout, h, w)."""
        y = self.conv(self.pool(x))
        if y.shape[-2:] == (1, 1):
            return y.expand(-1, -1, *x.shape[-2:])
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., "Rethinking Atrous Convolution", 2017):
    a 1x1 branch, one 3x3 branch per rate, an image-pooling branch, then a 1x1 projection."""

    def __init__(self, in_channels: int, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, channels, 1)]
        branches += [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        branches.append(_PoolBranch(in_channels, channels, 1))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            _conv_bn_relu(len(branches) * channels, channels, 1), nn.Dropout(0.5)
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, h, w) -> (B, channels, h, w)."""
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP, a 3x3 conv (-> embed), a 1x1 classifier. Use rates (12, 24, 36) at
    output stride 8 and (6, 12, 18) at output stride 16."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        super().__init__()
        self.channels = channels
        self.aspp = ASPP(in_channels, channels, rates)
        self.conv = _conv_bn_relu(channels, channels, 3)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, in_channels, h, w) -> embed (B, channels, h, w), logits (B, K, h, w)."""
        embed = self.conv(self.aspp(x))
        return embed, self.classifier(embed)


class PSPHead(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017): pyramid pooling over `bins`, concatenated with the input,
    a 3x3 bottleneck conv (-> embed), dropout 0.1, a 1x1 classifier."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        bins: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        self.channels = channels
        self.stages = nn.ModuleList(_PoolBranch(in_channels, channels, b) for b in bins)
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * channels, channels, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, in_channels, h, w) -> embed (B, channels, h, w), logits (B, K, h, w)."""
        embed = self.bottleneck(torch.cat([x, *(s(x) for s in self.stages)], dim=1))
        return embed, self.classifier(self.dropout(embed))


class FCNAuxHead(nn.Module):
    """Auxiliary FCN head for deep supervision on layer3: 3x3 conv, BN, ReLU, dropout 0.1, 1x1."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, h, w) -> logits (B, K, h, w)."""
        return self.classifier(self.dropout(self.conv(x)))
