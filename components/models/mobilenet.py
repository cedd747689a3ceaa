"""Dilated MobileNetV2 backbone with torchvision's state_dict layout (CIRKD's second student).

    backbone = MobileNetV2(width=1.0, output_stride=8)         # the segmentation trunk
    feats = backbone(images)  # {"layer1": 24 ch stride 4, "layer2": 32 ch stride 8,
                              #  "layer3": 96 ch, "layer4": 320 ch at stride output_stride}
    classifier = MobileNetV2(output_stride=32, num_classes=1000)  # torchvision's whole network

Names and shapes are torchvision.models.mobilenet_v2's (Sandler et al., CVPR 2018):
`features.0.0.weight` (stem 3x3/2 conv, 32 ch), `features.0.1.*` (its BN); inverted residual
blocks `features.1..17` with `conv.0.0/conv.0.1` (1x1 expansion conv + BN, absent when the
expansion is 1), `conv.1.0/conv.1.1` (3x3 depthwise + BN; `conv.0.*` for expansion 1), then the
1x1 projection `conv.2` + BN `conv.3` (`conv.1` / `conv.2` for expansion 1); with `num_classes`
also `features.18` (1x1 conv 320 -> 1280 + BN) and `classifier.1` (Linear 1280 -> classes, after
a 0.2 dropout): 3,504,872 parameters at 1000 classes, as torchvision's. A torchvision ImageNet
file therefore loads into the trunk with `model.pretrained` (its `features.18.*` and
`classifier.*` are reported as unused).

The segmentation trunk is CIRKD's (winycg/CIRKD models/base_models/mobilenetv2.py at commit
7e0d21f, `MobileNetV2Dilated`): features 0..17 only (the 1280-channel conv is commented out
there, line 107), so `layer4` has 320 channels, and its dilation rule (`_nostride_dilate`,
`down_idx = [2, 4, 7, 14]`): at output stride 8 blocks 7..13 and 14..17 run at dilations 2 and 4,
the first block of each (the stride-2 one) with its stride removed and the previous dilation
(1, then 2) on its depthwise conv; at output stride 16 only blocks 14..17 (dilation 2, block 14
at 1). That is torchvision's `replace_stride_with_dilation` rule for ResNets, which this module
applies. 1x1 convs are never dilated. Differences from CIRKD: torchvision's module nesting and
key names (CIRKD's blocks are flat Sequentials `conv.0..7` under `pretrained.net.features`; its
checkpoints are renamed by `components/models/convert.py`), and `width` rounds channels to a
multiple of 8 as torchvision (CIRKD: int(c x width); the same at width 1). Activations are
ReLU6, as in both.
"""

from __future__ import annotations

from torch import Tensor, nn

from components.models.resnet import init_weights

# t (expansion), c (channels), n (blocks), s (stride of the first block): torchvision's and
# CIRKD's `interverted_residual_setting`.
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The block (index into `features`) whose output is each stage map: strides 4, 8, 16, 32
# before dilation (torchvision's deeplabv3_mobilenet_v3 and mmseg take the same cut points).
STAGE_ENDS = {"layer1": 3, "layer2": 6, "layer3": 13, "layer4": 17}


def make_divisible(value: float, divisor: int = 8) -> int:
    """torchvision's `_make_divisible`: round to the nearest multiple of `divisor`, at least
    `divisor`, and never more than 10% below `value`."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < 0.9 * value:
        new += divisor
    return new


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6: keys `0.weight`, `1.*` (torchvision's
    Conv2dNormActivation)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
    ) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """1x1 expansion (unless expand_ratio is 1), 3x3 depthwise (stride, dilation), 1x1 linear
    projection; identity shortcut when stride 1 and cin == cout."""

    def __init__(
        self, cin: int, cout: int, stride: int, expand_ratio: int, dilation: int = 1
    ) -> None:
        super().__init__()
        hidden = round(cin * expand_ratio)
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 trunk returning the four stage maps (module docstring).

    width: channel multiplier (torchvision's `width_mult`, channels rounded to multiples of 8).
    output_stride: 8 or 16 for segmentation (dilated as CIRKD), 32 for the undilated network.
    num_classes: None for the segmentation trunk (features 0..17); an int adds torchvision's
    `features.18` and `classifier` (use `classify`).
    """

    def __init__(
        self, width: float = 1.0, output_stride: int = 8, num_classes: int | None = None
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.output_stride = output_stride
        cin = make_divisible(32 * width)
        layers: list[nn.Module] = [ConvBNReLU6(3, cin, 3, stride=2)]
        stride, dilation = 2, 1
        for t, c, n, s in SETTINGS:
            cout = make_divisible(c * width)
            for i in range(n):
                block_stride = s if i == 0 else 1
                previous = dilation
                if block_stride == 2 and stride * 2 > output_stride:
                    # CIRKD's _nostride_dilate: the stride goes, the depthwise conv keeps the
                    # previous dilation, the following blocks take the doubled one.
                    dilation, block_stride = dilation * 2, 1
                elif block_stride == 2:
                    stride *= 2
                first = previous if i == 0 else dilation
                layers.append(InvertedResidual(cin, cout, block_stride, t, first))
                cin = cout
        self.out_channels = {
            name: layers[i].conv[-1].num_features for name, i in STAGE_ENDS.items()
        }
        last = make_divisible(1280 * max(1.0, width))
        if num_classes is not None:
            layers.append(ConvBNReLU6(cin, last, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier: nn.Sequential | None = None
        if num_classes is not None:
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        init_weights(self)
        if self.classifier is not None:
            nn.init.normal_(self.classifier[1].weight, 0, 0.01)
            nn.init.zeros_(self.classifier[1].bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W). Returns {"layer1": (B, 24w, H/4, W/4), "layer2": (.., H/8, ..),
        "layer3": (B, 96w, H/min(16, OS), ..), "layer4": (B, 320w, H/OS, W/OS)}."""
        feats, last = {}, STAGE_ENDS["layer4"]
        ends = {i: name for name, i in STAGE_ENDS.items()}
        for i, block in enumerate(self.features[: last + 1]):
            x = block(x)
            if i in ends:
                feats[ends[i]] = x
        return feats

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, num_classes), as torchvision's forward (needs `num_classes`)."""
        if self.classifier is None:
            raise ValueError("this MobileNetV2 was built without a classifier (num_classes)")
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))


# CIRKD's block layout (a flat Sequential per block, models/base_models/mobilenetv2.py lines
# 40-66) -> torchvision's nested one: expansion-1 block (features.1) dw conv 0, BN 1, pw conv 3,
# BN 4; the others pw 0, BN 1, dw 3, BN 4, pw-linear 6, BN 7 (ReLU6s at 2 and 5 hold no weights).
_CIRKD_BLOCK = {0: "0.0", 1: "0.1", 3: "1.0", 4: "1.1", 6: "2", 7: "3"}
_CIRKD_FIRST_BLOCK = {0: "0.0", 1: "0.1", 3: "1", 4: "2"}


def cirkd_block_key(block: int, index: int) -> str | None:
    """torchvision's `conv.*` sub-name of CIRKD's `features.{block}.conv.{index}` (block >= 1),
    or None for an index that holds no weights there."""
    table = _CIRKD_FIRST_BLOCK if block == 1 else _CIRKD_BLOCK
    return table.get(index)
