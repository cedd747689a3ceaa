"""Checkpoints in torchvision's and mmsegmentation's layouts, and the `mmseg` model variant.

The state_dicts here come from tests/layout_keys.py (key/shape listings written from
torchvision's and mmseg's code; see its docstring for the files and lines), filled with random
values. `tv_forward` / `mmseg_forward` are independent functional forwards over those key names,
written from the same code (eval mode), so "same output" means the converted model computes what
the original network computes. Neither imports our model code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layout_keys import (
    BLOCKS,
    mmseg_imagenet_v1c,
    mmseg_segmentor,
    torchvision_deeplabv3,
)
from torch import nn

from components.config import ConfigError, ModelConfig, load_config
from components.models.build import build_model
from components.models.convert import LAYOUTS, convert_state_dict, detect_layout

NCLASS = 19
Shapes = dict[str, tuple[int, ...]]


def _is_param(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_state(shapes: Shapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of `shapes`: BatchNorm scales and variances in [0.5, 1.5), other weights
    ~ N(0, 1 / fan_in), so activations keep their scale through the network."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight")):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            fan_in = _numel(shape[1:]) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def meta_state(shapes: Shapes) -> dict[str, torch.Tensor]:
    """Full-size shapes without memory: tensors on the meta device."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


# -- independent reference forwards (eval mode) -------------------------------------------------


