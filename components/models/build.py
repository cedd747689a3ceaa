"""Build a segmentation network from a `ModelConfig`.

    model = build_model(cfg.model, num_classes=19)
    out = model(images)                     # images: (B, 3, H, W)
    out["logits"]                           # (B, K, H/OS, W/OS), not upsampled
    out["features"]["low" | "high" | "embed"]
    out["aux_logits"]                       # (B, K, H/OS, W/OS), training mode with an aux head only

Logits stay at the backbone's output stride: callers upsample them (to the label size for the
loss, to the image size for evaluation), so distillation losses can compare maps at that size.
"""

from __future__ import annotations

from torch import Tensor, nn

from components.config import BACKBONES, HEADS, ModelConfig
from components.models.heads import DeepLabV3Head, FCNAuxHead, PSPHead
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


def _scaled(channels: int, width: float, minimum: int) -> int:
    return max(minimum, round(channels * width))


def build_backbone(name: str, width: float = 1.0, output_stride: int = 8) -> ResNet:
    """A randomly initialised ResNet by name (one of components.config.BACKBONES)."""
    match name:
        case "resnet18":
            return ResNet(BasicBlock, (2, 2, 2, 2), width, output_stride)
        case "resnet34":
            return ResNet(BasicBlock, (3, 4, 6, 3), width, output_stride)
        case "resnet50":
            return ResNet(Bottleneck, (3, 4, 6, 3), width, output_stride)
        case "resnet101":
            return ResNet(Bottleneck, (3, 4, 23, 3), width, output_stride)
        case _:
            raise ValueError(f"backbone: unknown '{name}', expected one of {BACKBONES}")


def _print_report(path: str, report: dict[str, list[str]]) -> None:
    counts = ", ".join(f"{len(report[k])} {k}" for k in ("missing", "unexpected", "mismatched"))
    print(f"loaded pretrained backbone from {path}: {counts}")
    for kind, keys in report.items():
        if keys:
            more = f" (+{len(keys) - _REPORT_NAMES} more)" if len(keys) > _REPORT_NAMES else ""
            print(f"  {kind}: {', '.join(keys[:_REPORT_NAMES])}{more}")


def build_model(cfg: ModelConfig, num_classes: int) -> SegmentationModel:
    """The network described by `cfg`, with `cfg.pretrained` loaded into its backbone when set.

    Raises ValueError naming the field for an unknown backbone or head, or naming the file
    when the pretrained weights cannot be loaded.
    """
    backbone = build_backbone(cfg.backbone, cfg.width, cfg.output_stride)
    in_channels = backbone.out_channels["layer4"]
    match cfg.head:
        case "deeplabv3":
            rates = (12, 24, 36) if cfg.output_stride == 8 else (6, 12, 18)
            channels = _scaled(256, cfg.width, 16)
            head: DeepLabV3Head | PSPHead = DeepLabV3Head(in_channels, num_classes, channels, rates)
        case "pspnet":
            head = PSPHead(in_channels, num_classes, _scaled(512, cfg.width, 16))
        case _:
            raise ValueError(f"head: unknown '{cfg.head}', expected one of {HEADS}")
    aux_head = None
    if cfg.aux_head:
        aux_in = backbone.out_channels["layer3"]
        aux_head = FCNAuxHead(aux_in, num_classes, _scaled(256, cfg.width, 16))
    if cfg.pretrained:
        _print_report(cfg.pretrained, load_pretrained_backbone(backbone, cfg.pretrained))
    model = SegmentationModel(backbone, head, num_classes, aux_head)
    model.name = f"{cfg.head}-{cfg.backbone} x{cfg.width:g}"
    return model
