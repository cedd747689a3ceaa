"""Segmentation heads on a backbone's last map: DeepLabV3 (ASPP), PSPNet (pyramid pooling), and
the FCN auxiliary head on layer3.

    head = DeepLabV3Head(in_channels=2048, num_classes=19, channels=256, rates=(12, 24, 36))
    embed, logits = head(feats["layer4"])      # both at the input map's resolution

    head = SegFormerHead(in_channels=mit.out_channels, num_classes=19, embed_dim=256)
    embed, logits = head(mit_feats)            # the four MiT maps; outputs at stride 4

The main heads return `(embed, logits)`: `embed` is the map right before the classifier, which
feature distillation methods use. Global (1x1) pooled branches carry a conv bias and no
BatchNorm, because BatchNorm on a (B, C, 1, 1) map fails in training when a worker gets B = 1.

`variant="cirkd"` builds CIRKD's heads instead (winycg/CIRKD models/deeplabv3.py and
models/pspnet.py, commit 7e0d21f, the code its released checkpoints were trained with): the
pooled branches are conv (no bias) + BatchNorm + ReLU (deeplabv3.py `_AsppPooling` lines
113-127, pspnet.py `_PSP1x1Conv` lines 74-79), so they need B >= 2 per worker in training;
PSPNet upsamples its pyramid with align_corners=True (pspnet.py lines 98-101) and its pyramid
branches have in_channels / 4 channels (line 86) while the bottleneck has `channels`; DeepLabV3
drops out (0.1) before the classifier (deeplabv3.py `_DeepLabHead.block`, lines 84-90).

`variant="mmseg"` builds mmsegmentation's decode heads (open-mmlab/mmsegmentation v1.2.2,
mmseg/models/decode_heads/; the released "-d8" Cityscapes models): every 1x1 branch, the pooled
ones included, is ConvModule = conv (no bias) + BatchNorm + ReLU (so training needs B >= 2 per
worker, as cirkd); `decode_head.py` lines 157-161 and 240-244: Dropout2d(0.1), then `conv_seg`.
DeepLabV3 is `ASPPHead` (aspp_head.py lines 65-116): image pooling, a 1x1 and one 3x3 branch per
rate, concatenated with the pooled branch FIRST, then a 3x3 `bottleneck` over the concatenation
(-> embed): there is no 1x1 projection and no dropout 0.5. PSPNet is `PSPHead` (psp_head.py
lines 25-111): the pyramid at `channels` with BatchNorm, upsampled with align_corners=False,
concatenated after the input, a 3x3 bottleneck. The FCN aux head (fcn_head.py lines 38-64 with
num_convs=1, concat_input=False) is ours but for Dropout2d. Our key names stay ours;
components/models/convert.py renames mmseg's.
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


VARIANTS = ("torchvision", "cirkd", "mmseg")


def _check_variant(variant: str) -> str:
    """`variant` when it is one of VARIANTS; ValueError otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


