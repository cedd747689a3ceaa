"""Released whole-network SegFormer checkpoints (NVlabs mmseg and HuggingFace layouts) load into
our SegFormerModel: every tensor lands, the logits equal those of the same weights in our own
layout, both layouts give the same model, our head equals theirs, and bad files are errors
naming what does not fit. State dicts are built from tests/segformer_keys.py (key names and
shapes written from the reference code) with random values, at MiT-B0 size."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from segformer_keys import B0, B1, huggingface_segformer, nvlabs_segformer

from components.config import ModelConfig
from components.models.build import build_model
from components.models.convert_segformer import (
    convert_segformer_state_dict,
    detect_segformer_layout,
)

ADE, CITY = 150, 19


def _model(classes: int = ADE, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(backbone="mit_b0", head="segformer", output_stride=32, **kw)
    return build_model(cfg, classes).eval()


def _random(shapes: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the listed shapes: weights ~ N(0, 0.1), BatchNorm variances in
    [0.5, 1.5], counters 7."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def _nvlabs(classes: int = ADE, arch: dict = B0, seed: int = 0) -> dict[str, torch.Tensor]:
    return _random(nvlabs_segformer(arch["dims"], arch["depths"], arch["decoder"], classes), seed)


# The HuggingFace converter's renaming of an NVlabs file, transcribed from
# transformers convert_segformer_original_to_pytorch.py `rename_keys` (lines 40-88, applied in
# its order), its deletion of conv_seg (lines 201-202) and `read_in_k_v` (lines 91-108).
def _hf_rename(key: str) -> str:
    key = key.replace("backbone", "segformer.encoder", 1) if key.startswith("backbone") else key
    m = re.search(r"patch_embed(\d)", key)
    if m:
        key = key.replace(m.group(0), f"patch_embeddings.{int(m.group(1)) - 1}")
    key = key.replace("norm", "layer_norm")
    m = re.search(r"segformer\.encoder\.layer_norm(\d)", key)
    if m:
        key = key.replace(f"layer_norm{m.group(1)}", f"layer_norm.{int(m.group(1)) - 1}")
    key = key.replace("layer_norm1", "layer_norm_1").replace("layer_norm2", "layer_norm_2")
    m = re.search(r"block(\d)", key)
    if m:
        key = key.replace(m.group(0), f"block.{int(m.group(1)) - 1}")
    key = key.replace("attn.q", "attention.self.query")
    key = key.replace("attn.proj", "attention.output.dense")
    key = key.replace("attn", "attention.self")
    key = key.replace("fc1", "dense1").replace("fc2", "dense2")
    key = key.replace("linear_pred", "classifier")
    key = key.replace("linear_fuse.conv", "linear_fuse").replace("linear_fuse.bn", "batch_norm")
    m = re.search(r"linear_c(\d)", key)
    if m:
        key = key.replace(m.group(0), f"linear_c.{int(m.group(1)) - 1}")
    return key


def _hf_from_nvlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith("decode_head.conv_seg."):
            continue
        new = _hf_rename(key)
        if new.endswith(("attention.self.kv.weight", "attention.self.kv.bias")):
            c = value.shape[0] // 2
            out[new.replace(".kv.", ".key.")] = value[:c]
            out[new.replace(".kv.", ".value.")] = value[c:]
        else:
            out[new] = value
    return out


def _ours_from_nvlabs(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our own layout of the same weights: the encoder names are the release's, the decoder
    moves from `decode_head.` to `head.`; mmseg's unused `conv_seg` has no counterpart."""
    return {
        re.sub(r"^decode_head\.", "head.", k): v
        for k, v in state.items()
        if not k.startswith("decode_head.conv_seg.")
    }


