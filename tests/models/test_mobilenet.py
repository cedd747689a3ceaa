"""MobileNetV2 (components/models/mobilenet.py): torchvision's key layout, CIRKD's trunk.

torchvision does not import here, so `torchvision_layout` writes out the state_dict of
`torchvision.models.mobilenet_v2()` from its code (torchvision/models/mobilenetv2.py:
`features.0` Conv2dNormActivation 3->32 /2; InvertedResidual `conv` = [Conv2dNormActivation pw
(expansion != 1), Conv2dNormActivation dw, Conv2d pw-linear, BatchNorm2d]; `features.18`
Conv2dNormActivation 320->1280; `classifier` = [Dropout, Linear]), and `cirkd_layout` the one of
CIRKD's DeepLabV3-MobileNetV2 (winycg/CIRKD 7e0d21f, models/deeplabv3_mobile.py +
models/base_models/mobilenetv2.py). Neither uses our model code.
"""

from __future__ import annotations

import pytest
import torch
from cirkd_keys import bn, deeplabv3_head

from components.config import ModelConfig, load_config
from components.models.build import build_model
from components.models.convert import convert_state_dict
from components.models.mobilenet import MobileNetV2

SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip


def _blocks():
    """(index, cin, hidden, cout, expansion) of features.1..17."""
    cin, i = 32, 1
    for t, c, n, _ in SETTING:
        for _ in range(n):
            yield i, cin, cin * t, c, t
            cin, i = c, i + 1


def torchvision_layout(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"features.0.0.weight": (32, 3, 3, 3)}
    bn(out, "features.0.1", 32)
    for i, cin, hidden, cout, t in _blocks():
        p, j = f"features.{i}.conv", 0
        if t != 1:
            out[f"{p}.0.0.weight"] = (hidden, cin, 1, 1)
            bn(out, f"{p}.0.1", hidden)
            j = 1
        out[f"{p}.{j}.0.weight"] = (hidden, 1, 3, 3)
        bn(out, f"{p}.{j}.1", hidden)
        out[f"{p}.{j + 1}.weight"] = (cout, hidden, 1, 1)
        bn(out, f"{p}.{j + 2}", cout)
    out["features.18.0.weight"] = (1280, 320, 1, 1)
    bn(out, "features.18.1", 1280)
    out["classifier.1.weight"] = (num_classes, 1280)
    out["classifier.1.bias"] = (num_classes,)
    return out


def cirkd_layout(nclass: int = 19) -> dict[str, tuple[int, ...]]:
    """CIRKD's DeepLabV3-MobileNetV2: `pretrained.net.features.0..17` (flat block Sequentials,
    no features.18, no classifier) and `_DeepLabHead(320)` with ASPP 128, no aux head."""
    out: dict[str, tuple[int, ...]] = {"pretrained.net.features.0.0.weight": (32, 3, 3, 3)}
    bn(out, "pretrained.net.features.0.1", 32)
    for i, cin, hidden, cout, t in _blocks():
        p = f"pretrained.net.features.{i}.conv"
        if t == 1:  # dw 0, BN 1, ReLU6 2, pw-linear 3, BN 4
            out[f"{p}.0.weight"] = (hidden, 1, 3, 3)
            bn(out, f"{p}.1", hidden)
            out[f"{p}.3.weight"] = (cout, hidden, 1, 1)
            bn(out, f"{p}.4", cout)
        else:  # pw 0, BN 1, ReLU6 2, dw 3, BN 4, ReLU6 5, pw-linear 6, BN 7
            out[f"{p}.0.weight"] = (hidden, cin, 1, 1)
            bn(out, f"{p}.1", hidden)
            out[f"{p}.3.weight"] = (hidden, 1, 3, 3)
            bn(out, f"{p}.4", hidden)
            out[f"{p}.6.weight"] = (cout, hidden, 1, 1)
            bn(out, f"{p}.7", cout)
    deeplabv3_head(out, 320, nclass)
    return out


def _params(layout: dict[str, tuple[int, ...]]) -> int:
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(
        torch.Size(shape).numel() for key, shape in layout.items() if not key.endswith(buffers)
    )


def _cirkd_model(**kw) -> torch.nn.Module:
    cfg = ModelConfig(backbone="mobilenetv2", head="deeplabv3", variant="cirkd", aux_head=False)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return build_model(cfg, 19)