class _PoolBranch(nn.Module):
    """Average-pool to bins x bins, 1x1 conv, upsample back to the input size. bn: BatchNorm
    (and no conv bias) on the global (bins = 1) branch too, as CIRKD."""

    def __init__(
        self, cin: int, cout: int, bins: int, bn: bool = False, align_corners: bool = False
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(bins)
        self.align_corners = align_corners
        if bins == 1 and not bn:
            self.conv = nn.Sequential(nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        else:
            self.conv = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, cin, h, w) -> (B, cout, h, w)."""
        y = self.conv(self.pool(x))
        if y.shape[-2:] == (1, 1):
            return y.expand(-1, -1, *x.shape[-2:])
        return F.interpolate(
            y, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al., "Rethinking Atrous Convolution", 2017):
    a 1x1 branch, one 3x3 branch per rate, an image-pooling branch, then a 1x1 projection.
    pool_bn: BatchNorm in the image-pooling branch (CIRKD's, torchvision's and mmseg's ASPP).
    project=False (mmseg's ASPPHead): no projection, the output is the concatenation
    (`out_channels` = (len(rates) + 2) x channels); pool_first: the pooled branch first in it
    (mmseg's order; the branches keep their indices, the pooled one last)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        rates: Sequence[int],
        pool_bn: bool = False,
        project: bool = True,
        pool_first: bool = False,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(in_channels, channels, 1)]
        branches += [_conv_bn_relu(in_channels, channels, 3, r) for r in rates]
        branches.append(_PoolBranch(in_channels, channels, 1, bn=pool_bn))
        self.branches = nn.ModuleList(branches)
        self.pool_first = pool_first
        self.out_channels = channels if project else len(branches) * channels
        self.project: nn.Module = nn.Identity()
        if project:
            self.project = nn.Sequential(
                _conv_bn_relu(len(branches) * channels, channels, 1), nn.Dropout(0.5)
            )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, h, w) -> (B, out_channels, h, w)."""
        outs = [b(x) for b in self.branches]
        if self.pool_first:
            outs = outs[-1:] + outs[:-1]
        return self.project(torch.cat(outs, dim=1))


class DeepLabV3Head(nn.Module):
    """DeepLabV3: ASPP, a 3x3 conv (-> embed), a 1x1 classifier. Use rates (12, 24, 36) at
    output stride 8 and (6, 12, 18) at output stride 16. variant: "torchvision", "cirkd"
    (BatchNorm in the pooling branch, dropout 0.1 before the classifier) or "mmseg" (ASPP
    without projection, pooled branch first, the 3x3 conv over the concatenation, Dropout2d 0.1);
    see the module doc."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 256,
        rates: Sequence[int] = (12, 24, 36),
        variant: str = "torchvision",
    ) -> None:
        super().__init__()
        variant = _check_variant(variant)
        mmseg = variant == "mmseg"
        self.channels = channels
        self.aspp = ASPP(
            in_channels,
            channels,
            rates,
            pool_bn=variant != "torchvision",
            project=not mmseg,
            pool_first=mmseg,
        )
        self.conv = _conv_bn_relu(self.aspp.out_channels, channels, 3)
        self.dropout = {
            "torchvision": nn.Identity,
            "cirkd": lambda: nn.Dropout(0.1),
            "mmseg": lambda: nn.Dropout2d(0.1),
        }[variant]()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, in_channels, h, w) -> embed (B, channels, h, w), logits (B, K, h, w)."""
        embed = self.conv(self.aspp(x))
        return embed, self.classifier(self.dropout(embed))


class PSPHead(nn.Module):
    """PSPNet (Zhao et al., CVPR 2017): pyramid pooling over `bins`, concatenated with the input,
    a 3x3 bottleneck conv (-> embed), dropout 0.1, a 1x1 classifier. The pyramid branches have
    `channels` channels, or with variant "cirkd" in_channels // 4 (and BatchNorm in the global
    branch, align_corners=True upsampling); variant "mmseg": `channels`, BatchNorm in every
    branch, Dropout2d (see the module doc)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: int = 512,
        bins: Sequence[int] = (1, 2, 3, 6),
        variant: str = "torchvision",
    ) -> None:
        super().__init__()
        variant = _check_variant(variant)
        cirkd = variant == "cirkd"
        self.channels = channels
        branch = in_channels // 4 if cirkd else channels
        bn = variant != "torchvision"
        self.stages = nn.ModuleList(
            _PoolBranch(in_channels, branch, b, bn=bn, align_corners=cirkd) for b in bins
        )
        self.bottleneck = _conv_bn_relu(in_channels + len(bins) * branch, channels, 3)
        self.dropout = nn.Dropout2d(0.1) if variant == "mmseg" else nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, in_channels, h, w) -> embed (B, channels, h, w), logits (B, K, h, w)."""
        embed = self.bottleneck(torch.cat([x, *(s(x) for s in self.stages)], dim=1))
        return embed, self.classifier(self.dropout(embed))


class FCNAuxHead(nn.Module):
    """Auxiliary FCN head for deep supervision on layer3: 3x3 conv, BN, ReLU, dropout 0.1, 1x1.
    variant "mmseg": Dropout2d (mmseg's decode_head.py line 159), the rest the same."""

    def __init__(
        self, in_channels: int, num_classes: int, channels: int = 256, variant: str = "torchvision"
    ) -> None:
        super().__init__()
        variant = _check_variant(variant)
        self.conv = _conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1) if variant == "mmseg" else nn.Dropout(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        init_weights(self)
        init_classifier(self.classifier)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_channels, h, w) -> logits (B, K, h, w)."""
        return self.classifier(self.dropout(self.conv(x)))


class MLP(nn.Module):
    """A per-pixel linear projection (SegFormer's `MLP`, key `proj`): (B, C, h, w) ->
    (B, embed_dim, h, w). Applied as a 1x1 conv with the Linear's weights, which equals
    SegFormer's flatten -> Linear -> reshape without the token-layout copies."""

    def __init__(self, input_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, input_dim, h, w) -> (B, embed_dim, h, w)."""
        return F.conv2d(x, self.proj.weight[:, :, None, None], self.proj.bias)


class _ConvBNReLU(nn.Module):
    """1x1 conv (no bias), BatchNorm, ReLU under mmcv ConvModule's names `conv` and `bn`."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021) on the four MiT stage maps.

    Each map is projected to `embed_dim` per pixel (`linear_c1` ... `linear_c4`), c2-c4 are
    upsampled bilinearly to c1's size, the four are concatenated in the order c4, c3, c2, c1 and
    fused by a 1x1 conv + BN + ReLU (`linear_fuse`, -> embed), then Dropout2d(0.1) (as mmseg's
    decode heads) and a 1x1 classifier (`linear_pred`). Names follow the NVlabs / AFA code, so
    their decoder weights load. in_channels: the four stage channels (MiT's `out_channels`);
    embed_dim: 256 for B0, 768 for B1-B5 in SegFormer (AFA uses 256).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"SegFormerHead takes 4 input maps, got in_channels {in_channels}")
        self.channels = embed_dim
        for i, cin in enumerate(in_channels, start=1):
            setattr(self, f"linear_c{i}", MLP(cin, embed_dim))
        self.linear_fuse = _ConvBNReLU(4 * embed_dim, embed_dim)
        self.dropout = nn.Dropout2d(0.1)
        self.linear_pred = nn.Conv2d(embed_dim, num_classes, 1)
        init_weights(self)  # convs and BN; the Linears keep PyTorch's default init, as mmseg
        init_classifier(self.linear_pred)

    def forward(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """feats: four maps (B, in_channels[i], h_i, w_i), the first the largest (stride 4).
        Returns embed (B, embed_dim, h_1, w_1), logits (B, K, h_1, w_1)."""
        size = feats[0].shape[-2:]
        projected = []
        for i in (4, 3, 2, 1):
            y = getattr(self, f"linear_c{i}")(feats[i - 1])
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            projected.append(y)
        embed = self.linear_fuse(torch.cat(projected, dim=1))
        return embed, self.linear_pred(self.dropout(embed))
