"""Dilated ResNet-18/34/50/101 backbones with torchvision's state_dict layout.

    backbone = ResNet(Bottleneck, (3, 4, 6, 3), width=1.0, output_stride=8)   # ResNet-50
    report = load_pretrained_backbone(backbone, "resnet50-0676ba61.pth")
    feats = backbone(images)          # {"layer1": stride 4, ..., "layer4": stride output_stride}

At `width=1.0` the parameter and buffer names and shapes are torchvision's (`conv1.weight`,
`layer1.0.downsample.1.running_mean`, ...; there is no `fc`), so a torchvision checkpoint loads
as is. `width` scales every channel count, for CPU tests. Strides of the last stages become
dilations with torchvision's `replace_stride_with_dilation` convention: the first block of a
dilated stage keeps the previous dilation, the following blocks use the new one.

`variant="cirkd"` is CIRKD's ResNetV1s instead (winycg/CIRKD models/base_models/resnetv1b.py,
ResNetV1b with deep_stem=True, lines 98-111, as models/segbase.py builds every ResNet student
and teacher): a three-conv 3x3 stem (conv1 3->64 stride 2, bn1, conv2 64->64, bn2, conv3
64->128, bn3; the stem ends at 128 channels, so layer1 gets a downsample) and CIRKD's dilation
rule (`_make_layer`, lines 143-163): a stage of dilation d starts with a block whose first 3x3
conv has dilation 1 (d = 1 or 2) or 2 (d = 4) and whose second 3x3 conv (BasicBlock) already
has d. For Bottleneck, whose only 3x3 conv takes the first value, the rule equals torchvision's.
Key names stay top-level (`conv1`, `bn1`, `conv2`, ..., `layer1.0.downsample.0.weight`), as
CIRKD's backbone under its `pretrained.` prefix, so its `resnet18-imagenet.pth` loads as is.

`variant="mmseg"` is mmsegmentation's ResNetV1c as its "-d8" / "-d16" segmentation configs build
it (open-mmlab/mmsegmentation v1.2.2, mmseg/models/backbones/resnet.py: `ResNetV1c` lines
689-699 = `deep_stem=True, avg_down=False`; `_make_stem_layer` lines 591-624; configs
_base_/models/deeplabv3_r50-d8.py lines 14-24: strides (1, 2, 1, 1), dilations (1, 1, 2, 4),
`contract_dilation=True`): a three-conv 3x3 stem at half then full stem width (3->32 stride 2,
32->32, 32->64 at width 1, each BN + ReLU; mmseg's keys `stem.{0,1,3,4,6,7}`, ours `conv1 bn1
conv2 bn2 conv3 bn3` as the cirkd variant), so layer1 starts from 64 channels as torchvision's.
Dilation (mmseg/models/utils/res_layer.py lines 67-95): the first block of a stage of dilation
d > 1 gets d // 2, the others d, which at output stride 8 or 16 is torchvision's rule; mmseg's
BasicBlock never dilates its second conv (resnet.py lines 49-50: `padding=1`, no dilation), so
ResNet-18/34 differ from torchvision's rule there. `stem_key` renames mmseg's `stem.N` keys to
ours, so `load_pretrained_backbone` takes mmseg's ImageNet `resnet50_v1c` files as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

STAGES = ("layer1", "layer2", "layer3", "layer4")

# mmseg's deep stem (`stem` = conv, BN, ReLU, conv, BN, ReLU, conv, BN, ReLU) -> our names.
MMSEG_STEM = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"}


def stem_key(key: str) -> str:
    """`stem.{0,1,3,4,6,7}.X` (mmseg's ResNetV1c) -> `{conv1,bn1,conv2,bn2,conv3,bn3}.X`; any
    other key unchanged."""
    m = re.match(r"stem\.(\d+)\.", key)
    if m is None or m.group(1) not in MMSEG_STEM:
        return key
    return f"{MMSEG_STEM[m.group(1)]}." + key[m.end() :]


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as torchvision), BatchNorm weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34). Unlike torchvision's it accepts dilation > 1."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        dilation2: int | None = None,
    ) -> None:
        """dilation2: the second conv's dilation when it differs from the first's (CIRKD's
        first block of a dilated stage, resnetv1b.py BasicBlockV1b lines 22-33)."""
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation if dilation2 is None else dilation2)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 (ResNet-50/101), stride on the 3x3 conv as torchvision (ResNet v1.5)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        dilation2: int | None = None,
    ) -> None:
        """dilation2 is accepted for BasicBlock's signature and unused: one 3x3 conv here."""
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk without avgpool/fc, returning the four stage outputs.

    block: BasicBlock or Bottleneck; layers: blocks per stage, (2, 2, 2, 2) for ResNet-18,
    (3, 4, 6, 3) for 34/50, (3, 4, 23, 3) for 101. width: channel multiplier (base 64 becomes
    max(8, round(64 * width))). output_stride: 8 (layer3 and layer4 dilated) or 16 (layer4).
    variant: "torchvision" (7x7 stem, torchvision's dilation rule), "cirkd" (deep stem and
    CIRKD's dilation rule) or "mmseg" (ResNetV1c's deep stem and mmseg's dilation rule), see the
    module docstring.
    """

    VARIANTS = ("torchvision", "cirkd", "mmseg")

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        width: float = 1.0,
        output_stride: int = 8,
        variant: str = "torchvision",
    ) -> None:
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        base = max(8, round(64 * width))
        dilate = (False, False, output_stride == 8, True)
        self.output_stride = output_stride
        self.variant = variant
        self.deep_stem = variant in ("cirkd", "mmseg")
        self._dilation = 1
        if self.deep_stem:
            # cirkd, resnetv1b.py lines 103-111: 3x3/2 3->64, 3x3 64->64, 3x3 64->128.
            # mmseg, resnet.py lines 591-624 (stem_channels 64): 3x3/2 3->32, 32->32, 32->64.
            # Each conv is followed by BN + ReLU.
            mid, out = (base, 2 * base) if variant == "cirkd" else (base // 2, base)
            self.conv1 = _conv3x3(3, mid, stride=2)
            self.bn1 = nn.BatchNorm2d(mid)
            self.conv2 = _conv3x3(mid, mid)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3 = _conv3x3(mid, out)
            self.bn3 = nn.BatchNorm2d(out)
            self._inplanes = out
        else:
            self.conv1 = nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(base)
            self._inplanes = base
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.out_channels: dict[str, int] = {}
        for i, (name, n) in enumerate(zip(STAGES, layers, strict=True)):
            planes = base * 2**i
            stride = 1 if i == 0 else 2
            setattr(self, name, self._make_layer(block, planes, n, stride, dilate[i]))
            self.out_channels[name] = planes * block.expansion
        init_weights(self)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
    ) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self._inplanes != out:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out),
            )
        second = None  # a BasicBlock's second conv: the block's dilation
        if self.variant == "cirkd":
            # resnetv1b.py lines 152-162: dilation 1 or 2 -> first conv 1, 4 -> 2; then d.
            first = 1 if self._dilation in (1, 2) else 2
            layers = [block(self._inplanes, planes, stride, first, downsample, self._dilation)]
        elif self.variant == "mmseg":
            # res_layer.py lines 68-72 (contract_dilation): the first block d // 2 when d > 1;
            # resnet.py lines 49-50: BasicBlock's second conv is never dilated.
            second = 1
            first = self._dilation // 2 if self._dilation > 1 else 1
            layers = [block(self._inplanes, planes, stride, first, downsample, second)]
        else:
            layers = [block(self._inplanes, planes, stride, previous_dilation, downsample)]
        self._inplanes = out
        layers += [
            block(out, planes, 1, self._dilation, dilation2=second) for _ in range(1, blocks)
        ]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: (B, 3, H, W). Returns {"layer1": (B, C1, H/4, W/4), "layer2": (.., H/8, ..),
        "layer3": (.., H/min(16, OS), ..), "layer4": (B, C4, H/OS, W/OS)} (sizes rounded up)."""
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn3(self.conv3(self.relu(self.bn2(self.conv2(x))))))
        x = self.maxpool(x)
        feats = {}
        for name in STAGES:
            x = getattr(self, name)(x)
            feats[name] = x
        return feats


def _unwrap(obj: object, path: str) -> dict[str, Tensor]:
    """The flat name -> tensor mapping inside what torch.load returned."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: not a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict (non-tensor entries such as {bad[0]!r})")
    return dict(obj)


def _strip(key: str) -> str:
    # DDP saves under "module.", segmentation checkpoints under "backbone." (or both, nested),
    # CIRKD's under "pretrained." (models/segbase.py line 24), so its networks' backbones load.
    while key.startswith(("module.", "backbone.", "pretrained.")):
        key = key.split(".", 1)[1]
    return key


def load_pretrained_backbone(
    backbone: nn.Module, path: str, partial: bool = False
) -> dict[str, list[str]]:
    """Load a local torchvision-format ResNet state_dict file into `backbone` (non-strict).

    The file may hold the state dict itself or a dict with a "state_dict" or "model" entry
    (mmseg's files: {"meta": ..., "state_dict": ...}); leading "module." / "backbone." prefixes
    are stripped, mmseg's deep-stem keys `stem.N.*` renamed to ours (`stem_key`) and `fc.*`
    ignored. Tensors whose
    shape differs from the model's are skipped. Returns {"missing": model keys absent from the
    file, "unexpected": file keys the model lacks, "mismatched": keys skipped for their shape}.
    Raises ValueError naming the file when it is unreadable, not a state dict, or shares no key
    with the model, and, unless `partial`, when any backbone tensor is missing from it or has
    another shape (e.g. a deep-stem ResNet-V1c file, as CIRKD's `resnet18-imagenet.pth`).
    """
    return load_weights_file(backbone, path, "fc.", "the backbone", partial, rename=stem_key)


def load_weights_file(
    module: nn.Module,
    path: str,
    ignore_prefix: str,
    what: str,
    partial: bool = False,
    rename: Callable[[str], str] | None = None,
    transform: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> dict[str, list[str]]:
    """The loader behind the backbones' `load_pretrained_*`: read `path` (weights only), unwrap
    and strip prefixes (then apply `rename`, when given, to each key), drop keys starting with
    `ignore_prefix` (an ImageNet classifier), apply `transform` to the whole mapping, load
    the tensors whose name and shape match into `module` and report the rest. Unless `partial`,
    a model tensor the file lacks or holds in another shape is an error naming them (nothing is
    loaded); keys the model lacks (a segmentation head) are only reported. `what` names the
    module in errors."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips, pickles, missing files all raise different types
        raise ValueError(f"cannot read pretrained weights {path}: {e}") from e
    loaded = {}
    for key, value in _unwrap(obj, path).items():
        key = _strip(key)
        if rename is not None:
            key = rename(key)
        if not key.startswith(ignore_prefix):
            loaded[key] = value
    if transform is not None:  # a whole-file renaming (HuggingFace's MiT: key + value -> kv)
        loaded = transform(loaded)
    own = module.state_dict()
    matched = {k: v for k, v in loaded.items() if k in own and own[k].shape == v.shape}
    # Scalar BatchNorm counters match any backbone; only weights and statistics count as a match.
    if all(k.endswith("num_batches_tracked") for k in matched):
        same_names = sum(k in own and not k.endswith("num_batches_tracked") for k in loaded)
        if same_names:
            raise ValueError(
                f"{path}: no key matches {what}: all {same_names} shared names differ in "
                "shape (a different variant or width?)"
            )
        sample = ", ".join(list(loaded)[:5])
        raise ValueError(f"{path}: no key matches {what} (file has e.g. {sample})")
    # Old torchvision files predate BatchNorm's num_batches_tracked; it does not affect eval.
    report = {
        "missing": [k for k in own if k not in loaded and not k.endswith("num_batches_tracked")],
        "unexpected": [k for k in loaded if k not in own],
        "mismatched": [k for k in loaded if k in own and own[k].shape != loaded[k].shape],
    }
    if not partial and (report["missing"] or report["mismatched"]):
        shapes = "; ".join(
            f"{k} {tuple(loaded[k].shape)} here {tuple(own[k].shape)}"
            for k in report["mismatched"][:3]
        )
        raise ValueError(
            f"{path}: fits {what} only in part: {len(report['missing'])} tensor(s) missing "
            f"(e.g. {', '.join(report['missing'][:3]) or '-'}), {len(report['mismatched'])} of "
            f"another shape ({shapes or '-'}), {len(report['unexpected'])} the model lacks "
            f"(e.g. {', '.join(report['unexpected'][:3]) or '-'}). Another variant (a deep "
            "stem?), width or depth; set pretrained_partial=true to load the tensors that fit"
        )
    module.load_state_dict(matched, strict=False)
    return report