def test_keys_shapes_and_parameters_are_torchvisions():
    ref = torchvision_layout()
    assert len(ref) == 314 and _params(ref) == 3_504_872
    net = MobileNetV2(output_stride=32, num_classes=1000)
    got = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert list(got) == list(ref)  # names and their order
    assert got == ref
    assert sum(p.numel() for p in net.parameters()) == 3_504_872
    # A few keys written out from a torchvision state_dict, to anchor the listing itself.
    assert ref["features.1.conv.0.0.weight"] == (32, 1, 3, 3)
    assert ref["features.1.conv.1.weight"] == (16, 32, 1, 1)
    assert ref["features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert ref["features.2.conv.1.0.weight"] == (96, 1, 3, 3)
    assert ref["features.2.conv.3.running_var"] == (24,)
    assert ref["features.17.conv.2.weight"] == (320, 960, 1, 1)
    net.eval()
    assert tuple(net.classify(torch.randn(1, 3, 64, 64)).shape) == (1, 1000)


def test_segmentation_trunk_has_no_last_conv_and_cirkds_parameter_count():
    model = _cirkd_model()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    trunk = {k[len("backbone.") :]: v for k, v in ours.items() if k.startswith("backbone.")}
    tv = torchvision_layout()
    assert trunk == {k: v for k, v in tv.items() if not k.startswith(("features.18", "classifier"))}
    # CIRKD's DeepLabV3-MobileNetV2 at 19 classes: 1,811,712 trunk + 1,421,459 head.
    assert _params(cirkd_layout()) == 3_233_171
    assert sum(p.numel() for p in model.parameters()) == 3_233_171
    assert model.name == "deeplabv3-mobilenetv2 x1 (cirkd)"


def _dw(block: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in block.conv.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1)


def _cirkd_dilation(output_stride: int) -> list[tuple[int, int]]:
    """(stride, dilation) of each block's depthwise conv under CIRKD's `_nostride_dilate` with
    down_idx [2, 4, 7, 14]: undilated strides first, then the rule written out."""
    strides = [s if i == 0 else 1 for _, _, n, s in SETTING for i in range(n)]
    out = [(s, 1) for s in strides]  # blocks 1..17 at list index 0..16
    ranges = [(7, 14, 2), (14, 18, 4)] if output_stride == 8 else [(14, 18, 2)]
    for start, stop, dilate in ranges:
        for block in range(start, stop):
            s = out[block - 1][0]
            out[block - 1] = (1, dilate // 2) if s == 2 else (1, dilate)
    return out


@pytest.mark.parametrize("output_stride", [8, 16])
def test_dilation_rule_is_cirkds(output_stride):
    net = MobileNetV2(output_stride=output_stride)
    got = [(_dw(b).stride[0], _dw(b).dilation[0]) for b in list(net.features)[1:]]
    assert got == _cirkd_dilation(output_stride)
    for block in list(net.features)[1:]:  # padding keeps the size; 1x1 convs never dilate
        dw = _dw(block)
        assert dw.padding == dw.dilation
        pointwise = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m is not dw]
        assert all(m.dilation == (1, 1) for m in pointwise)
    assert _cirkd_dilation(8)[6] == (1, 1) and _cirkd_dilation(8)[13] == (1, 2)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_forward_stage_sizes_and_model_features(output_stride):
    net = MobileNetV2(width=0.25, output_stride=output_stride).eval()
    feats = net(torch.randn(2, 3, 64, 64))
    sizes = {k: tuple(v.shape[1:]) for k, v in feats.items()}
    low = 64 // output_stride
    assert sizes == {
        "layer1": (8, 16, 16),
        "layer2": (8, 8, 8),
        "layer3": (24, 64 // min(16, output_stride), 64 // min(16, output_stride)),
        "layer4": (80, low, low),
    }
    assert net.out_channels == {"layer1": 8, "layer2": 8, "layer3": 24, "layer4": 80}
    cfg = ModelConfig(
        backbone="mobilenetv2", head="pspnet", width=0.25, output_stride=output_stride
    )
    model = build_model(cfg, 5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert tuple(out["logits"].shape) == (2, 5, low, low)
    assert tuple(out["aux_logits"].shape) == (2, 5, low, low)
    assert model.feature_channels["low"] == 8 and tuple(out["features"]["low"].shape[1:]) == (
        8,
        16,
        16,
    )


def test_config_accepts_mobilenetv2_and_the_cirkd_config_builds():
    path = "configs/cirkd_cityscapes_deeplabv3_r101_mbv2.yaml"
    cfg = load_config(["--config", path, "model.pretrained=null"])
    assert cfg.model.backbone == "mobilenetv2" and cfg.model.variant == "cirkd"
    model = build_model(cfg.model, cfg.data.num_classes)
    assert sum(p.numel() for p in model.parameters()) == 3_233_171


def test_torchvision_imagenet_file_loads_into_the_trunk(tmp_path):
    imagenet = MobileNetV2(output_stride=32, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "mobilenet_v2.pth")
    model = _cirkd_model(pretrained=str(tmp_path / "mobilenet_v2.pth"))
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, imagenet.state_dict()[key]), key


def test_cirkd_checkpoint_converts_and_loads():
    g = torch.Generator().manual_seed(0)
    state = {
        k: (
            torch.randint(0, 5, s, generator=g)
            if k.endswith("tracked")
            else torch.randn(s, generator=g)
        )
        for k, s in cirkd_layout().items()
    }
    model = _cirkd_model()
    converted = convert_state_dict(state, model)
    model.load_state_dict(converted)
    ours = model.state_dict()
    # block 2: CIRKD's conv.3 is the depthwise conv -> torchvision's conv.1.0; block 1's conv.3 is
    # its pw-linear -> conv.1.
    assert torch.equal(
        ours["backbone.features.2.conv.1.0.weight"],
        state["pretrained.net.features.2.conv.3.weight"],
    )
    assert torch.equal(
        ours["backbone.features.1.conv.1.weight"], state["pretrained.net.features.1.conv.3.weight"]
    )
    assert torch.equal(
        ours["backbone.features.17.conv.3.bias"], state["pretrained.net.features.17.conv.7.bias"]
    )
    assert torch.equal(ours["head.classifier.weight"], state["head.block.4.weight"])
    del state["pretrained.net.features.5.conv.4.weight"]
    with pytest.raises(ValueError, match=r"backbone\.features\.5\.conv\.1\.1\.weight"):
        convert_state_dict(state, _cirkd_model())
