"""Models: output contract, torchvision key layout, pretrained loading, gradients."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from components.config import ModelConfig
from components.models.build import SegmentationModel, build_backbone, build_model
from components.models.heads import DeepLabV3Head, FCNAuxHead, PSPHead
from components.models.resnet import load_pretrained_backbone

K = 5
SMALL_WIDTH = {"resnet18": 0.25, "resnet34": 0.25, "resnet50": 0.125, "resnet101": 0.125}


def _model(backbone: str, head: str, os_: int, aux: bool = True) -> SegmentationModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone=backbone, head=head, width=SMALL_WIDTH[backbone], output_stride=os_, aux_head=aux
    )
    return build_model(cfg, num_classes=K)


@pytest.mark.parametrize(
    ("backbone", "head", "os_"),
    [
        *((b, h, s) for b in ["resnet18"] for h in ["deeplabv3", "pspnet"] for s in [8, 16]),
        ("resnet34", "pspnet", 16),
        ("resnet50", "deeplabv3", 8),
        ("resnet101", "pspnet", 8),
    ],
)
def test_output_shapes(backbone: str, head: str, os_: int) -> None:
    model = _model(backbone, head, os_)
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert set(out) == {"logits", "features", "aux_logits"}
    h = 64 // os_
    assert out["logits"].shape == (2, K, h, h)
    assert out["aux_logits"].shape == (2, K, h, h)
    feats = out["features"]
    assert set(feats) == {"low", "high", "embed"}
    ch = model.feature_channels
    assert feats["low"].shape == (2, ch["low"], 16, 16)
    assert feats["high"].shape == (2, ch["high"], h, h)
    assert feats["embed"].shape == (2, ch["embed"], h, h)
    assert model.num_classes == K

    with torch.no_grad():
        out = model.eval()(x)
    assert set(out) == {"logits", "features"}
    assert out["logits"].shape == (2, K, h, h)


def test_no_aux_head_means_no_aux_logits() -> None:
    model = _model("resnet18", "deeplabv3", 16, aux=False)
    assert model.aux_head is None
    assert "aux_logits" not in model.train()(torch.randn(2, 3, 32, 32))


def test_batch_of_one_trains() -> None:
    # A worker can receive a single image; the global-pooling branches must not break BatchNorm.
    for head in ("deeplabv3", "pspnet"):
        out = _model("resnet18", head, 16).train()(torch.randn(1, 3, 32, 32))
        assert out["logits"].shape == (1, K, 2, 2)


@pytest.mark.parametrize("os_", [8, 16])
def test_backbone_stage_strides(os_: int) -> None:
    bb = build_backbone("resnet18", 0.25, os_)
    feats = bb(torch.randn(1, 3, 64, 64))
    strides = {name: 64 // f.shape[-1] for name, f in feats.items()}
    assert strides == {"layer1": 4, "layer2": 8, "layer3": min(16, os_), "layer4": os_}
    assert {n: f.shape[1] for n, f in feats.items()} == bb.out_channels


def test_dilation_follows_torchvision_convention() -> None:
    # replace_stride_with_dilation: a dilated stage's first block keeps the previous dilation.
    os8 = build_backbone("resnet50", 0.125, 8)
    assert os8.layer3[0].conv2.dilation == (1, 1) and os8.layer3[1].conv2.dilation == (2, 2)
    assert os8.layer4[0].conv2.dilation == (2, 2) and os8.layer4[1].conv2.dilation == (4, 4)
    assert os8.layer3[0].conv2.stride == (1, 1) and os8.layer4[0].downsample[0].stride == (1, 1)
    os16 = build_backbone("resnet18", 0.25, 16)
    assert os16.layer3[0].conv1.stride == (2, 2) and os16.layer3[1].conv1.dilation == (1, 1)
    assert os16.layer4[0].conv1.dilation == (1, 1) and os16.layer4[1].conv2.dilation == (2, 2)


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    d = {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")}
    d[f"{prefix}.num_batches_tracked"] = ()
    return d


def _torchvision_reference(layers: tuple[int, ...], bottleneck: bool) -> dict[str, tuple]:
    """Key -> shape of torchvision.models.resnet{18,50}().state_dict() without fc, written out
    from the published architecture (not from the model under test)."""
    ref: dict[str, tuple] = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    inplanes = 64
    for stage, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        out = planes * (4 if bottleneck else 1)
        for b in range(n):
            p = f"layer{stage}.{b}"
            if bottleneck:
                ref[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                ref[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                ref[f"{p}.conv3.weight"] = (out, planes, 1, 1)
                ref |= _bn(f"{p}.bn1", planes) | _bn(f"{p}.bn2", planes) | _bn(f"{p}.bn3", out)
            else:
                ref[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                ref[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                ref |= _bn(f"{p}.bn1", planes) | _bn(f"{p}.bn2", planes)
            stride = 2 if stage > 1 and b == 0 else 1
            if b == 0 and (stride != 1 or inplanes != out):
                ref[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1)
                ref |= _bn(f"{p}.downsample.1", out)
            inplanes = out
    return ref


@pytest.mark.parametrize(
    ("name", "layers", "bottleneck", "params"),
    [
        ("resnet18", (2, 2, 2, 2), False, 11_689_512 - 513_000),
        ("resnet50", (3, 4, 6, 3), True, 25_557_032 - 2_049_000),
    ],
)
def test_torchvision_state_dict_layout(
    name: str, layers: tuple[int, ...], bottleneck: bool, params: int
) -> None:
    bb = build_backbone(name, width=1.0, output_stride=8)
    got = {k: tuple(v.shape) for k, v in bb.state_dict().items()}
    ref = _torchvision_reference(layers, bottleneck)
    assert sorted(set(got) - set(ref)) == [] and sorted(set(ref) - set(got)) == []
    assert got == ref
    assert sum(p.numel() for p in bb.parameters()) == params
    assert got["conv1.weight"] == (64, 3, 7, 7)
    if bottleneck:
        assert got["layer4.2.conv3.weight"] == (2048, 512, 1, 1)
        assert got["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
        assert bb.out_channels["layer4"] == 2048
    else:
        assert got["layer2.0.downsample.0.weight"] == (128, 64, 1, 1)
        assert "layer1.0.downsample.0.weight" not in got
        assert bb.out_channels["layer4"] == 512


def test_width_scales_channels() -> None:
    assert build_backbone("resnet18", 0.25).out_channels == {
        "layer1": 16,
        "layer2": 32,
        "layer3": 64,
        "layer4": 128,
    }
    assert build_backbone("resnet50", 0.05).conv1.out_channels == 8  # floor of 8 channels


def _fresh(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("resnet18", 0.25, 8)


def test_load_pretrained_with_prefix_and_fc(tmp_path: Path) -> None:
    src = _fresh(1)
    for m in src.modules():  # make running stats differ from a fresh model's too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_()
    sd = {f"module.{k}": v for k, v in src.state_dict().items()}
    sd["module.fc.weight"] = torch.randn(1000, 128)
    sd["module.fc.bias"] = torch.randn(1000)
    path = tmp_path / "r18.pth"
    torch.save(sd, path)

    dst = _fresh(2)
    assert not torch.equal(dst.conv1.weight, src.conv1.weight)
    report = load_pretrained_backbone(dst, str(path))
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


@pytest.mark.parametrize("wrap", ["state_dict", "model"])
def test_load_pretrained_wrapped_checkpoint(tmp_path: Path, wrap: str) -> None:
    src = _fresh(1)
    path = tmp_path / "ckpt.pt"
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    torch.save({wrap: sd, "epoch": 3}, path)
    dst = _fresh(2)
    assert load_pretrained_backbone(dst, str(path))["missing"] == []
    assert torch.equal(dst.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_load_pretrained_skips_mismatched_shape(tmp_path: Path) -> None:
    src = _fresh(1)
    sd = dict(src.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(3, 2, 3, 3)
    sd["extra.weight"] = torch.zeros(2)
    del sd["layer4.1.bn2.running_var"]
    path = tmp_path / "bad_shape.pth"
    torch.save(sd, path)

    dst = _fresh(2)
    before = dst.layer1[0].conv1.weight.clone()
    with pytest.raises(ValueError, match=r"only in part: 1 tensor\(s\) missing.*1 of another"):
        load_pretrained_backbone(dst, str(path))
    report = load_pretrained_backbone(dst, str(path), partial=True)
    assert report == {
        "missing": ["layer4.1.bn2.running_var"],
        "unexpected": ["extra.weight"],
        "mismatched": ["layer1.0.conv1.weight"],
    }
    assert torch.equal(dst.layer1[0].conv1.weight, before)
    assert torch.equal(dst.layer2[0].conv1.weight, src.layer2[0].conv1.weight)


def test_load_pretrained_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "trunc.pth"
    torch.save(_fresh(1).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_pretrained_backbone(_fresh(2), str(path))


def test_load_pretrained_rejects_unrelated_files(tmp_path: Path) -> None:
    no_match = tmp_path / "other.pth"
    torch.save({"encoder.block.weight": torch.zeros(3), "fc.weight": torch.zeros(2)}, no_match)
    with pytest.raises(ValueError, match=re.escape(str(no_match)) + ".*no key matches"):
        load_pretrained_backbone(_fresh(2), str(no_match))
    wide = tmp_path / "wide.pth"
    torch.save(build_backbone("resnet18", 0.5).state_dict(), wide)
    with pytest.raises(ValueError, match=re.escape(str(wide)) + ".*differ in shape"):
        load_pretrained_backbone(_fresh(2), str(wide))
    not_sd = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_sd)
    with pytest.raises(ValueError, match=re.escape(str(not_sd)) + ".*not a state dict"):
        load_pretrained_backbone(_fresh(2), str(not_sd))
    with pytest.raises(ValueError, match="missing.pth"):
        load_pretrained_backbone(_fresh(2), str(tmp_path / "missing.pth"))


def test_build_model_loads_and_reports_pretrained(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _fresh(1)
    path = tmp_path / "r18.pth"
    sd = dict(src.state_dict())
    sd["layer1.0.conv1.weight"] = torch.zeros(1, 1, 1, 1)
    torch.save(sd, path)
    cfg = ModelConfig(backbone="resnet18", width=0.25, pretrained=str(path))
    with pytest.raises(ValueError, match="pretrained_partial=true"):
        build_model(cfg, num_classes=K)
    cfg.pretrained_partial = True  # asked for: the tensors that fit, and a report of the rest
    model = build_model(cfg, num_classes=K)
    printed = capsys.readouterr().out
    assert f"loaded pretrained backbone from {path}: 0 missing, 0 unexpected, 1 mismatched" in (
        printed
    )
    assert "mismatched: layer1.0.conv1.weight" in printed
    assert torch.equal(model.backbone.layer3[0].conv1.weight, src.layer3[0].conv1.weight)


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="backbone.*resnet9"):
        build_model(ModelConfig(backbone="resnet9", width=0.25), K)
    with pytest.raises(ValueError, match="head.*unet"):
        build_model(ModelConfig(head="unet", width=0.25), K)


def test_init_is_kaiming_and_bn_identity() -> None:
    torch.manual_seed(0)
    bb = build_backbone("resnet18", 0.5)
    w = bb.layer3[0].conv2.weight  # fan_out = 128 * 3 * 3
    assert abs(w.std().item() - (2 / (128 * 9)) ** 0.5) < 0.002
    assert torch.all(bb.layer3[0].bn2.weight == 1) and torch.all(bb.layer3[0].bn2.bias == 0)
    head = DeepLabV3Head(64, K, 16, (6, 12, 18))
    assert torch.all(head.classifier.bias == 0)


def test_heads_standalone_shapes() -> None:
    x = torch.randn(2, 64, 7, 9)
    embed, logits = DeepLabV3Head(64, K, 16, (6, 12, 18))(x)
    assert embed.shape == (2, 16, 7, 9) and logits.shape == (2, K, 7, 9)
    embed, logits = PSPHead(64, K, 32)(x)
    assert embed.shape == (2, 32, 7, 9) and logits.shape == (2, K, 7, 9)
    assert FCNAuxHead(64, K, 16)(x).shape == (2, K, 7, 9)


def test_gradient_reaches_backbone() -> None:
    model = _model("resnet18", "deeplabv3", 8).train()
    out = model(torch.randn(2, 3, 32, 32))
    out["logits"].square().mean().backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None, name
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.backbone.layer4[1].conv2.weight.grad.abs().sum() > 0
    assert model.aux_head.classifier.weight.grad is None  # aux logits were not in the loss


@pytest.mark.parametrize(("size", "dilation"), [(6, 12), (6, 6), (7, 6), (12, 4)])
def test_atrous_conv_shortcut_equals_the_full_dilated_conv(size, dilation):
    from components.models.heads import AtrousConv2d

    torch.manual_seed(0)
    conv = AtrousConv2d(4, 3, 3, padding=dilation, dilation=dilation, bias=False).double()
    reference = torch.nn.Conv2d(4, 3, 3, padding=dilation, dilation=dilation, bias=False).double()
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, size, size, dtype=torch.float64)
    torch.testing.assert_close(conv(x), reference(x))


def test_a_deep_stem_file_is_an_error_not_a_silent_partial_load(tmp_path: Path) -> None:
    """CIRKD's ImageNet file for its students (`resnet18-imagenet.pth`, the name our configs
    used) is a deep-stem ResNet-V1c: winycg/CIRKD models/base_models/resnetv1b.py, deep_stem=True
    -> conv1/bn1 64 (3x3, stride 2), conv2/bn2 64, conv3/bn3 128, so layer1.0 takes 128 channels
    and gets a downsample. Loaded into our 7x7-stem ResNet-18 it left the stem and layer1.0.conv1
    random with only a printed report (18 unexpected, 2 mismatched keys)."""
    ours = build_backbone("resnet18", 1.0).state_dict()
    deep = dict(ours)

    def bn(prefix: str, n: int) -> None:
        for name, value in (("weight", torch.ones(n)), ("bias", torch.zeros(n)),
                            ("running_mean", torch.zeros(n)), ("running_var", torch.ones(n)),
                            ("num_batches_tracked", torch.tensor(0))):  # fmt: skip
            deep[f"{prefix}.{name}"] = value

    deep["conv1.weight"] = torch.randn(64, 3, 3, 3)
    deep["conv2.weight"], deep["conv3.weight"] = (
        torch.randn(64, 64, 3, 3),
        torch.randn(128, 64, 3, 3),
    )
    bn("bn2", 64), bn("bn3", 128)
    deep["layer1.0.conv1.weight"] = torch.randn(64, 128, 3, 3)
    deep["layer1.0.downsample.0.weight"] = torch.randn(64, 128, 1, 1)
    bn("layer1.0.downsample.1", 64)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(deep, path)
    with pytest.raises(
        ValueError,
        match=r"2 of another shape \(conv1\.weight \(64, 3, 3, 3\)"
        r" here \(64, 3, 7, 7\); layer1\.0\.conv1\.weight.*18 the model lacks",
    ):
        load_pretrained_backbone(build_backbone("resnet18", 1.0), str(path))
    report = load_pretrained_backbone(build_backbone("resnet18", 1.0), str(path), partial=True)
    assert (len(report["unexpected"]), len(report["mismatched"])) == (18, 2)
