"""The composed TSCD objective on a real (tiny) MiT/SegFormer network, in process."""

from __future__ import annotations

import pytest
import torch

from components.config import Config, MethodConfig, ModelConfig, WeaklyConfig
from components.distillation.build import build_method
from components.models.build import build_model
from components.regimes import WEAKLY
from components.weakly.tscd import TSCD, balanced_seg_loss, to_unit_range

K = 4  # background + 3 foreground classes


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(
        backbone="mit_b0",
        head="segformer",
        width=0.25,
        output_stride=8,
        cls_head=True,
        drop_path=0.0,  # deterministic forwards
    )
    return build_model(cfg, K)


def _method(warmup=0, **weights) -> TSCD:
    m = MethodConfig(
        name="tscd",
        weakly=WeaklyConfig(
            weights=weights, warmup_iters=warmup, refine_iterations=2, scd_points=64
        ),
    )
    method = build_method(Config(method=m), _model(), None, num_classes=K)
    assert isinstance(method, TSCD)
    return method


def _batch(seed=0, b=2, size=64) -> dict:
    g = torch.Generator().manual_seed(seed)
    area = torch.ones(b, size, size, dtype=torch.bool)
    area[:, -8:, :] = False  # crop padding
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])[:b]
    return {
        "image": torch.randn(b, 3, size, size, generator=g),
        "labels": labels,
        "area": area,
        "mask": torch.randint(0, K, (b, size, size), generator=g),
        "valid": torch.ones(b, dtype=torch.bool),
        "background_only": torch.zeros(b, dtype=torch.bool),
    }


def _step(method: TSCD, batch: dict, seed: int = 1):
    torch.manual_seed(seed)  # SCD's sample points
    method.trainable.zero_grad()
    terms = method.training_step(batch)
    terms["loss"].backward()
    return terms


def test_no_teacher_and_needs_cls_head():
    assert not WEAKLY.needs_teacher("tscd")
    plain = build_model(ModelConfig(backbone="mit_b0", head="segformer", width=0.25), K)
    with pytest.raises(ValueError, match="cls_head"):
        TSCD(plain, MethodConfig(name="tscd"), WEAKLY.methods["tscd"])


def test_warmup_is_classification_only_but_every_parameter_gets_a_gradient():
    method = _method(warmup=5)
    terms = _step(method, _batch())
    assert set(terms) == {"cls", "loss", "background_only_share"}
    with torch.no_grad():
        logits = method.eval_model()(_batch()["image"])["cls_logits"]
    y = _batch()["labels"]
    # multi-label soft margin by hand: mean over classes of -[y log σ(x) + (1-y) log σ(-x)]
    by_hand = -(y * logits.sigmoid().log() + (1 - y) * (-logits).sigmoid().log()).mean()
    assert float(terms["cls"].detach()) == pytest.approx(float(by_hand), rel=1e-5)
    # Unused outputs join with weight 0: DDP-safe, every parameter has a (possibly 0) gradient.
    missing = [n for n, p in method.trainable.named_parameters() if p.grad is None]
    assert missing == []
    seg_grad = method.trainable.net.head.linear_pred.weight.grad
    assert torch.count_nonzero(seg_grad) == 0


def test_all_terms_after_warmup_and_total():
    method = _method(warmup=1)
    _step(method, _batch())
    terms = _step(method, _batch(seed=2))
    for key in ("cls", "seg", "aff", "scd", "pseudo_share", "pseudo_acc", "loss"):
        assert key in terms, key
    total = sum(float(terms[k].detach()) for k in ("cls", "seg", "aff", "scd"))
    assert float(terms["loss"].detach()) == pytest.approx(total, rel=1e-5)
    # The seg head and the affinity projection now learn.
    net = method.trainable.net
    assert torch.count_nonzero(net.head.linear_pred.weight.grad) > 0
    assert torch.count_nonzero(net.attn_proj.weight.grad) > 0
    assert 0 < float(terms["pseudo_share"]) <= 1


