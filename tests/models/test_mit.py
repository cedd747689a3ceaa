"""MiT encoder and SegFormer head: shapes and strides, the NVlabs key layout, attention maps,
pretrained loading, DropPath, and the head against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.models.heads import SegFormerHead
from components.models.mit import (
    Attention,
    DropPath,
    MixVisionTransformer,
    build_mit,
    load_pretrained_mit,
    mit_config,
)


def _mit(name: str = "mit_b0", width: float = 0.25, seed: int = 0, **kw) -> MixVisionTransformer:
    torch.manual_seed(seed)
    return build_mit(name, width=width, **kw)


@pytest.fixture(scope="module")
def full_b0() -> MixVisionTransformer:
    return _mit("mit_b0", width=1.0)


@pytest.mark.parametrize(
    ("name", "width", "strides", "size", "channels", "hw"),
    [
        ("mit_b0", 0.25, (4, 2, 2, 2), 64, (8, 16, 40, 64), (16, 8, 4, 2)),
        ("mit_b0", 0.25, (4, 2, 2, 1), 64, (8, 16, 40, 64), (16, 8, 4, 4)),
        # 40 px: sizes round up (10, 5, 3, 2), as the convs' padding makes them.
        ("mit_b1", 0.25, (4, 2, 2, 2), 40, (16, 32, 80, 128), (10, 5, 3, 2)),
    ],
)
def test_output_shapes_and_strides(name, width, strides, size, channels, hw) -> None:
    model = _mit(name, width, strides=strides).eval()
    assert model.out_channels == channels
    assert model.output_stride == math.prod(strides)
    assert model.num_heads == (1, 2, 5, 8)
    assert model.depths == mit_config(name)["depths"]
    with torch.no_grad():
        feats, attns = model(torch.randn(2, 3, size, size))
    assert [tuple(f.shape) for f in feats] == [(2, c, s, s) for c, s in zip(channels, hw)]
    n = hw[3] ** 2
    assert len(attns) == model.depths[3]
    for attn in attns:
        assert attn.shape == (2, 8, n, n)
        # Raw logits q·kᵀ (AFA): signed, rows do not sum to one.
        assert (attn < 0).any() and (attn > 0).any()


def test_variant_table() -> None:
    depths = {"mit_b0": (2, 2, 2, 2), "mit_b1": (2, 2, 2, 2), "mit_b2": (3, 4, 6, 3)}
    depths |= {"mit_b3": (3, 4, 18, 3), "mit_b4": (3, 8, 27, 3), "mit_b5": (3, 6, 40, 3)}
    for name, d in depths.items():
        cfg = mit_config(name)
        dims = (32, 64, 160, 256) if name == "mit_b0" else (64, 128, 320, 512)
        assert cfg["embed_dims"] == dims
        assert cfg["depths"] == d
        assert cfg["num_heads"] == (1, 2, 5, 8)
        assert cfg["sr_ratios"] == (8, 4, 2, 1)
        assert cfg["mlp_ratios"] == (4, 4, 4, 4)
    # Width keeps every stage divisible by its heads, with at least 8 channels per head.
    assert mit_config("mit_b1", 0.5)["embed_dims"] == (32, 64, 160, 256)
    assert mit_config("mit_b0", 0.01)["embed_dims"] == (8, 16, 40, 64)


def test_attention_maps_only_when_asked() -> None:
    model = _mit().eval()
    x = torch.randn(1, 3, 64, 64)
    feats, attns = model(x)
    lean, none = model(x, need_weights=False)
    assert len(attns) == len(model.block4) and none == []
    for a, b in zip(feats, lean):
        assert torch.allclose(a, b, atol=1e-5)


def test_unknown_variant_and_small_input() -> None:
    with pytest.raises(ValueError, match=r"'mit_b9'.*mit_b0.*mit_b5"):
        build_mit("mit_b9")
    # Stage 1 of a 16 px image is 4x4, smaller than its reduction 8: zero-padded to one cell.
    feats, _ = _mit()(torch.randn(1, 3, 16, 16))
    assert [f.shape[-1] for f in feats] == [4, 2, 1, 1]
    assert all(torch.isfinite(f).all() for f in feats)
    attn = Attention(8, 1, sr_ratio=8).eval()
    tokens = torch.randn(1, 12, 8)  # a 3x4 map
    out, weights = attn(tokens, 3, 4, need_weights=True)
    assert weights.shape == (1, 1, 12, 1)  # one key/value token
    padded = torch.nn.functional.pad(tokens.transpose(1, 2).reshape(1, 8, 3, 4), (0, 4, 0, 5))
    kv_token = attn.norm(attn.sr(padded).flatten(2).transpose(1, 2))
    v = attn.kv(kv_token)[..., 8:]
    assert torch.allclose(out, attn.proj(v.expand(1, 12, 8)), atol=1e-5)


def test_official_state_dict_keys(full_b0) -> None:
    sd = full_b0.state_dict()
    expected = {
        "patch_embed1.proj.weight": (32, 3, 7, 7),
        "patch_embed1.proj.bias": (32,),
        "patch_embed1.norm.weight": (32,),
        "patch_embed2.proj.weight": (64, 32, 3, 3),
        "patch_embed4.norm.bias": (256,),
        "block1.0.norm1.weight": (32,),
        "block1.0.attn.q.weight": (32, 32),
        "block1.0.attn.q.bias": (32,),
        "block1.0.attn.kv.weight": (64, 32),
        "block1.0.attn.kv.bias": (64,),
        "block1.0.attn.proj.weight": (32, 32),
        "block1.0.attn.sr.weight": (32, 32, 8, 8),
        "block1.0.attn.sr.bias": (32,),
        "block1.0.attn.norm.weight": (32,),
        "block1.1.norm2.bias": (32,),
        "block1.1.mlp.fc1.weight": (128, 32),
        "block3.1.attn.sr.weight": (160, 160, 2, 2),
        "block4.1.mlp.dwconv.dwconv.weight": (1024, 1, 3, 3),
        "block4.1.mlp.dwconv.dwconv.bias": (1024,),
        "block4.1.mlp.fc2.weight": (256, 1024),
        "norm1.weight": (32,),
        "norm4.weight": (256,),
        "norm4.bias": (256,),
    }
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    # The last stage has sr ratio 1: no reduction conv or norm, as in the release.
    for absent in ("block4.0.attn.sr.weight", "block4.0.attn.norm.weight", "block1.2.norm1.weight"):
        assert absent not in sd
    assert not any(k.startswith("head.") for k in sd)
    assert {k.split(".")[0] for k in sd} == {
        *(f"{p}{i}" for p in ("patch_embed", "block", "norm") for i in range(1, 5))
    }


def test_parameter_counts(full_b0) -> None:
    # SegFormer, Table 1: encoder 3.4M (B0) and 13.1M (B1); the release's b0 has 3.32M.
    assert 3.3e6 <= sum(p.numel() for p in full_b0.parameters()) <= 3.4e6
    b1 = _mit("mit_b1", width=1.0)
    assert 13.0e6 <= sum(p.numel() for p in b1.parameters()) <= 13.2e6


def test_patch_embeds_norms_and_drop_path_schedule(full_b0) -> None:
    pe1, pe4 = full_b0.patch_embed1.proj, _mit(strides=(4, 2, 2, 1)).patch_embed4.proj
    assert (pe1.kernel_size, pe1.stride, pe1.padding) == ((7, 7), (4, 4), (3, 3))
    assert (pe4.kernel_size, pe4.stride, pe4.padding) == ((3, 3), (1, 1), (1, 1))
    assert full_b0.patch_embed2.proj.stride == (2, 2)
    # The release: eps 1e-6 in blocks and stage norms, PyTorch's default elsewhere.
    assert full_b0.block2[0].norm1.eps == 1e-6
    assert full_b0.block2[0].attn.norm.eps == 1e-5
    assert full_b0.norm3.eps == 1e-6
    assert full_b0.patch_embed1.norm.eps == 1e-5
    rates = [blk.drop_path.p for i in range(1, 5) for blk in getattr(full_b0, f"block{i}")]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())


def test_segformer_init(full_b0) -> None:
    fc1 = full_b0.block1[0].mlp.fc1
    assert fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert (fc1.bias == 0).all()
    conv = full_b0.patch_embed1.proj
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (49 * 32)), rel=0.1)
    dw = full_b0.block1[0].mlp.dwconv.dwconv  # fan_out divides by groups: 9 * 128 / 128
    assert dw.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.1)


@pytest.mark.parametrize("sr", [1, 2])
def test_attention_paths_agree_with_hand_computation(sr: int) -> None:
    torch.manual_seed(0)
    dim, heads, h, w = 24, 3, 6, 4
    attn_mod = Attention(dim, heads, sr).eval()
    for p in attn_mod.parameters():
        nn.init.normal_(p, std=0.3)  # random biases too, so the q/k/v split is exercised
    x = torch.randn(2, h * w, dim)
    out_explicit, attn = attn_mod(x, h, w, need_weights=True)
    out_sdpa, none = attn_mod(x, h, w, need_weights=False)
    assert none is None
    torch.testing.assert_close(out_explicit, out_sdpa, rtol=1e-5, atol=1e-5)

    # Independent: the release's layout, kv = [k; v] rows, head j on channels j*d:(j+1)*d.
    d = dim // heads
    kv_in = x
    if sr > 1:
        grid = x.transpose(1, 2).reshape(2, dim, h, w)
        kv_in = F.conv2d(grid, attn_mod.sr.weight, attn_mod.sr.bias, stride=sr)
        kv_in = F.layer_norm(
            kv_in.flatten(2).transpose(1, 2), (dim,), attn_mod.norm.weight, attn_mod.norm.bias
        )
    q = x @ attn_mod.q.weight.T + attn_mod.q.bias
    kv = kv_in @ attn_mod.kv.weight.T + attn_mod.kv.bias
    k, v = kv[..., :dim], kv[..., dim:]
    m = kv_in.shape[1]
    assert m == (h // sr) * (w // sr)
    probs = []
    out = []
    for j in range(heads):
        sl = slice(j * d, (j + 1) * d)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d), dim=-1)
        probs.append(p)
        out.append(p @ v[..., sl])
    # The returned maps are the raw logits q·kᵀ, before the 1/sqrt(d) scale and the softmax, as
    # AFA's Attention.forward returns `attn_ = q @ k.transpose(-2, -1)` (rulixiang/afa
    # wetr/mix_transformer.py, Attention.forward, ~line 107; the scaled softmax ~line 112).
    logits = torch.stack(
        [
            q[..., j * d : (j + 1) * d] @ k[..., j * d : (j + 1) * d].transpose(1, 2)
            for j in range(heads)
        ],
        dim=1,
    )
    torch.testing.assert_close(attn, logits, rtol=1e-5, atol=1e-5)
    scaled = (attn * attn_mod.scale).softmax(-1)
    torch.testing.assert_close(scaled, torch.stack(probs, dim=1), rtol=1e-5, atol=1e-6)
    expected = torch.cat(out, dim=-1) @ attn_mod.proj.weight.T + attn_mod.proj.bias
    torch.testing.assert_close(out_explicit, expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    model = _mit(drop_path_rate=0.0).train()
    # 64 px: a 2x2 last stage, since one token's attention (softmax over one key) has no gradient.
    feats, attns = model(torch.randn(2, 3, 64, 64))
    loss = sum(f.square().mean() for f in feats) + sum(a.square().mean() for a in attns)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_pretrained_round_trip(tmp_path) -> None:
    source = _mit(seed=0).eval()
    target = _mit(seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = target(x)[0][3]
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["head.weight"] = torch.randn(1000, 64)  # the ImageNet classifier: ignored
    state["head.bias"] = torch.randn(1000)
    path = tmp_path / "mit_b0.pth"
    torch.save({"state_dict": state}, path)

    report = load_pretrained_mit(target, str(path))
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    with torch.no_grad():
        (fs, as_), (ft, at) = source(x), target(x)
    assert not torch.allclose(before, ft[3])
    for a, b in zip(fs + as_, ft + at):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pretrained_partial_and_bad_files(tmp_path) -> None:
    model = _mit(seed=1)
    sd = _mit(seed=0).state_dict()
    sd["norm4.bias"] = torch.randn(64)
    # A SegFormer-style checkpoint: encoder under "backbone.", a decoder, one encoder key missing.
    partial = {f"backbone.{k}": v for k, v in sd.items() if k != "norm4.bias"}
    partial["decode_head.linear_pred.weight"] = torch.zeros(3, 8, 1, 1)
    partial["backbone.norm1.weight"] = torch.zeros(99)  # wrong shape: skipped
    path = tmp_path / "segformer.pth"
    torch.save(partial, path)
    with pytest.raises(
        ValueError, match=r"fits the MiT encoder only in part: 1 tensor\(s\) missing"
    ):
        load_pretrained_mit(model, str(path))  # by default: an error, nothing loaded
    assert not torch.equal(model.block1[0].attn.q.weight, sd["block1.0.attn.q.weight"])
    report = load_pretrained_mit(model, str(path), partial=True)
    assert report == {
        "missing": ["norm4.bias"],
        "unexpected": ["decode_head.linear_pred.weight"],
        "mismatched": ["norm1.weight"],
    }
    assert torch.equal(model.block1[0].attn.q.weight, sd["block1.0.attn.q.weight"])
    assert (model.norm4.bias == 0).all() and (model.norm1.weight == 1).all()

    bad = tmp_path / "unrelated.pth"
    torch.save({"conv1.weight": torch.zeros(1), "head.weight": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="unrelated.pth"):
        load_pretrained_mit(model, str(bad))
    wider = tmp_path / "wider.pth"
    torch.save(_mit(width=0.5).state_dict(), wider)
    with pytest.raises(ValueError, match=r"wider\.pth.*differ in shape"):
        load_pretrained_mit(model, str(wider))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_pretrained_mit(model, str(junk))


def test_drop_path() -> None:
    x = torch.randn(4000, 3, 2)
    dp = DropPath(0.25)
    assert dp.eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    torch.manual_seed(0)
    y = dp.train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert (kept | dropped).all()  # whole samples, not elements
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.72 < kept.float().mean().item() < 0.78
    with pytest.raises(ValueError):
        DropPath(1.0)


def _head_inputs() -> list[torch.Tensor]:
    torch.manual_seed(0)
    chans, sizes = (8, 16, 40, 64), (16, 8, 4, 2)
    return [torch.randn(2, c, s, s) for c, s in zip(chans, sizes)]


def test_segformer_head_shapes_and_keys() -> None:
    head = SegFormerHead((8, 16, 40, 64), num_classes=5, embed_dim=32)
    assert head.channels == 32
    sd = head.state_dict()
    for key in (
        "linear_c1.proj.weight",
        "linear_c4.proj.weight",
        "linear_c4.proj.bias",
        "linear_fuse.conv.weight",
        "linear_fuse.bn.weight",
        "linear_fuse.bn.running_mean",
        "linear_pred.weight",
        "linear_pred.bias",
    ):
        assert key in sd, key
    assert "linear_fuse.conv.bias" not in sd
    assert sd["linear_c3.proj.weight"].shape == (32, 40)
    assert sd["linear_fuse.conv.weight"].shape == (32, 128, 1, 1)
    embed, logits = head.train()(_head_inputs())
    assert embed.shape == (2, 32, 16, 16)
    assert logits.shape == (2, 5, 16, 16)

    # On a real encoder, at stride 4 for either last-stage stride.
    model = _mit(strides=(4, 2, 2, 1)).eval()
    with torch.no_grad():
        embed, logits = head.eval()(model(torch.randn(1, 3, 48, 48))[0])
    assert embed.shape == (1, 32, 12, 12) and logits.shape == (1, 5, 12, 12)


def test_segformer_head_matches_hand_computation() -> None:
    torch.manual_seed(1)
    head = SegFormerHead((8, 16, 40, 64), num_classes=5, embed_dim=12).eval()
    bn = head.linear_fuse.bn
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    nn.init.normal_(head.linear_pred.bias)
    feats = _head_inputs()
    with torch.no_grad():
        embed, logits = head(feats)

    size = feats[0].shape[-2:]
    parts = []
    for i in (4, 3, 2, 1):  # SegFormer's concatenation order
        lin = getattr(head, f"linear_c{i}").proj
        y = torch.einsum("bchw,ec->behw", feats[i - 1], lin.weight) + lin.bias[:, None, None]
        parts.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
    fused = torch.einsum(
        "bchw,ec->behw", torch.cat(parts, 1), head.linear_fuse.conv.weight[:, :, 0, 0]
    )
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    expected = torch.relu(
        (fused - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    )
    torch.testing.assert_close(embed, expected, rtol=1e-5, atol=1e-5)
    pred = head.linear_pred
    expected_logits = torch.einsum("bchw,kc->bkhw", expected, pred.weight[:, :, 0, 0])
    torch.testing.assert_close(logits, expected_logits + pred.bias[:, None, None])


def test_stage4_logits_are_q_dot_k_from_the_block_weights() -> None:
    # A tiny MiT: the encoder's stage-4 maps equal q·kᵀ computed by hand from block4's weights
    # on the tokens that enter each block (captured as the output of each block's norm1).
    model = _mit(strides=(4, 2, 2, 1)).eval()
    seen: list[torch.Tensor] = []
    hooks = [
        blk.norm1.register_forward_hook(lambda m, i, o: seen.append(o)) for blk in model.block4
    ]
    with torch.no_grad():
        _, attns = model(torch.randn(2, 3, 32, 32))
    for hook in hooks:
        hook.remove()
    assert len(attns) == len(seen) == 2
    for blk, tokens, attn in zip(model.block4, seen, attns):
        a = blk.attn
        heads, c = a.num_heads, tokens.shape[-1]
        d = c // heads
        q = tokens @ a.q.weight.T + a.q.bias
        k = (tokens @ a.kv.weight.T + a.kv.bias)[..., :c]  # kv rows: [k; v]
        for j in range(heads):
            expected = q[..., j * d : (j + 1) * d] @ k[..., j * d : (j + 1) * d].transpose(1, 2)
            torch.testing.assert_close(attn[:, j], expected, rtol=1e-5, atol=1e-5)
