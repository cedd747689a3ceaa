"""The weakly supervised methods train the MiT encoder's LayerNorms at lr 0 (AFA / TSCD)."""

from __future__ import annotations

import pytest
import torch

from components.config import Config, MethodConfig, ModelConfig, OptimConfig, WeaklyConfig
from components.distillation.build import build_method
from components.models.build import build_model
from components.training.schedule import Schedule, build_optimizer, is_backbone_norm


def _method(freeze: bool = True, backbone: str = "mit_b1"):
    torch.manual_seed(0)
    model_cfg = ModelConfig(
        backbone=backbone, head="segformer", width=0.25, output_stride=16, cls_head=True
    )
    m = MethodConfig(name="tscd", weakly=WeaklyConfig(freeze_backbone_norms=freeze))
    return build_method(Config(method=m), build_model(model_cfg, 4), None, num_classes=4)


def _lr0_names(optimizer, module) -> set[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return {by_id[id(p)] for g in optimizer.param_groups if g["lr"] == 0.0 for p in g["params"]}


@pytest.mark.parametrize(("backbone", "count"), [("mit_b1", 60), ("mit_b2", 106)])
def test_encoder_norms_at_lr_zero(backbone: str, count: int) -> None:
    # AFA (rulixiang/afa wetr/model_attn_aff.py get_param_groups: `"norm" in name` over the
    # encoder) with scripts/dist_train_voc.py's `"lr": 0.0, ## freeze norm layers` group.
    # By hand, MiT-B1 (depths 2, 2, 2, 2): per block norm1 + norm2 (4 tensors), plus the
    # spatial-reduction norm in stages 1-3 (2 more): 6 x 6 + 2 x 4 = 44; four patch-embedding
    # norms (8) and four stage norms (8): 60, the count. MiT-B2 (3, 4, 6, 3):
    # 13 x 6 + 3 x 4 + 8 + 8 = 106.
    method = _method(backbone=backbone)
    optim = OptimConfig(name="adamw", lr=6e-5, head_lr_mult=10.0, weight_decay=0.01)
    opt = build_optimizer(method.trainable, optim)
    assert len(opt.param_groups) == 3
    frozen = opt.param_groups[2]
    assert (frozen["lr"], frozen["weight_decay"]) == (0.0, 0.0)
    names = _lr0_names(opt, method.trainable)
    assert len(names) == count
    assert all(n.startswith("net.backbone.") and "norm" in n for n in names)
    expected = {n for n, _ in method.trainable.named_parameters() if is_backbone_norm(n)}
    assert names == expected
    # Heads' norms (the SegFormer head's BatchNorm) still train at the head lr.
    assert "net.head.linear_fuse.bn.weight" not in names
    assert opt.param_groups[1]["lr"] == pytest.approx(6e-4)
    # The schedule keeps the frozen group at 0 at every iteration.
    schedule = Schedule.of(opt, 100, OptimConfig(poly_power=1.0, warmup_iters=10))
    for it in (0, 5, 50):
        schedule.apply(opt, it)
        assert opt.param_groups[2]["lr"] == 0.0 and opt.param_groups[0]["lr"] > 0


def test_frozen_norms_do_not_move_and_the_switch_restores_training() -> None:
    method = _method()
    optim = OptimConfig(name="adamw", lr=1e-2, head_lr_mult=10.0, weight_decay=0.01)
    opt = build_optimizer(method.trainable, optim)
    net = method.trainable.net
    before = net.backbone.norm4.weight.detach().clone()
    q_before = net.backbone.block4[0].attn.q.weight.detach().clone()
    out, _ = method.trainable(torch.randn(2, 3, 64, 64))
    (out["logits"].square().mean() + out["cls_logits"].square().mean()).backward()
    opt.step()
    assert torch.equal(net.backbone.norm4.weight, before)
    assert not torch.equal(net.backbone.block4[0].attn.q.weight, q_before)

    unfrozen = _method(freeze=False)
    opt = build_optimizer(unfrozen.trainable, optim)
    assert len(opt.param_groups) == 2 and _lr0_names(opt, unfrozen.trainable) == set()
