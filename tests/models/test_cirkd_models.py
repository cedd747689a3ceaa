"""The CIRKD variant (`model.variant: cirkd`) and loading CIRKD's checkpoints.

The reference here is written from reading winycg/CIRKD at commit 7e0d21f (the code its released
checkpoints were trained with): `cirkd_layout` lists the state_dict keys and shapes that its
models/segbase.py + models/base_models/resnetv1b.py (ResNetV1b, deep_stem=True) +
models/deeplabv3.py / models/pspnet.py produce, and `cirkd_forward` is an independent functional
forward over those names. Neither imports our model code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cirkd_keys import bn, deeplabv3_head

from components.config import ConfigError, ModelConfig, load_config
from components.models.build import build_model
from components.models.convert import convert_state_dict

NCLASS = 19


def cirkd_layout(head: str, nclass: int = NCLASS) -> dict[str, tuple[int, ...]]:
    """Key -> shape of CIRKD's ResNet-18 DeepLabV3 / PSPNet with aux=True (Cityscapes runs)."""
    out: dict[str, tuple[int, ...]] = {}
    # resnetv1b.py lines 103-111: the deep stem; inplanes 128 (line 100).
    out["pretrained.conv1.weight"] = (64, 3, 3, 3)
    bn(out, "pretrained.bn1", 64)
    out["pretrained.conv2.weight"] = (64, 64, 3, 3)
    bn(out, "pretrained.bn2", 64)
    out["pretrained.conv3.weight"] = (128, 64, 3, 3)
    bn(out, "pretrained.bn3", 128)
    inplanes = 128
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):  # BasicBlockV1b, [2, 2, 2, 2]
            p = f"pretrained.layer{i}.{b}"
            cin = inplanes if b == 0 else planes
            out[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(out, f"{p}.bn1", planes)
            out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(out, f"{p}.bn2", planes)
            # _make_layer line 145: stride != 1 or inplanes != planes (layer1: 128 -> 64).
            if b == 0 and (i > 1 or inplanes != planes):
                out[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                bn(out, f"{p}.downsample.1", planes)
        inplanes = planes
    if head == "deeplabv3":  # deeplabv3.py at 7e0d21f: ASPP and block at 128 for in 512
        deeplabv3_head(out, 512, nclass)
    else:  # pspnet.py: pyramid at 512 / 4, block 128 for in 512
        for n in (1, 2, 3, 4):
            out[f"head.psp.conv{n}.0.weight"] = (128, 512, 1, 1)
            bn(out, f"head.psp.conv{n}.1", 128)
        out["head.block.0.weight"] = (128, 1024, 3, 3)
        bn(out, "head.block.1", 128)
        out["head.classifier.weight"] = (nclass, 128, 1, 1)
        out["head.classifier.bias"] = (nclass,)
    # _FCNHead(in_channels // 2 = 256): inter 64
    out["auxlayer.block.0.weight"] = (64, 256, 3, 3)
    bn(out, "auxlayer.block.1", 64)
    out["auxlayer.block.4.weight"] = (nclass, 64, 1, 1)
    out["auxlayer.block.4.bias"] = (nclass,)
    return out


def _is_param(key: str) -> bool:
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def random_cirkd_state(head: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in cirkd_layout(head).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var") or (len(shape) == 1 and key.endswith(".weight")):
            state[key] = torch.rand(shape, generator=g) + 0.5  # BN scales and variances
        else:
            fan_in = _numel(shape[1:]) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=g) / fan_in**0.5
    return state


def _cfg(head: str, **kw) -> ModelConfig:
    return ModelConfig(backbone="resnet18", head=head, variant="cirkd", **kw)


# The numbers CIRKD reports for its students (team issue 20; CIRKD's paper, Table 1).
@pytest.mark.parametrize(("head", "millions"), [("deeplabv3", 13.61), ("pspnet", 12.92)])
def test_parameter_counts_equal_cirkds(head: str, millions: float) -> None:
    theirs = sum(_numel(s) for k, s in cirkd_layout(head).items() if _is_param(k))
    ours = sum(p.numel() for p in build_model(_cfg(head), NCLASS).parameters())
    assert ours == theirs
    assert round(ours / 1e6, 2) == millions


def test_defaults_unchanged() -> None:
    # The torchvision variant (the default) keeps its sizes: 16.50M / 24.63M at width 1.
    for head, count in (("deeplabv3", 16_498_534), ("pspnet", 24_631_142)):
        model = build_model(ModelConfig(backbone="resnet18", head=head), NCLASS)
        assert sum(p.numel() for p in model.parameters()) == count
    assert ModelConfig().variant == "torchvision"


def test_cirkd_dilation_rule_and_stem() -> None:
    bb = build_model(_cfg("deeplabv3"), NCLASS).backbone
    # resnetv1b.py _make_layer: layer3 (d=2) first block [1, 2], layer4 (d=4) first block [2, 4]
    assert (bb.layer3[0].conv1.dilation, bb.layer3[0].conv2.dilation) == ((1, 1), (2, 2))
    assert (bb.layer4[0].conv1.dilation, bb.layer4[0].conv2.dilation) == ((2, 2), (4, 4))
    assert bb.layer3[1].conv1.dilation == bb.layer3[1].conv2.dilation == (2, 2)
    assert bb.layer4[1].conv1.dilation == bb.layer4[1].conv2.dilation == (4, 4)
    assert bb.conv1.kernel_size == (3, 3) and bb.conv3.out_channels == 128
    torchvision = build_model(ModelConfig(backbone="resnet18"), NCLASS).backbone
    assert torchvision.layer3[0].conv2.dilation == (1, 1)
    assert torchvision.layer4[0].conv2.dilation == (2, 2)


def _conv(x, w, stride=1, dilation=1, bias=None):
    pad = dilation * (w.shape[-1] // 2)
    return F.conv2d(x, w, bias, stride, pad, dilation)


def _bnr(x, s, name, relu=True):
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


def cirkd_forward(s: dict[str, torch.Tensor], x: torch.Tensor, head: str) -> torch.Tensor:
    """CIRKD's R18 network in eval mode (segbase.base_forward + the head), over its key names."""
    p = "pretrained"
    x = _bnr(_conv(x, s[f"{p}.conv1.weight"], 2), s, f"{p}.bn1")
    x = _bnr(_conv(x, s[f"{p}.conv2.weight"]), s, f"{p}.bn2")
    x = _bnr(_conv(x, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
    x = F.max_pool2d(x, 3, 2, 1)
    # (stride, dilation of the stage) per layer, dilated=True: layer3 d=2, layer4 d=4
    stages = {1: (1, 1), 2: (2, 1), 3: (1, 2), 4: (1, 4)}
    for i, (stride, d) in stages.items():
        for b in range(2):
            q = f"{p}.layer{i}.{b}"
            first = (1 if d in (1, 2) else 2) if b == 0 else d
            out = _bnr(
                _conv(x, s[f"{q}.conv1.weight"], stride if b == 0 else 1, first), s, f"{q}.bn1"
            )
            out = _bnr(_conv(out, s[f"{q}.conv2.weight"], 1, d), s, f"{q}.bn2", relu=False)
            if f"{q}.downsample.0.weight" in s:
                x = _bnr(
                    _conv(x, s[f"{q}.downsample.0.weight"], stride),
                    s,
                    f"{q}.downsample.1",
                    relu=False,
                )
            x = F.relu(out + x)
    size = x.shape[-2:]
    if head == "deeplabv3":
        a = "head.aspp"
        feats = [_bnr(_conv(x, s[f"{a}.b0.0.weight"]), s, f"{a}.b0.1")]
        for j, rate in zip((1, 2, 3), (12, 24, 36), strict=True):
            feats.append(
                _bnr(_conv(x, s[f"{a}.b{j}.block.0.weight"], 1, rate), s, f"{a}.b{j}.block.1")
            )
        pooled = _bnr(
            _conv(F.adaptive_avg_pool2d(x, 1), s[f"{a}.b4.gap.1.weight"]), s, f"{a}.b4.gap.2"
        )
        feats.append(F.interpolate(pooled, size, mode="bilinear", align_corners=True))
        y = _bnr(_conv(torch.cat(feats, 1), s[f"{a}.project.0.weight"]), s, f"{a}.project.1")
        y = _bnr(_conv(y, s["head.block.0.weight"]), s, "head.block.1")
        return _conv(y, s["head.block.4.weight"], bias=s["head.block.4.bias"])
    feats = [x]
    for n, bins in zip((1, 2, 3, 4), (1, 2, 3, 6), strict=True):
        y = _bnr(
            _conv(F.adaptive_avg_pool2d(x, bins), s[f"head.psp.conv{n}.0.weight"]),
            s,
            f"head.psp.conv{n}.1",
        )
        feats.append(F.interpolate(y, size, mode="bilinear", align_corners=True))
    y = _bnr(_conv(torch.cat(feats, 1), s["head.block.0.weight"]), s, "head.block.1")
    return _conv(y, s["head.classifier.weight"], bias=s["head.classifier.bias"])


@pytest.mark.parametrize("head", ["deeplabv3", "pspnet"])
def test_a_cirkd_checkpoint_loads_and_computes_what_cirkd_computes(head: str) -> None:
    theirs = random_cirkd_state(head)
    model = build_model(_cfg(head), NCLASS).eval()
    converted = convert_state_dict(theirs, model)
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted)  # strict
    x = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)["logits"]
        reference = cirkd_forward(theirs, x, head)
    assert ours.shape == reference.shape == (1, NCLASS, 9, 9)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)

    # The same weights saved in our own layout (and under DDP's prefix) give the same output.
    ours_format = {f"module.{k}": v for k, v in model.state_dict().items()}
    again = build_model(_cfg(head), NCLASS).eval()
    again.load_state_dict(convert_state_dict(ours_format, again))
    with torch.no_grad():
        torch.testing.assert_close(again(x)["logits"], ours)


def test_cirkd_aux_head_loads() -> None:
    theirs = random_cirkd_state("deeplabv3")
    model = build_model(_cfg("deeplabv3"), NCLASS)
    model.load_state_dict(convert_state_dict(theirs, model))
    w = model.state_dict()["aux_head.classifier.weight"]
    assert torch.equal(w, theirs["auxlayer.block.4.weight"])


def test_a_left_out_or_extra_weight_is_an_error_naming_it() -> None:
    model = build_model(_cfg("deeplabv3"), NCLASS)
    theirs = random_cirkd_state("deeplabv3")
    del theirs["head.aspp.b2.block.0.weight"]
    with pytest.raises(ValueError, match=r"head\.aspp\.branches\.2\.0\.weight"):
        convert_state_dict(theirs, model)
    partial = convert_state_dict(theirs, model, partial=True)
    assert "head.aspp.branches.2.0.weight" not in partial
    assert len(partial) == len(model.state_dict()) - 1

    no_aux = build_model(_cfg("deeplabv3", aux_head=False), NCLASS)
    with pytest.raises(ValueError, match=r"auxlayer\.block\.0\.weight.*aux_head=true"):
        convert_state_dict(random_cirkd_state("deeplabv3"), no_aux)


def test_a_cirkd_file_into_the_wrong_variant_names_the_shapes() -> None:
    model = build_model(ModelConfig(backbone="resnet18", head="deeplabv3"), NCLASS)
    with pytest.raises(ValueError, match=r"backbone\.conv1\.weight \(64, 3, 3, 3\) here"):
        convert_state_dict(random_cirkd_state("deeplabv3"), model)
    wide = build_model(_cfg("deeplabv3", head_channels=512), NCLASS)  # CIRKDv2's width
    with pytest.raises(ValueError, match="another shape"):
        convert_state_dict(random_cirkd_state("deeplabv3"), wide)


def test_an_unrecognised_layout_names_keys_and_layouts() -> None:
    model = build_model(_cfg("pspnet"), NCLASS)
    state = {"encoder.stem.weight": torch.zeros(1), "decoder.x": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"encoder\.stem\.weight.*segdistill.*cirkd"):
        convert_state_dict(state, model)


def test_cirkd_variant_trains_and_scales() -> None:
    cfg = ModelConfig(backbone="resnet50", head="pspnet", variant="cirkd", width=0.125)
    model = build_model(cfg, 5).train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 5, 8, 8) and out["aux_logits"].shape == (2, 5, 8, 8)
    assert model.backbone.layer1[0].downsample[0].in_channels == 16  # the stem's 2 x base
    assert "(cirkd)" in model.name


def test_config_checks_the_new_keys() -> None:
    with pytest.raises(ConfigError, match="model.variant"):
        load_config(["model.variant=v1c"])
    with pytest.raises(ConfigError, match="model.head_channels"):
        load_config(["model.head_channels=0"])
    with pytest.raises(ConfigError, match="teacher.model.variant"):
        load_config(
            [
                "teacher.model.backbone=mit_b0",
                "teacher.model.head=segformer",
                "teacher.model.variant=cirkd",
            ]
        )
    cfg = load_config(["model.variant=cirkd", "model.head_channels=512", "model.aux_channels=64"])
    assert (cfg.model.variant, cfg.model.head_channels, cfg.model.aux_channels) == (
        "cirkd",
        512,
        64,
    )


def test_a_cirkd_network_checkpoint_gives_model_pretrained_its_backbone(tmp_path) -> None:
    theirs = random_cirkd_state("pspnet")
    path = tmp_path / "psp_resnet18_citys_best_model.pth"
    torch.save(theirs, path)
    model = build_model(_cfg("pspnet", pretrained=str(path)), NCLASS)
    assert torch.equal(model.backbone.conv3.weight, theirs["pretrained.conv3.weight"])
    assert torch.equal(
        model.backbone.layer4[1].bn2.running_var, theirs["pretrained.layer4.1.bn2.running_var"]
    )


def test_a_cirkd_teacher_file_is_a_teacher_checkpoint(tmp_path) -> None:
    """`teacher.checkpoint` given CIRKD's file (a bare state_dict in its layout, as its released
    deeplabv3_resnet101_citys_best_model.pth): converted whole, or an error naming the file."""
    from components.training.checkpoint import CheckpointError
    from components.training.trainer import load_teacher

    theirs = random_cirkd_state("deeplabv3")
    path = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(theirs, path)
    teacher = load_teacher(str(path), _cfg("deeplabv3"), NCLASS)
    assert torch.equal(teacher.state["head.classifier.weight"], theirs["head.block.4.weight"])
    with pytest.raises(CheckpointError, match=str(path)):
        load_teacher(str(path), ModelConfig(backbone="resnet18", head="deeplabv3"), NCLASS)