def _logits(model, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(image)["logits"]


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_listings_agree_with_the_huggingface_conversion() -> None:
    """The HF listing (from modeling_segformer.py) is what HF's converter makes of the NVlabs
    listing (from mix_transformer.py / segformer_head.py): the two sources agree."""
    nv = nvlabs_segformer(B0["dims"], B0["depths"], B0["decoder"], ADE)
    hf = huggingface_segformer(B0["dims"], B0["depths"], B0["decoder"], ADE)
    made = _hf_from_nvlabs({k: torch.empty(s) for k, s in nv.items()})
    assert {k: tuple(v.shape) for k, v in made.items()} == hf


def test_detect_layout() -> None:
    nv = _nvlabs()
    assert detect_segformer_layout(nv) == "nvlabs"
    assert detect_segformer_layout({"meta": {}, "state_dict": nv}) == "nvlabs"
    assert detect_segformer_layout({f"module.{k}": v for k, v in nv.items()}) == "nvlabs"
    assert detect_segformer_layout(_hf_from_nvlabs(nv)) == "huggingface"
    assert detect_segformer_layout(_ours_from_nvlabs(nv)) is None  # ours: convert.py's
    encoder_only = {k[len("backbone.") :]: v for k, v in nv.items() if k.startswith("backbone.")}
    assert detect_segformer_layout(encoder_only) is None  # mit_b*.pth: model.pretrained
    cirkd = {"pretrained.conv1.weight": torch.zeros(1), "head.aspp.b0.0.weight": torch.zeros(1)}
    assert detect_segformer_layout(cirkd) is None


@pytest.mark.parametrize("classes", [ADE, CITY])
def test_nvlabs_file_loads_whole_and_predicts_as_our_layout(classes, image) -> None:
    nv = _nvlabs(classes)
    model = _model(classes, seed=1)
    converted = convert_segformer_state_dict({"meta": {}, "state_dict": nv}, model)
    own = model.state_dict()
    assert set(converted) == set(own)  # every model tensor, conv_seg the only file tensor left
    assert all(converted[k].shape == own[k].shape for k in own)
    assert len(nv) == len(own) + 2
    model.load_state_dict(converted)  # strict

    reference = _model(classes, seed=2)
    reference.load_state_dict(_ours_from_nvlabs(nv))  # strict: our layout of the same weights
    assert torch.equal(_logits(model, image), _logits(reference, image))
    assert _logits(model, image).shape == (1, classes, 16, 24)


def test_huggingface_file_loads_whole_and_equals_the_nvlabs_conversion(image) -> None:
    nv = _nvlabs(ADE)
    hf = _hf_from_nvlabs(nv)
    model = _model(ADE, seed=1)
    from_hf = convert_segformer_state_dict({f"module.{k}": v for k, v in hf.items()}, model)
    from_nv = convert_segformer_state_dict(nv, model)
    assert from_hf.keys() == from_nv.keys() == model.state_dict().keys()
    for key in from_nv:
        assert torch.equal(from_hf[key], from_nv[key]), key
    model.load_state_dict(from_hf)  # strict
    # A file without BatchNorm's counter (older saves) still loads strictly: it is filled with 0.
    del hf["decode_head.batch_norm.num_batches_tracked"]
    counter = convert_segformer_state_dict(hf, model)["head.linear_fuse.bn.num_batches_tracked"]
    assert counter.item() == 0 and counter.dtype == torch.long

    reference = _model(ADE, seed=2)
    reference.load_state_dict(_ours_from_nvlabs(nv))
    assert torch.equal(_logits(model, image), _logits(reference, image))


def _their_head(feats: list[torch.Tensor], sd: dict, names: dict, interp_c1: bool) -> torch.Tensor:
    """The decode head as NVlabs' SegFormerHead.forward (segformer_head.py lines 64-87) and HF's
    SegformerDecodeHead.forward (modeling_segformer.py lines 700-734) compute it in eval mode:
    Linear on the flattened tokens, bilinear (align_corners=False) to c1's size (HF resizes c1
    to its own size too), concat c4, c3, c2, c1, 1x1 conv without bias, BN, ReLU, classifier.
    names["linear"]: the four MLP prefixes, c1 first."""
    size = feats[0].shape[-2:]
    maps = []
    for i, (f, prefix) in enumerate(zip(feats, names["linear"])):
        b, _, h, w = f.shape
        tokens = F.linear(
            f.flatten(2).transpose(1, 2), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"]
        )
        y = tokens.transpose(1, 2).reshape(b, -1, h, w)
        if i > 0 or interp_c1:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        maps.append(y)
    x = F.conv2d(torch.cat(maps[::-1], dim=1), sd[names["fuse"]])
    bn = names["bn"]
    x = F.batch_norm(
        x, sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"], sd[f"{bn}.weight"], sd[f"{bn}.bias"]
    )
    x = F.relu(x)
    return F.conv2d(x, sd[names["pred"] + ".weight"], sd[names["pred"] + ".bias"])


def test_our_head_computes_theirs(image) -> None:
    nv = _nvlabs(ADE)
    hf = _hf_from_nvlabs(nv)
    model = _model(ADE)
    model.load_state_dict(convert_segformer_state_dict(nv, model))
    nvlabs_names = {
        "linear": [f"decode_head.linear_c{i}.proj" for i in (1, 2, 3, 4)],
        "fuse": "decode_head.linear_fuse.conv.weight",
        "bn": "decode_head.linear_fuse.bn",
        "pred": "decode_head.linear_pred",
    }
    hf_names = {
        "linear": [f"decode_head.linear_c.{i}.proj" for i in (0, 1, 2, 3)],
        "fuse": "decode_head.linear_fuse.weight",
        "bn": "decode_head.batch_norm",
        "pred": "decode_head.classifier",
    }
    with torch.no_grad():
        feats, _ = model.backbone(image, need_weights=False)
        ours = model(image)["logits"]
        nvlabs = _their_head(feats, nv, nvlabs_names, interp_c1=False)
        huggingface = _their_head(feats, hf, hf_names, interp_c1=True)
    assert ours.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(ours, nvlabs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours, huggingface, rtol=1e-4, atol=1e-5)


def _error(state, model, *patterns: str) -> None:
    with pytest.raises(ValueError) as info:
        convert_segformer_state_dict(state, model)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))


