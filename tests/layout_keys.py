"""Key/shape listings of torchvision's and mmsegmentation's segmentation networks, written from
their code (not imported), for tests/models/test_checkpoint_layouts.py:

- torchvision 0.28.0 (the PyPI wheel): torchvision/models/resnet.py (`ResNet.__init__` lines
  197-204: conv1 7x7 3->64, bn1, layer1..4; `Bottleneck` lines 133-138: conv1 1x1, conv2 3x3,
  conv3 1x1 x4, bn1..3; `_make_layer` lines 225-264: a `downsample` (1x1 conv, BN) on the first
  block when the stride or the channels change), torchvision/models/segmentation/deeplabv3.py
  (`DeepLabHead` lines 49-57, `ASPPConv` 60-67, `ASPPPooling` 70-83, `ASPP` 86-114,
  `_deeplabv3_resnet` 117-129: FCNHead(1024) on layer3 as `aux_classifier`, DeepLabHead(2048) as
  `classifier`) and segmentation/fcn.py (`FCNHead` lines 36-47: in -> in // 4).
- open-mmlab/mmsegmentation v1.2.2 (the PyPI wheel; the same modules and names as the 0.x code
  that trained the released "-d8" models): mmseg/models/backbones/resnet.py (`BasicBlock` lines
  14-50, `Bottleneck` lines 164-209 with mmcv's norm names bn1..bn3, `_make_stem_layer` lines
  591-624: `stem` = conv 3->32 /2, BN, ReLU, conv 32->32, BN, ReLU, conv 32->64, BN, ReLU),
  mmseg/models/utils/res_layer.py (lines 43-65: downsample 1x1 conv + BN), decode_heads/
  aspp_head.py (lines 23-92), psp_head.py (lines 25-93), fcn_head.py (lines 38-64),
  decode_head.py (line 157: `conv_seg`); mmcv's ConvModule holds `conv` (no bias under a norm)
  and `bn`.

Every function takes the channel counts, so tests can list a network at a small width with the
real key names; the defaults are the released sizes. Shapes only: nothing is allocated.
"""

from __future__ import annotations

from cirkd_keys import bn