def _conv(x, w, stride=1, dilation=1, bias=None):
    pad = dilation * (w.shape[-1] // 2)
    return F.conv2d(x, w, bias, stride, pad, dilation)


def _bn(x, s, name, relu=True):
    y = F.batch_norm(
        x,
        s[f"{name}.running_mean"],
        s[f"{name}.running_var"],
        s[f"{name}.weight"],
        s[f"{name}.bias"],
        False,
        0.0,
        1e-5,
    )
    return F.relu(y) if relu else y


# Output stride 8, per stage: (stride, dilation of the first block, dilation of the others).
# torchvision: replace_stride_with_dilation=[False, True, True], `_make_layer` gives the first
# block the previous dilation (resnet.py lines 235-249). mmseg: strides (1, 2, 1, 1), dilations
# (1, 1, 2, 4), contract_dilation=True: the first block d // 2 (res_layer.py lines 68-72).
# Both give the same numbers.
OS8 = {1: (1, 1, 1), 2: (2, 1, 1), 3: (1, 1, 2), 4: (1, 2, 4)}


def resnet_forward(s, x, depth: int, stem: str) -> dict[str, torch.Tensor]:
    """layer3 and layer4 of torchvision's ResNet (stem "7x7") or mmseg's ResNetV1c ("v1c"),
    over the `backbone.` keys. BasicBlock is mmseg's: its second conv is never dilated."""
    p = "backbone."
    if stem == "7x7":
        x = _bn(_conv(x, s[f"{p}conv1.weight"], 2), s, f"{p}bn1")
    else:
        for conv, norm, stride in (("0", "1", 2), ("3", "4", 1), ("6", "7", 1)):
            x = _bn(_conv(x, s[f"{p}stem.{conv}.weight"], stride), s, f"{p}stem.{norm}")
    x = F.max_pool2d(x, 3, 2, 1)
    feats = {}
    for i, (stride, first, d) in OS8.items():
        for b in range(BLOCKS[depth][i - 1]):
            q = f"{p}layer{i}.{b}"
            st, dil = (stride, first) if b == 0 else (1, d)
            if depth >= 50:
                out = _bn(_conv(x, s[f"{q}.conv1.weight"]), s, f"{q}.bn1")
                out = _bn(_conv(out, s[f"{q}.conv2.weight"], st, dil), s, f"{q}.bn2")
                out = _bn(_conv(out, s[f"{q}.conv3.weight"]), s, f"{q}.bn3", relu=False)
            else:
                out = _bn(_conv(x, s[f"{q}.conv1.weight"], st, dil), s, f"{q}.bn1")
                out = _bn(_conv(out, s[f"{q}.conv2.weight"]), s, f"{q}.bn2", relu=False)
            if f"{q}.downsample.0.weight" in s:
                x = _bn(_conv(x, s[f"{q}.downsample.0.weight"], st), s, f"{q}.downsample.1", False)
            x = F.relu(out + x)
        feats[f"layer{i}"] = x
    return feats


def _up(y, size):
    return F.interpolate(y, size, mode="bilinear", align_corners=False)


def tv_forward(s, x, depth: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """torchvision's DeepLabV3 (deeplabv3.py) and FCNHead aux (fcn.py): (logits, aux logits)
    at the output stride, before torchvision's final upsampling."""
    feats = resnet_forward(s, x, depth, "7x7")
    x = feats["layer4"]
    a = "classifier.0"
    outs = [_bn(_conv(x, s[f"{a}.convs.0.0.weight"]), s, f"{a}.convs.0.1")]
    for j, rate in zip((1, 2, 3), (12, 24, 36), strict=True):
        outs.append(_bn(_conv(x, s[f"{a}.convs.{j}.0.weight"], 1, rate), s, f"{a}.convs.{j}.1"))
    pooled = _conv(F.adaptive_avg_pool2d(x, 1), s[f"{a}.convs.4.1.weight"])
    outs.append(_up(_bn(pooled, s, f"{a}.convs.4.2"), x.shape[-2:]))
    y = _bn(_conv(torch.cat(outs, 1), s[f"{a}.project.0.weight"]), s, f"{a}.project.1")
    y = _bn(_conv(y, s["classifier.1.weight"]), s, "classifier.2")
    logits = _conv(y, s["classifier.4.weight"], bias=s["classifier.4.bias"])
    aux = _bn(_conv(feats["layer3"], s["aux_classifier.0.weight"]), s, "aux_classifier.1")
    return logits, _conv(aux, s["aux_classifier.4.weight"], bias=s["aux_classifier.4.bias"])


def _cm(x, s, name, dilation=1):
    """mmcv ConvModule: conv (no bias), BN, ReLU."""
    return _bn(_conv(x, s[f"{name}.conv.weight"], 1, dilation), s, f"{name}.bn")


def mmseg_forward(s, x, head: str, depth: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg's EncoderDecoder (ASPPHead / PSPHead + FCNHead aux): (logits, aux logits) before
    mmseg's final resize."""
    feats = resnet_forward(s, x, depth, "v1c")
    x = feats["layer4"]
    size = x.shape[-2:]
    d = "decode_head"
    if head == "deeplabv3":  # aspp_head.py lines 105-115: the pooled branch first
        outs = [_up(_cm(F.adaptive_avg_pool2d(x, 1), s, f"{d}.image_pool.1"), size)]
        outs.append(_cm(x, s, f"{d}.aspp_modules.0"))
        for j, rate in zip((1, 2, 3), (12, 24, 36), strict=True):
            outs.append(_cm(x, s, f"{d}.aspp_modules.{j}", rate))
    else:  # psp_head.py lines 48-59 and 106-110
        outs = [x]
        for j, scale in enumerate((1, 2, 3, 6)):
            outs.append(
                _up(_cm(F.adaptive_avg_pool2d(x, scale), s, f"{d}.psp_modules.{j}.1"), size)
            )
    y = _cm(torch.cat(outs, 1), s, f"{d}.bottleneck")
    logits = _conv(y, s[f"{d}.conv_seg.weight"], bias=s[f"{d}.conv_seg.bias"])
    aux = _cm(feats["layer3"], s, "auxiliary_head.convs.0")
    aux_logits = _conv(
        aux, s["auxiliary_head.conv_seg.weight"], bias=s["auxiliary_head.conv_seg.bias"]
    )
    return logits, aux_logits


# -- small models with the real key names ----------------------------------------------------


def _tv_cfg(**kw) -> ModelConfig:
    # width 0.125: base 8, ASPP and aux 32 (torchvision: 64, 256, 256 at full size)
    return ModelConfig(backbone="resnet50", head="deeplabv3", width=0.125, **kw)


def _tv_small() -> Shapes:
    return torchvision_deeplabv3(depth=50, base=8, head=32, nclass=NCLASS)


def _mm_cfg(head: str, backbone: str = "resnet50", **kw) -> ModelConfig:
    width = 0.125 if backbone == "resnet50" else 0.25
    return ModelConfig(backbone=backbone, head=head, variant="mmseg", width=width, **kw)


def _mm_small(head: str, backbone: str = "resnet50") -> Shapes:
    if backbone == "resnet50":  # width 0.125: base 8, head 512 / 8, aux 256 / 8
        return mmseg_segmentor(head, 50, base=8, channels=64, aux_channels=32, nclass=NCLASS)
    # resnet18 at width 0.25: base 16, head 128 / 4, aux 64 / 4 (mmseg's r18-d8 configs)
    return mmseg_segmentor(head, 18, base=16, channels=32, aux_channels=16, nclass=NCLASS)


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1))


def _same_as_our_format(model: nn.Module, cfg: ModelConfig, x: torch.Tensor) -> None:
    """The converted weights saved in our layout (under DDP's prefix) give the same output."""
    ours_format = {f"module.{k}": v for k, v in model.state_dict().items()}
    again = build_model(cfg, NCLASS).eval()
    again.load_state_dict(convert_state_dict(ours_format, again))
    with torch.no_grad():
        torch.testing.assert_close(again(x)["logits"], model(x)["logits"])


# -- torchvision ------------------------------------------------------------------------------


def test_torchvision_deeplabv3_converts_whole_and_computes_what_torchvision_computes() -> None:
    theirs = random_state(_tv_small())
    assert detect_layout(theirs) == "torchvision"
    model = build_model(_tv_cfg(), NCLASS).eval()
    converted = convert_state_dict(theirs, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)  # strict
    x = _x()
    with torch.no_grad():
        logits = model(x)["logits"]
        aux = model.aux_head(model.backbone(x)["layer3"])
        ref_logits, ref_aux = tv_forward(theirs, x)
    assert logits.shape == ref_logits.shape == (2, NCLASS, 9, 9)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-4, atol=1e-4)
    _same_as_our_format(model, _tv_cfg(), x)


