"""Whole-network checkpoints saved in another code base's layout, renamed to ours.

    state = convert_state_dict(torch.load(path, weights_only=True), model)
    model.load_state_dict(state)

`state` may also be a whole checkpoint dict holding it under "state_dict" (or "model").
Layouts recognised (tried in this order: NVlabs / HuggingFace SegFormer, cirkd, torchvision,
mmseg, segdistill; the SegFormer ones, for MiT models, are components/models/convert_segformer.py):

- "segdistill": ours (`backbone.*`, `head.*`, `aux_head.*`); returned unchanged but for a DDP
  "module." prefix, so the strict load that follows reports any difference as before.
- "cirkd": a state_dict saved by winycg/CIRKD's train scripts (`pretrained.*` for the ResNetV1s
  backbone, `head.*`, `auxlayer.*`), e.g. its released `deeplabv3_resnet101_citys_best_model.pth`
  and the students. It fits a model built with `variant: cirkd` (and the head widths of the
  code that saved it: `head_channels` / `aux_channels`). Names, after CIRKD's models/segbase.py
  (`self.pretrained`, line 24), models/deeplabv3.py (`_DeepLabHead`, `_ASPP`, `_FCNHead`) and
  models/pspnet.py (`_PSPHead`, `_PyramidPooling`) at commit 7e0d21f:

      pretrained.X                      -> backbone.X
      head.aspp.b0.{0,1}.               -> head.aspp.branches.0.{0,1}.
      head.aspp.b{1,2,3}.block.{0,1}.   -> head.aspp.branches.{1,2,3}.{0,1}.
      head.aspp.b4.gap.{1,2}.           -> head.aspp.branches.4.conv.{0,1}.   (gap.0 is the pool)
      head.aspp.project.{0,1}.          -> head.aspp.project.0.{0,1}.
      head.block.{0,1}. (DeepLabV3)     -> head.conv.{0,1}.
      head.block.4. (DeepLabV3)         -> head.classifier.                   (block.3: dropout)
      head.psp.conv{1..4}.{0,1}.        -> head.stages.{0..3}.conv.{0,1}.
      head.block.{0,1}. (PSPNet)        -> head.bottleneck.{0,1}.
      head.classifier. (PSPNet)         -> head.classifier.
      auxlayer.block.{0,1}.             -> aux_head.conv.{0,1}.
      auxlayer.block.4.                 -> aux_head.classifier.
      pretrained.net.features.0.{0,1}.  -> backbone.features.0.{0,1}.          (MobileNetV2)
      pretrained.net.features.{i}.conv.{j}. -> backbone.features.{i}.conv.{j'}. (torchvision's
          nesting: block 1 j 0,1,3,4 -> 0.0, 0.1, 1, 2; blocks 2-17 j 0,1,3,4,6,7 -> 0.0, 0.1,
          1.0, 1.1, 2, 3; components/models/mobilenet.py `cirkd_block_key`)

- "torchvision": torchvision's `deeplabv3_resnet50` / `deeplabv3_resnet101` (e.g. the released
  `deeplabv3_resnet50_coco-cd0a2569.pth`; torchvision 0.28.0 torchvision/models/segmentation/
  deeplabv3.py: `DeepLabHead` lines 49-57, `ASPPConv` 60-67, `ASPPPooling` 70-83, `ASPP` 86-114,
  `_deeplabv3_resnet` 117-129; fcn.py `FCNHead` lines 36-47, the aux classifier; the backbone
  is torchvision's ResNet with replace_stride_with_dilation=[False, True, True], deeplabv3.py
  lines 275 and 331, under `IntermediateLayerGetter`, which keeps the ResNet's names). It fits
  the default `variant: torchvision` at width 1, output stride 8 (model.aux_head=true for a
  file with aux_classifier.*, which torchvision's released files have):

      backbone.X                        -> backbone.X                  (conv1, bn1, layer1..4)
      classifier.0.convs.0.{0,1}.       -> head.aspp.branches.0.{0,1}.    (1x1 branch)
      classifier.0.convs.{1,2,3}.{0,1}. -> head.aspp.branches.{1,2,3}.{0,1}. (ASPPConv)
      classifier.0.convs.4.1.weight + classifier.0.convs.4.2.* (ASPPPooling conv, BatchNorm)
                                        -> head.aspp.branches.4.conv.0.{weight,bias}  (folded)
      classifier.0.project.{0,1}.       -> head.aspp.project.0.{0,1}.
      classifier.{1,2}.                 -> head.conv.{0,1}.
      classifier.4.                     -> head.classifier.
      aux_classifier.{0,1}.             -> aux_head.conv.{0,1}.
      aux_classifier.4.                 -> aux_head.classifier.       (.3 is the dropout)

  Our pooled branch is a conv with bias and no BatchNorm (heads.py `_PoolBranch`), so
  torchvision's BatchNorm (eps 1e-5, nn.BatchNorm2d's default) is folded into the conv with its
  running statistics: W' = W * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps) per output
  channel. That is exact in eval mode, which is how a teacher, evaluate.py and predict run it;
  fine-tuning such a model trains the folded conv (no BatchNorm on that branch), not
  torchvision's conv + BatchNorm. The BatchNorm's num_batches_tracked is dropped by the fold.
  The pooled branch converts only whole (the conv and the four BatchNorm tensors).
- "mmseg": mmsegmentation's ResNetV1c DeepLabV3 (`ASPPHead`) / PSPNet (`PSPHead`) with the
  `FCNHead` auxiliary head, e.g. the released deeplabv3_r101-d8 / pspnet_r101-d8 Cityscapes
  files (open-mmlab/mmsegmentation v1.2.2; mmcv `ConvModule` names its parts `conv` and `bn`).
  It fits a model built with `variant: mmseg` (and the head widths of the config that trained
  it). A file holding {"meta": ..., "state_dict": ...} (mmseg's) is unwrapped first:

      backbone.stem.{0,1,3,4,6,7}.      -> backbone.{conv1,bn1,conv2,bn2,conv3,bn3}.
                                           (mmseg/models/backbones/resnet.py lines 591-624)
      backbone.X (layer1..4)            -> backbone.X
      decode_head.image_pool.1.{conv,bn}.   -> head.aspp.branches.4.conv.{0,1}.
      decode_head.aspp_modules.{i}.{conv,bn}. -> head.aspp.branches.{i}.{0,1}.  (i = 0..3)
      decode_head.bottleneck.{conv,bn}. (ASPPHead) -> head.conv.{0,1}.
                                           (decode_heads/aspp_head.py lines 65-116)
      decode_head.psp_modules.{i}.1.{conv,bn}. -> head.stages.{i}.conv.{0,1}.
      decode_head.bottleneck.{conv,bn}. (PSPHead) -> head.bottleneck.{0,1}.
                                           (decode_heads/psp_head.py lines 25-111)
      decode_head.conv_seg.             -> head.classifier.      (decode_head.py line 157)
      auxiliary_head.convs.0.{conv,bn}. -> aux_head.conv.{0,1}.  (decode_heads/fcn_head.py 38-64)
      auxiliary_head.conv_seg.          -> aux_head.classifier.

A converted file that leaves a model tensor out, holds one in another shape, or has a tensor the
model has no place for is a ValueError naming them, unless `partial` (then only the tensors
that fit are returned; load them with strict=False). A file in none of the layouts is a
ValueError naming its first keys and the layouts tried.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor, nn

from components.models.convert_segformer import (
    SEGFORMER_LAYOUTS,
    convert_segformer_state_dict,
    detect_segformer_layout,
)
from components.models.heads import PSPHead
from components.models.mobilenet import cirkd_block_key
from components.models.resnet import stem_key
from components.models.statedict import names, strip_module, unwrap


def _mobilenet_block(m: re.Match, key: str) -> str | None:
    """pretrained.net.features.{i}.conv.{j}.X (CIRKD) -> backbone.features.{i}.conv.{j'}.X."""
    sub = cirkd_block_key(int(m.group(1)), int(m.group(2)))
    return None if sub is None else f"backbone.features.{m.group(1)}.conv.{sub}." + key[m.end() :]


# (pattern, replacement) on a CIRKD key; the first match wins. DeepLabV3 and PSPNet both name
# their head's conv block `head.block`, so the rules depend on the head the model has.
_CIRKD_COMMON = (
    # MobileNetV2 (models/base_models/mobilenetv2.py: `MobileNetV2Dilated.net`): the stem keeps
    # its names, the blocks' flat `conv.{j}` become torchvision's nesting (mobilenet.py).
    (r"^pretrained\.net\.features\.0\.([01])\.", r"backbone.features.0.\1."),
    (r"^pretrained\.net\.features\.(\d+)\.conv\.(\d+)\.", _mobilenet_block),
    (r"^pretrained\.", "backbone."),
    (r"^auxlayer\.block\.([01])\.", r"aux_head.conv.\1."),
    (r"^auxlayer\.block\.4\.", "aux_head.classifier."),
)
_CIRKD_DEEPLABV3 = (
    (r"^head\.aspp\.b0\.([01])\.", r"head.aspp.branches.0.\1."),
    (r"^head\.aspp\.b([123])\.block\.([01])\.", r"head.aspp.branches.\1.\2."),
    (r"^head\.aspp\.b4\.gap\.1\.", "head.aspp.branches.4.conv.0."),
    (r"^head\.aspp\.b4\.gap\.2\.", "head.aspp.branches.4.conv.1."),
    (r"^head\.aspp\.project\.([01])\.", r"head.aspp.project.0.\1."),
    (r"^head\.block\.([01])\.", r"head.conv.\1."),
    (r"^head\.block\.4\.", "head.classifier."),
)
_CIRKD_PSPNET = (
    (r"^head\.psp\.conv([1-4])\.([01])\.", None),  # conv{n} -> stages.{n-1}: see _rename
    (r"^head\.block\.([01])\.", r"head.bottleneck.\1."),
    (r"^head\.classifier\.", "head.classifier."),
)

# torchvision's deeplabv3_resnet50/101 (deeplabv3.py, fcn.py; see the module docstring). The
# pooled branch's conv + BatchNorm are folded first (`_fold_pooled_bn`) into `_FOLDED`.
_TV_POOL = "classifier.0.convs.4."
_FOLDED = _TV_POOL + "folded."


def _tv_head_conv(m: re.Match, key: str) -> str:
    """classifier.{1,2}.X (DeepLabHead's 3x3 conv, BatchNorm) -> head.conv.{0,1}.X."""
    return f"head.conv.{int(m.group(1)) - 1}." + key[m.end() :]


_BN_EPS = 1e-5  # nn.BatchNorm2d's default, as torchvision's ASPPPooling (deeplabv3.py line 75)
_TORCHVISION = (
    (r"^backbone\.", "backbone."),
    (r"^classifier\.0\.convs\.([0-3])\.([01])\.", r"head.aspp.branches.\1.\2."),
    (r"^classifier\.0\.convs\.4\.folded\.", "head.aspp.branches.4.conv.0."),
    (r"^classifier\.0\.project\.([01])\.", r"head.aspp.project.0.\1."),
    (r"^classifier\.([12])\.", _tv_head_conv),
    (r"^classifier\.4\.", "head.classifier."),
    (r"^aux_classifier\.([01])\.", r"aux_head.conv.\1."),
    (r"^aux_classifier\.4\.", "aux_head.classifier."),
)


def _mmseg_stem(m: re.Match, key: str) -> str:
    """backbone.stem.{0,1,3,4,6,7}.X (mmseg's ResNetV1c) -> backbone.{conv1,...,bn3}.X."""
    return "backbone." + stem_key(key[len("backbone.") :])


# mmseg's EncoderDecoder: backbone (ResNetV1c), decode_head, auxiliary_head (FCNHead); mmcv's
# ConvModule names its conv `conv` and its norm `bn`.
_MMSEG_COMMON = (
    (r"^backbone\.stem\.", _mmseg_stem),
    (r"^backbone\.", "backbone."),
    (r"^auxiliary_head\.convs\.0\.conv\.", "aux_head.conv.0."),
    (r"^auxiliary_head\.convs\.0\.bn\.", "aux_head.conv.1."),
    (r"^auxiliary_head\.conv_seg\.", "aux_head.classifier."),
    (r"^decode_head\.conv_seg\.", "head.classifier."),
)
_MMSEG_DEEPLABV3 = (
    (r"^decode_head\.image_pool\.1\.conv\.", "head.aspp.branches.4.conv.0."),
    (r"^decode_head\.image_pool\.1\.bn\.", "head.aspp.branches.4.conv.1."),
    (r"^decode_head\.aspp_modules\.([0-3])\.conv\.", r"head.aspp.branches.\1.0."),
    (r"^decode_head\.aspp_modules\.([0-3])\.bn\.", r"head.aspp.branches.\1.1."),
    (r"^decode_head\.bottleneck\.conv\.", "head.conv.0."),
    (r"^decode_head\.bottleneck\.bn\.", "head.conv.1."),
)
_MMSEG_PSPNET = (
    (r"^decode_head\.psp_modules\.(\d+)\.1\.conv\.", r"head.stages.\1.conv.0."),
    (r"^decode_head\.psp_modules\.(\d+)\.1\.bn\.", r"head.stages.\1.conv.1."),
    (r"^decode_head\.bottleneck\.conv\.", "head.bottleneck.0."),
    (r"^decode_head\.bottleneck\.bn\.", "head.bottleneck.1."),
)

LAYOUTS = {
    "segdistill": "backbone.*, head.*, aux_head.*",
    "cirkd": "pretrained.*, head.aspp.* or head.psp.*, auxlayer.*",
    "torchvision": "backbone.*, classifier.0.convs.*, aux_classifier.*",
    "mmseg": "backbone.stem.*, decode_head.*, auxiliary_head.*",
}

# What to check when a file of the layout does not fit (the end of the error message).
_HINTS = {
    "cirkd": "For CIRKD files: model.variant=cirkd, the backbone and head it was trained with, "
    "model.head_channels / model.aux_channels as its code (CIRKDv2: DeepLabV3 512), "
    "model.aux_head=true for a file with auxlayer.*",
    "torchvision": "For torchvision's deeplabv3_resnet50/101: model.variant=torchvision, "
    "model.head=deeplabv3, model.width=1, model.output_stride=8, model.head_channels and "
    "model.aux_channels null (256), model.aux_head=true for a file with aux_classifier.*; the "
    "pooled branch (classifier.0.convs.4.1 + 4.2) converts only whole",
    "mmseg": "For mmsegmentation files: model.variant=mmseg, the backbone and head of its config, "
    "model.head_channels / model.aux_channels as its decode_head / auxiliary_head channels, "
    "model.aux_head=true for a file with auxiliary_head.*",
}


def detect_layout(state: Mapping[str, Tensor]) -> str | None:
    """One of LAYOUTS' names or None, from the key names alone."""
    keys = list(state)
    if any(k.startswith("pretrained.") for k in keys) and any(
        k.startswith(("head.aspp.", "head.psp.")) for k in keys
    ):
        return "cirkd"
    backbone = any(k.startswith("backbone.") for k in keys)
    if backbone and any(k.startswith("classifier.0.convs.") for k in keys):
        return "torchvision"
    if backbone and any(k.startswith("decode_head.") for k in keys):
        return "mmseg"
    ours = backbone and any(k.startswith("head.") for k in keys)
    others = any(
        k.startswith(("pretrained.", "classifier.", "aux_classifier.", "decode_head."))
        for k in keys
    )
    return "segdistill" if ours and not others else None


def _fold_pooled_bn(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision's ASPPPooling conv (no bias, `classifier.0.convs.4.1`) and BatchNorm
    (`classifier.0.convs.4.2`) as one biased conv with the BatchNorm's eval-mode affine map,
    under `classifier.0.convs.4.folded.{weight,bias}`. Computed in float64, stored in the
    conv's dtype. Unchanged when a part is missing or the shapes disagree (the parts are then
    reported as having no place, the conv's tensors as missing)."""
    conv = _TV_POOL + "1.weight"
    parts = [_TV_POOL + f"2.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var")]
    if conv not in state or any(k not in state for k in parts):
        return state
    w = state[conv]
    gamma, beta, mean, var = (state[k] for k in parts)
    if w.dim() != 4 or any(t.shape != (w.shape[0],) for t in (gamma, beta, mean, var)):
        return state
    out = {k: v for k, v in state.items() if k != conv and k not in parts}
    out.pop(_TV_POOL + "2.num_batches_tracked", None)
    scale = gamma.double() / (var.double() + _BN_EPS).sqrt()
    out[_FOLDED + "weight"] = (w.double() * scale[:, None, None, None]).to(w.dtype)
    out[_FOLDED + "bias"] = (beta.double() - mean.double() * scale).to(w.dtype)
    return out


def _rename(key: str, rules: tuple) -> str | None:
    for pattern, repl in rules:
        m = re.match(pattern, key)
        if m is None:
            continue
        if callable(repl):
            return repl(m, key)
        if repl is None:  # head.psp.conv{n}.{i}. -> head.stages.{n-1}.conv.{i}.
            return f"head.stages.{int(m.group(1)) - 1}.conv.{m.group(2)}." + key[m.end() :]
        return re.sub(pattern, repl, key, count=1)
    return None


def convert_state_dict(
    state: Mapping[str, Tensor], model: nn.Module, partial: bool = False
) -> dict[str, Tensor]:
    """`state` (a checkpoint's state_dict, in any layout of the module docstring) with our key
    names for `model`. See the module docstring for the mapping and the errors."""
    state = strip_module(unwrap(state))
    if detect_segformer_layout(state) is not None:  # NVlabs' or HuggingFace's SegFormer
        return convert_segformer_state_dict(state, model, partial)
    layout = detect_layout(state)
    if layout == "segdistill":
        return state
    if layout is None:
        every = LAYOUTS | SEGFORMER_LAYOUTS
        tried = "; ".join(f"{name} ({keys})" for name, keys in every.items())
        raise ValueError(
            f"unrecognised checkpoint layout: first keys {names(list(state))}; layouts tried: "
            f"{tried}"
        )
    psp = isinstance(getattr(model, "head", None), PSPHead)
    if layout == "cirkd":
        rules = _CIRKD_COMMON + (_CIRKD_PSPNET if psp else _CIRKD_DEEPLABV3)
    elif layout == "torchvision":
        state = _fold_pooled_bn(state)
        rules = _TORCHVISION
    else:
        rules = _MMSEG_COMMON + (_MMSEG_PSPNET if psp else _MMSEG_DEEPLABV3)
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    unmatched: list[str] = []  # file keys no rule names, or named to a key the model lacks
    for key, value in state.items():
        new = _rename(key, rules)
        if new is None or new not in own:
            unmatched.append(key if new is None else f"{key} (-> {new})")
        else:
            converted[new] = value
    mismatched = [k for k, v in converted.items() if own[k].shape != v.shape]
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    if not partial and (unmatched or mismatched or missing):
        shapes = "; ".join(
            f"{k} {tuple(converted[k].shape)} here {tuple(own[k].shape)}" for k in mismatched[:3]
        )
        raise ValueError(
            f"a {layout}-layout checkpoint fits this model only in part: {len(missing)} model "
            f"tensor(s) missing ({names(missing) or '-'}), {len(mismatched)} of another shape "
            f"({shapes or '-'}), {len(unmatched)} file tensor(s) with no place here "
            f"({names(unmatched) or '-'}). {_HINTS[layout]}"
        )
    return {k: v for k, v in converted.items() if own[k].shape == v.shape}