def test_missing_extra_and_misshaped_tensors_are_named() -> None:
    model = _model(ADE)
    nv = _nvlabs(ADE)
    missing = dict(nv)
    del missing["decode_head.linear_pred.bias"], missing["backbone.block2.1.attn.q.weight"]
    _error(
        missing,
        model,
        r"2 model tensor\(s\) missing \(backbone\.block2\.1\.attn\.q\.weight, "
        r"head\.linear_pred\.bias\)",
    )
    extra = dict(nv, **{"decode_head.aux.weight": torch.zeros(3), "neck.x": torch.zeros(1)})
    _error(
        extra,
        model,
        r"2 file tensor\(s\) with no place here \(neck\.x, decode_head\.aux\.weight "
        r"\(-> head\.aux\.weight\)\)",
    )
    shaped = dict(nv, **{"backbone.block1.0.attn.kv.weight": torch.zeros(32, 32)})
    _error(
        shaped,
        model,
        r"1 of another shape \(backbone\.block1\.0\.attn\.kv\.weight \(32, 32\) here \(64, 32\)\)",
    )

    hf = _hf_from_nvlabs(nv)
    hf["segformer.encoder.block.0.0.attention.self.relative_bias"] = torch.zeros(1)
    hf["segformer.encoder.layer_norm.4.weight"] = torch.zeros(1)  # a fifth stage
    _error(
        hf,
        model,
        r"2 file tensor\(s\) with no place here \(segformer\.encoder\.block\.0\.0\.attention"
        r"\.self\.relative_bias, segformer\.encoder\.layer_norm\.4\.weight \(-> "
        r"backbone\.norm5\.weight\)\)",
    )
    hf = _hf_from_nvlabs(nv)
    del hf["segformer.encoder.block.0.0.attention.self.value.weight"]  # a key without its value
    _error(
        hf,
        model,
        r"missing \(backbone\.block1\.0\.attn\.kv\.weight\)",
        r"no place here \(segformer\.encoder\.block\.0\.0\.attention\.self\.key\.weight\)",
    )
    hf = _hf_from_nvlabs(nv)
    hf["decode_head.classifier.weight"] = torch.zeros(ADE, 128, 1, 1)
    _error(hf, model, r"head\.linear_pred\.weight \(150, 128, 1, 1\) here \(150, 256, 1, 1\)")


def _shapes_only(shapes: dict) -> dict[str, torch.Tensor]:
    """Zero tensors of the listed shapes that allocate nothing (stride-0 views)."""
    return {k: torch.zeros(()).expand(s) for k, s in shapes.items()}


def test_another_variant_or_class_count_names_the_architectures() -> None:
    b1 = _shapes_only(nvlabs_segformer(B1["dims"], B1["depths"], B1["decoder"], ADE))
    _error(
        b1,
        _model(ADE),
        r"the file is MiT-B1 \(depths 2,2,2,2, dims 64,128,320,512\), decoder dim 256, 150 "
        r"classes, the model \(segformer-mit_b0 x1\) is MiT-B0 \(depths 2,2,2,2, dims "
        r"32,64,160,256\)",
        r"it needs model\.backbone mit_b1, model\.width 1",
        r"\d+ of another shape \(backbone\.patch_embed1\.proj\.weight \(64, 3, 7, 7\) here "
        r"\(32, 3, 7, 7\)",
    )
    _error(
        _hf_from_nvlabs(_nvlabs(CITY)),
        _model(ADE),
        r"decoder dim 256, 19 classes, the model .* 150 classes; it needs a dataset of 19 classes",
    )
    # segformer.b2.*: MiT-B2 with a 768-channel decoder (local_configs/segformer/B2/*.py line 28).
    b2 = _shapes_only(nvlabs_segformer(B1["dims"], (3, 4, 6, 3), 768, ADE))
    _error(
        b2,
        _model(ADE),
        r"the file is MiT-B2 \(depths 3,4,6,3, dims 64,128,320,512\), decoder dim 768",
        r"it needs model\.backbone mit_b2, model\.width 1; a decoder dim of 768",
        r"file tensor\(s\) with no place here \(backbone\.block1\.2\.norm1\.weight",
    )