def test_without_cls_every_parameter_still_gets_a_gradient():
    # DDP without an unused-parameter search needs a gradient for every parameter, even when
    # a term is switched off (here the classifier only feeds the no-grad CAMs).
    method = _method(warmup=0, cls=0.0)
    terms = _step(method, _batch())
    assert "cls" not in terms and "seg" in terms
    missing = [n for n, p in method.trainable.named_parameters() if p.grad is None]
    assert missing == []


def test_scd_runs_in_float32_under_bf16_autocast():
    from components.weakly.scd import correspondence

    a, b = torch.rand(1, 3, 5), torch.rand(1, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = correspondence(a, b)
    assert c.dtype == torch.float32
    ref = torch.nn.functional.normalize(a, dim=1).transpose(1, 2) @ torch.nn.functional.normalize(
        b, dim=1
    )
    assert torch.allclose(c, ref, atol=1e-6)


def test_weights_switch_terms_off():
    method = _method(warmup=0, scd=0.0, aff=0.0)
    terms = _step(method, _batch())
    assert "scd" not in terms and "aff" not in terms and "seg" in terms


def test_masks_never_reach_the_loss():
    method = _method(warmup=0)
    batch = _batch()
    a = _step(method, batch, seed=3)
    grads_a = [p.grad.clone() for p in method.trainable.parameters()]
    batch["mask"] = torch.zeros_like(batch["mask"])
    method.iteration -= 1
    b = _step(method, batch, seed=3)
    for k in ("cls", "seg", "aff", "scd"):
        assert float(a[k].detach()) == pytest.approx(float(b[k].detach()), rel=1e-4, abs=1e-6), k
    for ga, gb in zip(grads_a, (p.grad for p in method.trainable.parameters())):
        assert torch.allclose(ga, gb, atol=1e-6)


def test_invalid_rows_are_left_out():
    method = _method(warmup=0)
    batch = _batch()
    batch["valid"] = torch.tensor([True, False])
    terms = _step(method, batch)
    assert torch.isfinite(terms["loss"])
    batch["valid"] = torch.tensor([False, False])
    terms = _step(method, batch)
    assert float(terms["loss"].detach()) == 0.0


def test_iteration_survives_extra_state():
    method = _method(warmup=3)
    for seed in range(2):
        _step(method, _batch(seed=seed))
    fresh = _method(warmup=3)
    fresh.load_extra_state(method.extra_state())
    assert fresh.iteration == 2
    assert "seg" not in _step(fresh, _batch())  # iteration 2 < 3: still warm-up
    assert "seg" in _step(fresh, _batch())


def test_balanced_seg_loss_by_hand():
    # 1 image, 2 classes, 4 pixels: two background, one foreground, one ignored.
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]]).repeat(1, 1, 2, 1)  # (1,2,2,2)
    labels = torch.tensor([[[0, 1], [0, 255]]])
    p = torch.softmax(logits[0], 0)
    bg = -(torch.log(p[0, 0, 0]) + torch.log(p[0, 1, 0])) / 2
    fg = -torch.log(p[1, 0, 1])
    assert float(balanced_seg_loss(logits, labels)) == pytest.approx(float((bg + fg) / 2))
    # no foreground pixel: the foreground half is 0, not NaN
    only_bg = torch.tensor([[[0, 0], [0, 255]]])
    assert torch.isfinite(balanced_seg_loss(logits, only_bg))


def test_to_unit_range_inverts_normalize():
    import numpy as np

    from components.data.transforms import normalize

    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 6, 3), dtype=np.uint8)
    back = to_unit_range(torch.from_numpy(normalize(rgb)))
    assert torch.allclose(back, torch.from_numpy(rgb).permute(0, 3, 1, 2) / 255.0, atol=1e-5)


def test_panel_map_keeps_to_the_images_classes():
    method = _method()
    batch = _batch()
    masks = torch.zeros(2, 64, 64, dtype=torch.long)
    masks[0, :16] = 2  # image 0: background and class 2; image 1: background only
    method.trainable.train()
    (maps,) = method.panel_maps(batch["image"], masks).values()
    assert maps.shape == (2, 64, 64)
    assert set(maps[0].unique().tolist()) <= {0, 2, 255}
    assert set(maps[1].unique().tolist()) <= {0, 255}
    assert method.trainable.training  # the network is back in its mode
