"""The affinity head reads the raw stage-4 attention logits q·kᵀ (AFA), not probabilities."""

from __future__ import annotations

import math

import torch

from components.models.build import build_model
from components.schema import ModelConfig


def _net(width: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="mit_b0",
        head="segformer",
        width=width,
        output_stride=8,
        cls_head=True,
        drop_path=0.0,
    )
    return build_model(cfg, 4).train()


def test_attn_pred_is_the_affinity_of_the_raw_logits() -> None:
    # rulixiang/afa wetr/model_attn_aff.py, WeTr.forward: cat(_attns[-2:], dim=1), plus its
    # transpose, 1x1 conv attn_proj, sigmoid; _attns are the unscaled q·kᵀ of
    # wetr/mix_transformer.py Attention.forward (`attn_ = (q @ k.transpose(-2, -1))`).
    net = _net()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pred = net(x)["attn_pred"]
        _, attns = net.backbone(x, need_weights=True)
    assert len(attns) == 2 and pred.shape == (2, 64, 64)
    cat = torch.cat(attns, dim=1)
    sym = cat + cat.transpose(-1, -2)
    w, b = net.attn_proj.weight[0, :, 0, 0], net.attn_proj.bias[0]
    expected = torch.sigmoid(torch.einsum("bcij,c->bij", sym, w) + b)
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, pred.transpose(-1, -2))


def test_affinity_spread_is_no_longer_flat() -> None:
    # With softmax probabilities (rows summing to 1 over N = 64 keys, ~1/64 each) the predicted
    # affinity was sigmoid(bias + ~0) everywhere: std ~1e-4 on this net (4e-3 at 96 px on
    # MiT-B1, issue 21). On the logits it spreads over (0, 1), as AFA's (~0.42 on MiT-B1).
    net = _net()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pred = net(x)["attn_pred"]
        _, attns = net.backbone(x, need_weights=True)
        scale = net.backbone.block4[0].attn.scale
        probs = torch.cat([(a * scale).softmax(-1) for a in attns], dim=1)
        old = torch.sigmoid(net.attn_proj(probs + probs.transpose(-1, -2)))[:, 0]
    assert pred.std() > 0.05
    assert old.std() < 0.01
    assert pred.std() > 20 * old.std()


def test_attn_proj_has_afa_init() -> None:
    # kaiming_normal_(a=sqrt(5), mode="fan_out") on a 1x1 conv to 1 channel: fan_out = 1, gain
    # sqrt(2 / (1 + 5)), so the weight std is sqrt(1/3) = 0.577 (AFA WeTr.__init__).
    stds = []
    for seed in range(20):
        torch.manual_seed(seed)
        stds.append(_net(0.25).attn_proj.weight.flatten())
    w = torch.cat(stds)
    assert abs(w.std().item() - math.sqrt(1 / 3)) < 0.08