Shapes = dict[str, tuple[int, ...]]
BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def _stages(out: Shapes, p: str, depth: int, base: int, inplanes: int) -> int:
    """layer1..4 of a torchvision / mmseg ResNet (the same names in both), under prefix `p`.
    Returns layer3's output channels."""
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    layer3 = 0
    for i, n in enumerate(BLOCKS[depth], start=1):
        planes = base * 2 ** (i - 1)
        for b in range(n):
            q = f"{p}layer{i}.{b}"
            cin = inplanes if b == 0 else planes * expansion
            if bottleneck:
                out[f"{q}.conv1.weight"] = (planes, cin, 1, 1)
                bn(out, f"{q}.bn1", planes)
                out[f"{q}.conv2.weight"] = (planes, planes, 3, 3)
                bn(out, f"{q}.bn2", planes)
                out[f"{q}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(out, f"{q}.bn3", planes * 4)
            else:
                out[f"{q}.conv1.weight"] = (planes, cin, 3, 3)
                bn(out, f"{q}.bn1", planes)
                out[f"{q}.conv2.weight"] = (planes, planes, 3, 3)
                bn(out, f"{q}.bn2", planes)
            # stride 2 on layers 2-4 in the code that builds them (dilated later or not)
            if b == 0 and (i > 1 or cin != planes * expansion):
                out[f"{q}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                bn(out, f"{q}.downsample.1", planes * expansion)
        inplanes = planes * expansion
        if i == 3:
            layer3 = inplanes
    return layer3


def torchvision_deeplabv3(
    depth: int = 50, base: int = 64, head: int = 256, nclass: int = 21, aux: bool = True
) -> Shapes:
    """torchvision's deeplabv3_resnet{depth}(aux_loss=aux): `backbone.*` (ResNet without fc),
    `classifier.*` (DeepLabHead; ASPP width `head`, 256 in torchvision), `aux_classifier.*`."""
    out: Shapes = {}
    out["backbone.conv1.weight"] = (base, 3, 7, 7)
    bn(out, "backbone.bn1", base)
    layer3 = _stages(out, "backbone.", depth, base, base)
    layer4 = 2 * layer3
    a = "classifier.0"
    out[f"{a}.convs.0.0.weight"] = (head, layer4, 1, 1)
    bn(out, f"{a}.convs.0.1", head)
    for j in (1, 2, 3):  # ASPPConv per rate (12, 24, 36)
        out[f"{a}.convs.{j}.0.weight"] = (head, layer4, 3, 3)
        bn(out, f"{a}.convs.{j}.1", head)
    out[f"{a}.convs.4.1.weight"] = (head, layer4, 1, 1)  # ASPPPooling: .0 is the pool
    bn(out, f"{a}.convs.4.2", head)
    out[f"{a}.project.0.weight"] = (head, 5 * head, 1, 1)
    bn(out, f"{a}.project.1", head)
    out["classifier.1.weight"] = (head, head, 3, 3)
    bn(out, "classifier.2", head)
    out["classifier.4.weight"] = (nclass, head, 1, 1)
    out["classifier.4.bias"] = (nclass,)
    if aux:  # FCNHead(layer3): 3x3 in -> in // 4, BN, ReLU, Dropout, 1x1
        inter = layer3 // 4
        out["aux_classifier.0.weight"] = (inter, layer3, 3, 3)
        bn(out, "aux_classifier.1", inter)
        out["aux_classifier.4.weight"] = (nclass, inter, 1, 1)
        out["aux_classifier.4.bias"] = (nclass,)
    return out


def mmseg_resnet_v1c(depth: int = 50, base: int = 64, prefix: str = "backbone.") -> Shapes:
    """mmseg's ResNetV1c (stem_channels = base_channels = `base`): the deep stem, layer1..4.
    prefix "" and fc=... is the ImageNet file's layout (`mmseg_imagenet_v1c`)."""
    out: Shapes = {}
    half = base // 2
    out[f"{prefix}stem.0.weight"] = (half, 3, 3, 3)
    bn(out, f"{prefix}stem.1", half)
    out[f"{prefix}stem.3.weight"] = (half, half, 3, 3)
    bn(out, f"{prefix}stem.4", half)
    out[f"{prefix}stem.6.weight"] = (base, half, 3, 3)
    bn(out, f"{prefix}stem.7", base)
    _stages(out, prefix, depth, base, base)
    return out


def mmseg_imagenet_v1c(depth: int = 50, base: int = 64) -> Shapes:
    """open-mmlab://resnet{depth}_v1c: the backbone's keys at the top level plus `fc.*`."""
    out = mmseg_resnet_v1c(depth, base, prefix="")
    c = base * 8 * (4 if depth >= 50 else 1)
    out["fc.weight"] = (1000, c)
    out["fc.bias"] = (1000,)
    return out


def _conv_module(out: Shapes, name: str, cout: int, cin: int, k: int) -> None:
    out[f"{name}.conv.weight"] = (cout, cin, k, k)
    bn(out, f"{name}.bn", cout)


def mmseg_segmentor(
    head: str,
    depth: int = 50,
    base: int = 64,
    channels: int = 512,
    aux_channels: int = 256,
    nclass: int = 19,
    aux: bool = True,
) -> Shapes:
    """mmseg's EncoderDecoder of configs/_base_/models/{deeplabv3,pspnet}_r50-d8.py (depth 50,
    channels 512, aux 256, 19 classes) at any depth / widths: backbone, decode_head (ASPPHead
    with dilations (1, 12, 24, 36) or PSPHead with pool_scales (1, 2, 3, 6)), auxiliary_head
    (FCNHead, num_convs=1, concat_input=False)."""
    out = mmseg_resnet_v1c(depth, base)
    layer3 = base * 4 * (4 if depth >= 50 else 1)
    layer4 = 2 * layer3
    d = "decode_head"
    if head == "deeplabv3":
        _conv_module(out, f"{d}.image_pool.1", channels, layer4, 1)  # .0 is the pool
        _conv_module(out, f"{d}.aspp_modules.0", channels, layer4, 1)  # dilation 1: 1x1
        for j in (1, 2, 3):
            _conv_module(out, f"{d}.aspp_modules.{j}", channels, layer4, 3)
        _conv_module(out, f"{d}.bottleneck", channels, 5 * channels, 3)
    else:
        for j in range(4):
            _conv_module(out, f"{d}.psp_modules.{j}.1", channels, layer4, 1)
        _conv_module(out, f"{d}.bottleneck", channels, layer4 + 4 * channels, 3)
    out[f"{d}.conv_seg.weight"] = (nclass, channels, 1, 1)
    out[f"{d}.conv_seg.bias"] = (nclass,)
    if aux:
        _conv_module(out, "auxiliary_head.convs.0", aux_channels, layer3, 3)
        out["auxiliary_head.conv_seg.weight"] = (nclass, aux_channels, 1, 1)
        out["auxiliary_head.conv_seg.bias"] = (nclass,)
    return out