def test_torchvisions_pooled_branch_folds_into_our_biased_conv() -> None:
    """Our pooled branch (conv with bias, ReLU) equals torchvision's ASPPPooling (conv without
    bias, BatchNorm, ReLU; deeplabv3.py lines 70-83) as nn modules in eval mode."""
    theirs = random_state(_tv_small(), seed=3)
    model = build_model(_tv_cfg(), NCLASS).eval()
    model.load_state_dict(convert_state_dict(theirs, model))
    p = "classifier.0.convs.4."
    conv = nn.Conv2d(256, 32, 1, bias=False)
    norm = nn.BatchNorm2d(32)
    conv.weight.data.copy_(theirs[p + "1.weight"])
    norm.load_state_dict({k[len(p) + 2 :]: v for k, v in theirs.items() if k.startswith(p + "2.")})
    reference = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv, norm, nn.ReLU()).eval()
    x4 = torch.randn(2, 256, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.head.aspp.branches[4](x4)
        expected = reference(x4)
    assert ours.shape == (2, 32, 9, 9)
    torch.testing.assert_close(ours, expected.expand_as(ours), rtol=1e-5, atol=1e-6)
    assert "head.aspp.branches.4.conv.1.weight" not in model.state_dict()  # no BatchNorm here


# torchvision's own counts (the weights' meta "num_params", deeplabv3.py lines 148 and 169; 21
# classes, aux head): ours has 256 fewer, the pooled BatchNorm's 2 x 256 less the folded bias.
@pytest.mark.parametrize(("depth", "count"), [(50, 42_004_074), (101, 60_996_202)])
def test_torchvision_full_size_listing_converts_and_counts(depth: int, count: int) -> None:
    listing = torchvision_deeplabv3(depth=depth)
    assert sum(_numel(s) for k, s in listing.items() if _is_param(k)) == count
    cfg = ModelConfig(backbone=f"resnet{depth}", head="deeplabv3")
    with torch.device("meta"):
        model = build_model(cfg, 21)
    assert sum(p.numel() for p in model.parameters()) == count - 2 * 256 + 256
    converted = convert_state_dict(meta_state(listing), model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


def test_torchvision_bad_files_name_the_tensors() -> None:
    model = build_model(_tv_cfg(), NCLASS)
    own = set(model.state_dict())
    theirs = random_state(_tv_small())
    # a pooled-branch BatchNorm tensor missing: the fold cannot be done
    del theirs["classifier.0.convs.4.2.running_var"]
    with pytest.raises(ValueError, match=r"head\.aspp\.branches\.4\.conv\.0\.weight.*"):
        convert_state_dict(theirs, model)
    with pytest.raises(ValueError, match=r"no place here \(classifier\.0\.convs\.4\.1\.weight"):
        convert_state_dict(theirs, model)
    partial = convert_state_dict(theirs, model, partial=True)
    gone = {"head.aspp.branches.4.conv.0.weight", "head.aspp.branches.4.conv.0.bias"}
    assert set(partial) == own - gone
    result = build_model(_tv_cfg(), NCLASS).load_state_dict(partial, strict=False)
    assert set(result.missing_keys) == gone and not result.unexpected_keys

    # another number of classes: named with both shapes
    theirs = random_state(_tv_small())
    theirs["classifier.4.weight"] = torch.zeros(21, 32, 1, 1)
    with pytest.raises(ValueError, match=r"head\.classifier\.weight \(21, 32, 1, 1\) here"):
        convert_state_dict(theirs, model)
    assert set(convert_state_dict(theirs, model, partial=True)) == own - {"head.classifier.weight"}

    # an extra tensor, and the aux head into a model without one
    theirs = random_state(_tv_small())
    theirs["classifier.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"classifier\.0\.extra\.weight"):
        convert_state_dict(theirs, model)
    no_aux = build_model(_tv_cfg(aux_head=False), NCLASS)
    with pytest.raises(ValueError, match=r"aux_classifier\.0\.weight.*aux_head=true"):
        convert_state_dict(random_state(_tv_small()), no_aux)


def test_a_torchvision_file_into_another_variant_is_an_error() -> None:
    model = build_model(_mm_cfg("deeplabv3"), NCLASS)
    with pytest.raises(ValueError, match=r"torchvision-layout .*backbone\.conv1\.weight"):
        convert_state_dict(random_state(_tv_small()), model)


# -- mmseg -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "backbone"),
    [("deeplabv3", "resnet50"), ("pspnet", "resnet50"), ("deeplabv3", "resnet18")],
)
def test_mmseg_converts_whole_and_computes_what_mmseg_computes(head: str, backbone: str) -> None:
    theirs = random_state(_mm_small(head, backbone))
    # mmseg's files hold {"meta": ..., "state_dict": ...}
    wrapped = {"meta": {"CLASSES": ("road",), "iter": 80000}, "state_dict": theirs}
    assert detect_layout(theirs) == "mmseg"
    model = build_model(_mm_cfg(head, backbone), NCLASS).eval()
    converted = convert_state_dict(wrapped, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)  # strict
    x = _x()
    depth = int(backbone.removeprefix("resnet"))
    with torch.no_grad():
        logits = model(x)["logits"]
        aux = model.aux_head(model.backbone(x)["layer3"])
        ref_logits, ref_aux = mmseg_forward(theirs, x, head, depth)
    assert logits.shape == ref_logits.shape == (2, NCLASS, 9, 9)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-4, atol=1e-4)
    _same_as_our_format(model, _mm_cfg(head, backbone), x)


# mmseg's deeplabv3_r50-d8 / pspnet_r50-d8 (configs/_base_/models/*_r50-d8.py) at 19 classes,
# with the aux head, counted by hand from mmseg's code (conv weights + BN weight and bias):
#   ResNet-50 stages (Bottleneck p = 64, 128, 256, 512; conv1 cin*p, conv2 9p^2, conv3 4p^2,
#   BN 12p; first block + downsample cin*4p + 8p; the other blocks 17p^2 + 12p):
#     layer1 75,008 + 2 x 70,400 = 215,808; layer2 379,392 + 3 x 280,064 = 1,219,584;
#     layer3 1,512,448 + 5 x 1,117,184 = 7,098,368; layer4 6,039,552 + 2 x 4,462,592 =
#     14,964,736; together 23,498,496 (torchvision's resnet50 25,557,032 - fc 2,049,000 - stem
#     9,536 = the same)
#   V1c stem: 3*32*9 + 32*32*9 + 32*64*9 = 28,512 convs + 2*(32 + 32 + 64) = 256 BN -> 28,768
#   backbone 23,527,264
#   FCNHead aux: 1024*256*9 + 2*256 = 2,359,808; conv_seg 256*19 + 19 = 4,883 -> 2,364,691
#   ASPPHead: image_pool 2048*512 + 1024 = 1,049,600; aspp_modules 1x1 1,049,600 and 3 x
#     (2048*512*9 + 1024) = 28,314,624; bottleneck 2560*512*9 + 1024 = 11,797,504; conv_seg
#     512*19 + 19 = 9,747 -> 42,221,075; total 23,527,264 + 42,221,075 + 2,364,691 = 68,113,030
#   PSPHead: 4 x 1,049,600 = 4,198,400; bottleneck (2048 + 4*512)*512*9 + 1024 = 18,875,392;
#     conv_seg 9,747 -> 23,083,539; total 23,527,264 + 23,083,539 + 2,364,691 = 48,975,494
MMSEG_R50_D8 = {"deeplabv3": 68_113_030, "pspnet": 48_975_494}


@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_mmseg_r50_d8_parameter_counts(head: str) -> None:
    listing = mmseg_segmentor(head)
    assert sum(_numel(s) for k, s in listing.items() if _is_param(k)) == MMSEG_R50_D8[head]
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnet50", head=head, variant="mmseg"), NCLASS)
    assert sum(p.numel() for p in model.parameters()) == MMSEG_R50_D8[head]
    converted = convert_state_dict(meta_state(listing), model)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_mmseg_r101_d8_full_size_converts_whole(head: str) -> None:
    """The teachers people use (deeplabv3_r101-d8 / pspnet_r101-d8): the same config at depth
    101, every tensor in place, at full size (on the meta device)."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone="resnet101", head=head, variant="mmseg"), NCLASS)
    converted = convert_state_dict(meta_state(mmseg_segmentor(head, depth=101)), model)
    model.load_state_dict(converted)  # strict


def test_mmseg_bad_files_name_the_tensors() -> None:
    model = build_model(_mm_cfg("deeplabv3"), NCLASS)
    own = set(model.state_dict())
    theirs = random_state(_mm_small("deeplabv3"))
    del theirs["decode_head.aspp_modules.2.conv.weight"]
    with pytest.raises(ValueError, match=r"missing \(head\.aspp\.branches\.2\.0\.weight\)"):
        convert_state_dict(theirs, model)
    partial = convert_state_dict(theirs, model, partial=True)
    assert set(partial) == own - {"head.aspp.branches.2.0.weight"}
    result = build_model(_mm_cfg("deeplabv3"), NCLASS).load_state_dict(partial, strict=False)
    assert result.missing_keys == ["head.aspp.branches.2.0.weight"]

    theirs = random_state(_mm_small("deeplabv3"))
    theirs["decode_head.conv_seg.weight"] = torch.zeros(150, 64, 1, 1)  # an ADE20K file
    theirs["decode_head.conv_seg.bias"] = torch.zeros(150)
    with pytest.raises(ValueError, match=r"head\.classifier\.weight \(150, 64, 1, 1\) here"):
        convert_state_dict(theirs, model)
    partial = convert_state_dict(theirs, model, partial=True)
    assert set(partial) == own - {"head.classifier.weight", "head.classifier.bias"}

    theirs = random_state(_mm_small("deeplabv3"))
    theirs["decode_head.image_pool.1.gn.weight"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"decode_head\.image_pool\.1\.gn\.weight"):
        convert_state_dict(theirs, model)
    no_aux = build_model(_mm_cfg("deeplabv3", aux_head=False), NCLASS)
    with pytest.raises(ValueError, match=r"auxiliary_head\.convs\.0\.conv\.weight.*aux_head=true"):
        convert_state_dict(random_state(_mm_small("deeplabv3")), no_aux)
    # a PSPNet file into a DeepLabV3 model
    with pytest.raises(ValueError, match=r"decode_head\.psp_modules\.0\.1\.conv\.weight"):
        convert_state_dict(random_state(_mm_small("pspnet")), model)
    # into the torchvision variant: the pooled branch's BatchNorm has no place there
    with pytest.raises(ValueError, match=r"model\.variant=mmseg"):
        convert_state_dict(random_state(_mm_small("deeplabv3")), build_model(_tv_cfg(), NCLASS))


def test_an_unrecognised_layout_names_keys_and_all_layouts() -> None:
    model = build_model(_tv_cfg(), NCLASS)
    fcn = {"backbone.conv1.weight": torch.zeros(1), "classifier.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"backbone\.conv1\.weight, classifier\.0\.weight") as e:
        convert_state_dict(fcn, model)
    for name, keys in LAYOUTS.items():
        assert f"{name} ({keys})" in str(e.value)
    assert set(LAYOUTS) == {"segdistill", "cirkd", "torchvision", "mmseg"}


# -- the mmseg variant --------------------------------------------------------------------------


def test_mmseg_variant_stem_and_dilation_rule() -> None:
    with torch.device("meta"):
        r50 = build_model(ModelConfig(backbone="resnet50", variant="mmseg"), NCLASS).backbone
        tv50 = build_model(ModelConfig(backbone="resnet50"), NCLASS).backbone
        r18 = build_model(ModelConfig(backbone="resnet18", variant="mmseg"), NCLASS).backbone
        os16 = build_model(
            ModelConfig(backbone="resnet50", variant="mmseg", output_stride=16), NCLASS
        ).backbone
    # resnet.py lines 591-624: 3 -> 32 /2, 32 -> 32, 32 -> 64
    assert [
        (c.in_channels, c.out_channels, c.stride) for c in (r50.conv1, r50.conv2, r50.conv3)
    ] == [
        (3, 32, (2, 2)),
        (32, 32, (1, 1)),
        (32, 64, (1, 1)),
    ]
    assert r50.layer1[0].conv1.in_channels == 64
    # Bottleneck: mmseg's contract_dilation is torchvision's rule at OS 8 and 16
    for name in ("layer3", "layer4"):
        ours = [b.conv2.dilation for b in getattr(r50, name)]
        assert ours == [b.conv2.dilation for b in getattr(tv50, name)]
    assert [b.conv2.dilation for b in r50.layer4] == [(2, 2), (4, 4), (4, 4)]
    assert [b.conv2.dilation for b in os16.layer4] == [(1, 1), (2, 2), (2, 2)]
    assert os16.layer3[0].conv2.stride == (2, 2)
    # BasicBlock (resnet.py lines 39-50): conv1 dilated, conv2 never
    assert [b.conv1.dilation for b in r18.layer3] == [(1, 1), (2, 2)]
    assert [b.conv1.dilation for b in r18.layer4] == [(2, 2), (4, 4)]
    assert all(b.conv2.dilation == (1, 1) for b in (*r18.layer3, *r18.layer4))


def test_mmseg_variant_heads_and_widths() -> None:
    with torch.device("meta"):
        deeplab = build_model(ModelConfig(backbone="resnet101", variant="mmseg"), NCLASS)
        psp18 = build_model(
            ModelConfig(backbone="resnet18", head="pspnet", variant="mmseg"), NCLASS
        )
        given = build_model(
            ModelConfig(backbone="resnet50", variant="mmseg", head_channels=256, aux_channels=128),
            NCLASS,
        )
    h = deeplab.head
    assert h.channels == 512 and h.conv[0].in_channels == 5 * 512 and h.aspp.pool_first
    assert isinstance(h.aspp.project, nn.Identity) and isinstance(h.dropout, nn.Dropout2d)
    assert deeplab.aux_head.conv[0].out_channels == 256
    assert isinstance(deeplab.aux_head.dropout, nn.Dropout2d)
    assert "(mmseg)" in deeplab.name
    # the r18-d8 configs: decode_head channels 128, auxiliary_head channels 64
    assert psp18.head.channels == 128 and psp18.aux_head.conv[0].out_channels == 64
    assert psp18.head.stages[0].conv[1].num_features == 128  # BatchNorm in the 1x1 branch
    assert given.head.channels == 256 and given.aux_head.conv[0].out_channels == 128


def test_mmseg_variant_trains_at_a_small_width() -> None:
    model = build_model(_mm_cfg("pspnet"), 5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 5, 8, 8) and out["aux_logits"].shape == (2, 5, 8, 8)
    (out["logits"].mean() + out["aux_logits"].mean()).backward()


def test_the_other_variants_build_what_they_built() -> None:
    # counts at 19 classes with the aux head, as before the mmseg variant existed
    counts = {
        ("resnet18", "deeplabv3", "torchvision"): 16_498_534,
        ("resnet18", "pspnet", "torchvision"): 24_631_142,
        ("resnet18", "deeplabv3", "cirkd"): 13_607_974,
        ("resnet18", "pspnet", "cirkd"): 12_919_334,
    }
    for (backbone, head, variant), count in counts.items():
        with torch.device("meta"):
            model = build_model(ModelConfig(backbone=backbone, head=head, variant=variant), 19)
        assert sum(p.numel() for p in model.parameters()) == count
        assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())


def test_config_accepts_mmseg_for_resnets_only() -> None:
    assert load_config(["model.variant=mmseg"]).model.variant == "mmseg"
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(["model.variant=mmseg", "model.backbone=mobilenetv2"])
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(["model.variant=v1d"])


# -- loading mmseg's files through model.pretrained and teacher.checkpoint --------------------


def test_mmseg_imagenet_v1c_file_loads_strictly_through_model_pretrained(tmp_path) -> None:
    theirs = random_state(mmseg_imagenet_v1c(50, base=8))
    path = tmp_path / "resnet50_v1c-2cccc1ad.pth"
    torch.save({"state_dict": theirs}, path)
    model = build_model(_mm_cfg("pspnet", pretrained=str(path)), NCLASS)
    bb = model.backbone
    assert torch.equal(bb.conv1.weight, theirs["stem.0.weight"])
    assert torch.equal(bb.bn2.running_var, theirs["stem.4.running_var"])
    assert torch.equal(bb.conv3.weight, theirs["stem.6.weight"])
    assert torch.equal(bb.layer4[2].bn3.weight, theirs["layer4.2.bn3.weight"])
    # strict: a tensor the file lacks is an error naming it (in our names)
    del theirs["stem.7.running_mean"]
    torch.save(theirs, path)
    with pytest.raises(ValueError, match=r"bn3\.running_mean"):
        build_model(_mm_cfg("pspnet", pretrained=str(path)), NCLASS)


def test_an_mmseg_segmentor_file_gives_model_pretrained_its_backbone(tmp_path) -> None:
    theirs = random_state(_mm_small("deeplabv3"))
    path = tmp_path / "deeplabv3_r50-d8_512x1024_80k_cityscapes.pth"
    torch.save({"meta": {"iter": 80000}, "state_dict": theirs}, path)
    model = build_model(_mm_cfg("deeplabv3", pretrained=str(path)), NCLASS)
    assert torch.equal(model.backbone.conv2.weight, theirs["backbone.stem.3.weight"])


def test_an_mmseg_file_is_a_teacher_checkpoint(tmp_path) -> None:
    from components.training.checkpoint import CheckpointError
    from components.training.trainer import load_teacher

    theirs = random_state(_mm_small("pspnet"))
    path = tmp_path / "pspnet_r50-d8_512x1024_80k_cityscapes.pth"
    torch.save(
        {"meta": {"CLASSES": ["road", "sidewalk"], "iter": 80000}, "state_dict": theirs}, path
    )
    teacher = load_teacher(str(path), _mm_cfg("pspnet"), NCLASS)
    assert torch.equal(
        teacher.state["head.classifier.weight"], theirs["decode_head.conv_seg.weight"]
    )
    assert torch.equal(teacher.state["backbone.bn1.weight"], theirs["backbone.stem.1.weight"])
    with pytest.raises(CheckpointError, match=str(path)):
        load_teacher(str(path), _tv_cfg(), NCLASS)