def test_partial_loads_what_fits() -> None:
    nv = _nvlabs(ADE)
    del nv["decode_head.linear_pred.weight"]
    nv["backbone.norm4.weight"] = torch.zeros(7)
    nv["decode_head.extra.weight"] = torch.zeros(1)
    model = _model(ADE, seed=3)
    before = model.state_dict()
    state = convert_segformer_state_dict(nv, model, partial=True)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["backbone.norm4.weight", "head.linear_pred.weight"]
    assert result.unexpected_keys == []
    assert torch.equal(model.state_dict()["backbone.norm4.weight"], before["backbone.norm4.weight"])
    assert torch.equal(model.head.linear_c2.proj.weight, nv["decode_head.linear_c2.proj.weight"])


def test_weakly_heads_are_missing_unless_partial() -> None:
    model = _model(ADE, cls_head=True)
    nv = _nvlabs(ADE)
    _error(
        nv,
        model,
        r"3 model tensor\(s\) missing \(classifier\.weight, attn_proj\.weight, attn_proj\.bias\)",
        r"model\.cls_head=true",
    )
    state = convert_segformer_state_dict(nv, model, partial=True)
    assert model.load_state_dict(state, strict=False).missing_keys == [
        "classifier.weight",
        "attn_proj.weight",
        "attn_proj.bias",
    ]


def test_other_output_strides_load_with_a_warning() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="mit_b0", head="segformer", output_stride=8)
    model = build_model(cfg, ADE)
    with pytest.warns(
        UserWarning, match=r"strides 4,2,2,2 \(output stride 32\); this model's are 4,2,1,1"
    ):
        state = convert_segformer_state_dict(_nvlabs(ADE), model)
    model.load_state_dict(state)


def test_not_a_segformer_file_or_model() -> None:
    with pytest.raises(ValueError, match=r"not a whole-network SegFormer checkpoint.*nvlabs"):
        convert_segformer_state_dict({"backbone.conv1.weight": torch.zeros(1)}, _model(ADE))
    resnet = build_model(ModelConfig(backbone="resnet18", width=0.25), ADE)
    with pytest.raises(
        ValueError, match=r"this nvlabs-layout SegFormer checkpoint needs a SegFormer"
    ):
        convert_segformer_state_dict(_nvlabs(ADE), resnet)


def test_model_pretrained_takes_a_huggingface_mit_file(tmp_path) -> None:
    """`model.pretrained` with a HuggingFace encoder file (the `segformer.encoder.*` names of an
    HF conversion, plus an ImageNet classifier, as nvidia/mit-b0's) loads strictly and gives the
    encoder exactly the tensors the NVlabs file gives it."""
    from components.models.mit import build_mit, load_pretrained_mit

    nvlabs = {k: v for k, v in _nvlabs().items() if k.startswith("backbone.")}
    hf = {k: v for k, v in _hf_from_nvlabs(nvlabs).items() if k.startswith("segformer.encoder.")}
    hf["classifier.weight"] = torch.zeros(1000, 256)  # the ImageNet head: reported, not loaded
    torch.save(nvlabs, tmp_path / "nvlabs.pth")
    torch.save(hf, tmp_path / "hf.bin")
    a, b = build_mit("mit_b0"), build_mit("mit_b0")
    load_pretrained_mit(a, str(tmp_path / "nvlabs.pth"))
    report = load_pretrained_mit(b, str(tmp_path / "hf.bin"))
    assert report["missing"] == [] and report["mismatched"] == []
    assert report["unexpected"] == ["classifier.weight"]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    cfg = ModelConfig(backbone="mit_b0", head="segformer", pretrained=str(tmp_path / "hf.bin"))
    build_model(cfg, ADE)  # the config path: strict, no error
