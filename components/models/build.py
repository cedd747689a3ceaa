"""Build a segmentation network from a `ModelConfig`.

    model = build_model(cfg.model, num_classes=19)
    out = model(images)                     # images: (B, 3, H, W)
    out["logits"]                           # (B, K, H/OS, W/OS), not upsampled
    out["features"]["low" | "high" | "embed"]
    out["aux_logits"]                       # (B, K, H/OS, W/OS), training mode with an aux head only

MiT backbones take the SegFormer head (`SegFormerModel`): logits at stride 4, and with
`cls_head` the weakly supervised outputs `cls_logits` and (training) `attn_pred`.

Logits stay at the backbone's output stride: callers upsample them (to the label size for the
loss, to the image size for evaluation), so distillation losses can compare maps at that size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import BACKBONES, HEADS, MITS, SYNTHETIC_PRETRAINED, ModelConfig
from components.models.heads import DeepLabV3Head, FCNAuxHead, PSPHead, SegFormerHead
from components.models.mit import MixVisionTransformer, build_mit, load_pretrained_mit
from components.models.resnet import BasicBlock, Bottleneck, ResNet, load_pretrained_backbone

_REPORT_NAMES = 10


class SegmentationModel(nn.Module):
    """Backbone + main head (+ auxiliary head on layer3), with the forward contract above.

    `feature_channels` gives the channels of each `features` entry, `num_classes` is K.
    """

    def __init__(
        self,
        backbone: ResNet,
        head: DeepLabV3Head | PSPHead,
        num_classes: int,
        aux_head: FCNAuxHead | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.num_classes = num_classes
        self.name = type(self).__name__  # build_model sets e.g. "deeplabv3-resnet18 x0.25"
        self.output_stride = backbone.output_stride
        self.feature_channels = {
            "low": backbone.out_channels["layer1"],
            "high": backbone.out_channels["layer4"],
            "embed": head.channels,
        }

    def forward(self, images: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        """images: (B, 3, H, W). Returns {"logits": (B, K, H/OS, W/OS), "features": {"low":
        (B, C, H/4, W/4), "high": (B, C, H/OS, W/OS), "embed": (B, C, H/OS, W/OS)}} plus
        "aux_logits" (B, K, H/OS, W/OS) in training mode when there is an aux head."""
        feats = self.backbone(images)
        embed, logits = self.head(feats["layer4"])
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "logits": logits,
            "features": {"low": feats["layer1"], "high": feats["layer4"], "embed": embed},
        }
        # Only the training loss uses the aux head; skipping it in eval saves its compute.
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(feats["layer3"])
        return out


MIT_STRIDES = {8: (4, 2, 1, 1), 16: (4, 2, 2, 1), 32: (4, 2, 2, 2)}


class SegFormerModel(nn.Module):
    """MiT encoder + SegFormer MLP head, optionally with the weakly supervised heads of AFA/TSCD.

    forward(images) -> {"logits": (B, K, H/4, W/4), "features": {"low": stage-1 map (stride 4),
    "high": stage-4 map (B, C4, h, w), "embed": the fused decoder map}} and, with `cls_head`:
    - "cls_logits" (B, K-1): the classifier (1x1 conv C4 -> K-1, no bias) on the globally
      max-pooled stage-4 map (AFA's order: pool, then classify), one logit per foreground class;
    - "attn_pred" (B, N, N), training mode only, N = h*w: the affinity predicted from the raw
      attention logits q·kᵀ (unscaled, before softmax) of the last two stage-4 blocks
      (symmetrised, 1x1 conv, sigmoid), as AFA (rulixiang/afa wetr/model_attn_aff.py,
      WeTr.forward: `torch.cat(_attns[-2:], dim=1)`, `attn_cat + attn_cat.permute(0, 1, 3, 2)`,
      `attn_proj`, sigmoid; TSCD's TSCD_model.py leaves out the symmetrisation).
    `cam(images)` gives the raw class activation maps (B, K-1, h, w) of the same classifier.
    """

    def __init__(
        self,
        backbone: MixVisionTransformer,
        head: SegFormerHead,
        num_classes: int,
        cls_head: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_classes = num_classes
        self.name = type(self).__name__
        self.output_stride = backbone.strides[0]  # of the logits
        c4 = backbone.out_channels[3]
        self.feature_channels = {
            "low": backbone.out_channels[0],
            "high": c4,
            "embed": head.channels,
        }
        self.classifier: nn.Conv2d | None = None
        self.attn_proj: nn.Conv2d | None = None
        if cls_head:
            # PyTorch's default init (as AFA): logits of order 1 on LayerNorm-ed features.
            self.classifier = nn.Conv2d(c4, num_classes - 1, 1, bias=False)
            attn_channels = backbone.num_heads[3] * min(2, backbone.depths[3])
            self.attn_proj = nn.Conv2d(attn_channels, 1, 1)
            # AFA's init (wetr/model_attn_aff.py, WeTr.__init__): kaiming normal, a = sqrt(5),
            # fan_out (= 1): weight std sqrt(2 / (1 + 5)) = 0.577; the bias keeps PyTorch's.
            nn.init.kaiming_normal_(self.attn_proj.weight, a=5**0.5, mode="fan_out")

    def forward(self, images: Tensor) -> dict[str, Tensor | dict[str, Tensor]]:
        want_attention = self.classifier is not None and self.training
        feats, attns = self.backbone(images, need_weights=want_attention)
        embed, logits = self.head(feats)
        out: dict[str, Tensor | dict[str, Tensor]] = {
            "logits": logits,
            "features": {"low": feats[0], "high": feats[3], "embed": embed},
        }
        if self.classifier is not None:
            pooled = F.adaptive_max_pool2d(feats[3], 1)
            out["cls_logits"] = self.classifier(pooled).flatten(1)
            if want_attention:
                out["attn_pred"] = self._affinity(attns)
        return out

    def _affinity(self, attns: list[Tensor]) -> Tensor:
        """(B, N, N) in (0, 1) from the stage-4 attention logits (AFA WeTr.forward)."""
        attn = torch.cat(attns[-2:], dim=1).float()
        attn = attn + attn.transpose(-1, -2)
        # fp32 under autocast: bf16 would quantise affinities near 0 and 1.
        with torch.autocast(attn.device.type, enabled=False):
            return torch.sigmoid(self.attn_proj(attn))[:, 0]

    def cam(self, images: Tensor) -> Tensor:
        """Raw class activation maps (B, K-1, h, w): the classifier on the stage-4 map."""
        if self.classifier is None:
            raise ValueError("this model has no image-level classifier (model.cls_head=false)")
        feats, _ = self.backbone(images, need_weights=False)
        return F.conv2d(feats[3], self.classifier.weight)

    def affinity(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The predicted affinity (B, N, N) of `images` in any mode (the `attn_pred` of the
        training forward), with the stage-4 size (h, w), N = h*w: AFA's `cam_only` forward
        returns it for label propagation (utils/camutils.py multi_scale_cam_with_aff_mat)."""
        if self.attn_proj is None:
            raise ValueError("this model has no affinity head (model.cls_head=false)")
        feats, attns = self.backbone(images, need_weights=True)
        return self._affinity(attns), (feats[3].shape[-2], feats[3].shape[-1])


def _scaled(channels: int, width: float, minimum: int) -> int:
    return max(minimum, round(channels * width))


def build_backbone(
    name: str, width: float = 1.0, output_stride: int = 8, variant: str = "torchvision"
) -> ResNet:
    """A randomly initialised ResNet by name (one of components.config.BACKBONES); variant
    "cirkd" is CIRKD's deep-stem ResNetV1s, "mmseg" mmsegmentation's ResNetV1c
    (components/models/resnet.py)."""
    match name:
        case "resnet18":
            return ResNet(BasicBlock, (2, 2, 2, 2), width, output_stride, variant)
        case "resnet34":
            return ResNet(BasicBlock, (3, 4, 6, 3), width, output_stride, variant)
        case "resnet50":
            return ResNet(Bottleneck, (3, 4, 6, 3), width, output_stride, variant)
        case "resnet101":
            return ResNet(Bottleneck, (3, 4, 23, 3), width, output_stride, variant)
        case "mobilenetv2":  # CIRKD's dilated trunk in torchvision's layout, either variant
            from components.models.mobilenet import MobileNetV2

            return MobileNetV2(width, output_stride)
        case _:
            raise ValueError(f"backbone: unknown '{name}', expected one of {BACKBONES}")


def head_channels(cfg: ModelConfig, backbone: ResNet) -> int:
    """The main head's channels: `cfg.head_channels` as given, else the variant's default.

    torchvision: 256 (DeepLabV3) / 512 (PSPNet), scaled by width. cirkd: CIRKD's released code
    (winycg/CIRKD commit 7e0d21f, models/deeplabv3.py lines 77-80 and 133-136: ASPP 128 on a
    512-channel layer4, 256 on 2048; models/pspnet.py lines 110-113: bottleneck 128 / 512;
    MobileNetV2: 128, deeplabv3_mobile.py `_ASPP`, psp_mobile.py `_PSPHead`), scaled by width.
    mmseg: 512 for ResNet-50/101 (configs/_base_/models/deeplabv3_r50-d8.py and pspnet_r50-d8.py
    line 29, `channels=512`), 128 for ResNet-18/34 (the r18-d8 configs, e.g.
    configs/pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py), scaled by width.
    The block type tells the ResNet-18/34 from the 50/101 case."""
    if cfg.head_channels is not None:
        return cfg.head_channels
    basic = not isinstance(backbone, ResNet) or backbone.layer4[0].expansion == 1
    if cfg.variant == "cirkd":
        base = 128 if basic else (256 if cfg.head == "deeplabv3" else 512)
    elif cfg.variant == "mmseg":
        base = 128 if basic else 512
    else:
        base = 256 if cfg.head == "deeplabv3" else 512
    return _scaled(base, cfg.width, 16)


def aux_channels(cfg: ModelConfig, backbone: ResNet) -> int:
    """The aux head's channels: `cfg.aux_channels`, else 256 x width (torchvision), layer3's
    channels / 4 (cirkd: models/deeplabv3.py `_FCNHead`, line 59, on in_channels // 2) or, for
    mmseg, 256 x width for ResNet-50/101 (the _base_ configs' `auxiliary_head`, line 41) and
    64 x width for ResNet-18/34 (the r18-d8 configs: `channels=64`)."""
    if cfg.aux_channels is not None:
        return cfg.aux_channels
    if cfg.variant == "cirkd":
        return max(1, backbone.out_channels["layer3"] // 4)
    if cfg.variant == "mmseg" and (
        not isinstance(backbone, ResNet) or backbone.layer4[0].expansion == 1
    ):
        return _scaled(64, cfg.width, 16)
    return _scaled(256, cfg.width, 16)


def _print_report(path: str, report: dict[str, list[str]]) -> None:
    counts = ", ".join(f"{len(report[k])} {k}" for k in ("missing", "unexpected", "mismatched"))
    print(f"loaded pretrained backbone from {path}: {counts}")
    for kind, keys in report.items():
        if keys:
            more = f" (+{len(keys) - _REPORT_NAMES} more)" if len(keys) > _REPORT_NAMES else ""
            print(f"  {kind}: {', '.join(keys[:_REPORT_NAMES])}{more}")


def _build_segformer(cfg: ModelConfig, num_classes: int) -> SegFormerModel:
    if cfg.head != "segformer":
        raise ValueError(f"head: MiT backbones take the segformer head, got '{cfg.head}'")
    if cfg.output_stride not in MIT_STRIDES:
        raise ValueError(
            f"output_stride: MiT supports {sorted(MIT_STRIDES)}, got {cfg.output_stride}"
        )
    encoder = build_mit(cfg.backbone, cfg.width, MIT_STRIDES[cfg.output_stride], cfg.drop_path)
    if cfg.pretrained:
        report = load_pretrained_mit(encoder, cfg.pretrained, cfg.pretrained_partial)
        _print_report(cfg.pretrained, report)
    head = SegFormerHead(encoder.out_channels, num_classes, _scaled(256, cfg.width, 16))
    model = SegFormerModel(encoder, head, num_classes, cfg.cls_head)
    model.name = f"segformer-{cfg.backbone} x{cfg.width:g}"
    return model


def architecture(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without its pretrained file: for a model whose weights are loaded right after it
    is built (a checkpoint, a teacher), which then needs neither the file nor the time."""
    return dataclasses.replace(cfg, pretrained=None)


def build_model(cfg: ModelConfig, num_classes: int) -> SegmentationModel | SegFormerModel:
    """The network described by `cfg`, with `cfg.pretrained` loaded into its backbone when set.

    Raises ValueError naming the field for an unknown backbone or head, or naming the file
    when the pretrained weights cannot be loaded. `pretrained: synthetic` is resolved to a file
    before this (components/training/pretrain.resolve_pretrained, which the training runs call).
    """
    if cfg.pretrained == SYNTHETIC_PRETRAINED:
        raise ValueError(
            f"pretrained: '{SYNTHETIC_PRETRAINED}' names the synthetic pretraining stage's file, "
            "made by components.training.pretrain.resolve_pretrained before a model is built"
        )
    if cfg.backbone in MITS:
        return _build_segformer(cfg, num_classes)
    variant = cfg.variant
    backbone = build_backbone(cfg.backbone, cfg.width, cfg.output_stride, variant)
    in_channels = backbone.out_channels["layer4"]
    channels = head_channels(cfg, backbone)
    match cfg.head:
        case "deeplabv3":
            rates = (12, 24, 36) if cfg.output_stride == 8 else (6, 12, 18)
            head: DeepLabV3Head | PSPHead = DeepLabV3Head(
                in_channels, num_classes, channels, rates, variant
            )
        case "pspnet":
            head = PSPHead(in_channels, num_classes, channels, variant=variant)
        case _:
            raise ValueError(f"head: unknown '{cfg.head}', expected one of {HEADS}")
    aux_head = None
    if cfg.aux_head:
        aux_in = backbone.out_channels["layer3"]
        aux_head = FCNAuxHead(aux_in, num_classes, aux_channels(cfg, backbone), variant)
    if cfg.pretrained:
        report = load_pretrained_backbone(backbone, cfg.pretrained, cfg.pretrained_partial)
        _print_report(cfg.pretrained, report)
    model = SegmentationModel(backbone, head, num_classes, aux_head)
    model.name = f"{cfg.head}-{cfg.backbone} x{cfg.width:g}"
    if variant != "torchvision":
        model.name += f" ({variant})"
    return model
