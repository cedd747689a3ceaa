"""The composed semi-supervised objective on a real (tiny) model, in process."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from components.config import Config, MethodConfig, ModelConfig, SemiSupConfig
from components.distillation.build import build_method
from components.models.build import build_model
from components.regimes import SEMI_SUPERVISED, regime_of
from components.semisup.method import SemiSupervised


def _method(name="cross_image", **semisup) -> SemiSupervised:
    torch.manual_seed(0)
    student = build_model(ModelConfig(width=0.125), num_classes=4)
    cfg = Config(method=MethodConfig(name=name, semisup=SemiSupConfig(**semisup)))
    method = build_method(cfg, student, None, num_classes=4)
    assert isinstance(method, SemiSupervised)
    return method


def _batch(seed=0, b_l=2, b_u=3, size=32) -> dict:
    g = torch.Generator().manual_seed(seed)
    area = torch.ones(b_u, size, size, dtype=torch.bool)
    area[:, -5:, :] = False  # padding at the bottom of the crops
    return {
        "image": torch.randn(b_l, 3, size, size, generator=g),
        "mask": torch.randint(0, 4, (b_l, size, size), generator=g),
        "valid": torch.ones(b_l, dtype=torch.bool),
        "u_image": torch.randn(b_u, 3, size, size, generator=g),
        "u_image_strong": torch.randn(b_u, 3, size, size, generator=g),
        "u_area": area,
        "u_mask": torch.randint(0, 4, (b_u, size, size), generator=g),
        "u_valid": torch.ones(b_u, dtype=torch.bool),
    }


def _step(method: SemiSupervised, batch: dict, seed: int = 1):
    torch.manual_seed(seed)  # the CutMix boxes
    method.trainable.zero_grad()
    terms = method.training_step(batch)
    terms["loss"].backward()
    grads = [p.grad.clone() for p in method.trainable.parameters() if p.grad is not None]
    return terms, grads


def test_terms_and_total():
    # Threshold 0: every real pixel gets a pseudo label, so `unsup` is active from step one.
    method = _method(threshold=0.0)
    terms, _ = _step(method, _batch())
    for key in ("ce", "aux", "unsup", "relation", "style", "loss", "confident_share", "pseudo_acc"):
        assert key in terms, key
    total = sum(float(terms[k].detach()) for k in ("ce", "aux", "unsup", "relation", "style"))
    assert float(terms["loss"].detach()) == pytest.approx(total, rel=1e-5)
    # Padding (5 of 32 rows) is never a pseudo label.
    assert float(terms["confident_share"]) == pytest.approx(1.0)


def test_unlabeled_masks_never_train():
    """The unlabeled split's masks are a diagnostic: loss and gradients do not depend on them."""
    method = _method(threshold=0.0)
    _step(method, _batch(seed=5))  # a previous unlabeled batch: CutMix's partner
    partner = method.partner

    def step(batch):
        method.partner = partner
        return _step(method, batch)

    batch = _batch()
    terms_a, grads_a = step(batch)
    other = dict(batch, u_mask=torch.randint(0, 4, batch["u_mask"].shape))
    terms_b, grads_b = step(other)
    no_mask = {k: v for k, v in batch.items() if k != "u_mask"}
    terms_c, grads_c = step(no_mask)
    assert float(terms_a["loss"]) == float(terms_b["loss"]) == float(terms_c["loss"])
    for a, b, c in zip(grads_a, grads_b, grads_c):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert float(terms_a["pseudo_acc"]) != float(terms_b["pseudo_acc"])
    assert "pseudo_acc" not in terms_c


def test_weights_switch_terms_and_fixmatch_is_the_base():
    base = _method("fixmatch", threshold=0.0)
    terms, _ = _step(base, _batch())
    assert "relation" not in terms and "style" not in terms and "unsup" in terms
    m = _method(threshold=0.0)
    m.weights.pop("relation")
    terms, _ = _step(m, _batch())
    assert "relation" not in terms and "style" in terms


def test_loss_scale_multiplies_every_term_and_the_gradient():
    """`loss_scale: 0.5` is UniMatch's `(loss_x + loss_u) / 2` (fixmatch.py L166): every term
    (cross-image ones too) and so the gradient are halved; the diagnostics are not."""
    terms_a, grads_a = _step(_method(threshold=0.0), _batch())
    terms_b, grads_b = _step(_method(threshold=0.0, loss_scale=0.5), _batch())
    for key in ("ce", "aux", "unsup", "relation", "style", "loss"):
        assert float(terms_b[key]) == pytest.approx(0.5 * float(terms_a[key]), rel=1e-6), key
    for key in ("confident_share", "pseudo_acc"):
        assert float(terms_b[key]) == float(terms_a[key]), key
    total = sum(float(terms_b[k].detach()) for k in ("ce", "aux", "unsup", "relation", "style"))
    assert float(terms_b["loss"].detach()) == pytest.approx(total, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, 0.5 * a, rtol=1e-5, atol=1e-8)


def test_ohem_labeled_loss_on_main_and_aux_logits(monkeypatch):
    """`labeled_loss: ohem` replaces ce and aux by UniMatch's OHEM CE over this worker's labeled
    batch (2 images x 32 x 32 = 2048 pixels here); threshold 1 keeps every pixel (plain CE)."""
    import components.semisup.method as method_module

    plain, _ = _step(_method(threshold=0.0), _batch())
    every, _ = _step(_method(threshold=0.0, labeled_loss="ohem", ohem_threshold=1.0), _batch())
    for key in ("ce", "aux", "unsup", "loss"):
        assert float(every[key]) == pytest.approx(float(plain[key]), rel=1e-5), key
    calls = []
    real = method_module.ohem_ce

    def spy(logits, mask, threshold, min_kept, ignore_index):
        calls.append((tuple(logits.shape), tuple(mask.shape), threshold, min_kept, ignore_index))
        return real(logits, mask, threshold, min_kept, ignore_index)

    monkeypatch.setattr(method_module, "ohem_ce", spy)
    hard = _method(threshold=0.0, labeled_loss="ohem", ohem_threshold=0.05, ohem_min_kept=100)
    mined, _ = _step(hard, _batch())
    assert [c[1:] for c in calls] == [((2, 32, 32), 0.05, 100, 255)] * 2  # main, then aux
    assert calls[0][0][0] == 2  # the labeled rows only
    # The kept pixels are the least probable ones: their mean CE is above the plain mean.
    assert float(mined["ce"]) > float(plain["ce"])
    assert float(mined["aux"]) > float(plain["aux"])
    assert float(mined["unsup"]) == pytest.approx(float(plain["unsup"]), rel=1e-5)


def test_default_relation_weight_is_the_former_weight_1_times_tau_squared():
    """Issue 21 item 10: the relation loss dropped its τ² factor (CIRKDv2's scale, where the
    weight is 1); the method's row weight 0.01 = 1 x τ² at the default τ = 0.1, so the default
    `cross_image` run's relation term is what it was."""
    cfg = Config(method=MethodConfig(name="cross_image"))
    assert SEMI_SUPERVISED.weights(cfg)["relation"] == 0.01
    assert 0.01 == pytest.approx(SemiSupConfig().relation_temperature ** 2, rel=1e-12)
    method = _method(threshold=0.0)
    assert method.weights["relation"] == 0.01


def test_invalid_unlabeled_rows_give_no_pseudo_labels():
    method = _method(threshold=0.0)
    batch = _batch()
    batch["u_valid"] = torch.tensor([True, False, False])
    terms, _ = _step(method, batch)
    assert float(terms["confident_share"]) == pytest.approx(1.0)  # of the usable pixels
    batch["u_valid"][:] = False
    terms, _ = _step(method, batch)
    assert float(terms["unsup"]) == 0.0 and float(terms["confident_share"]) == 0.0


def test_after_step_updates_the_ema_and_state_round_trips():
    method = _method(ema_momentum=0.5, style_memory_momentum=0.9)
    opt = torch.optim.SGD(method.trainable.parameters(), lr=0.1)
    for _ in range(2):
        _terms, _ = _step(method, _batch())
        opt.step()
        method.after_step()
    assert method.ema.updates == 2
    # Update 0 copies the student (α = 0); update 1 averages with α = 0.5: teacher != student.
    t = dict(method.ema.model.named_parameters())
    s = dict(method.trainable.named_parameters())
    assert not torch.equal(t["head.classifier.weight"], s["head.classifier.weight"])
    state = method.extra_state()
    fresh = _method(ema_momentum=0.5, style_memory_momentum=0.9)
    fresh.load_extra_state(state)
    assert fresh.ema.updates == 2
    for a, b in zip(fresh.ema.model.state_dict().values(), method.ema.model.state_dict().values()):
        assert torch.equal(a, b)
    torch.testing.assert_close(fresh.style_memory.mean, method.style_memory.mean)


def test_eval_model_choice_and_no_external_teacher():
    assert regime_of("cross_image") is regime_of("fixmatch") is SEMI_SUPERVISED
    assert not SEMI_SUPERVISED.needs_teacher("cross_image")
    assert not SEMI_SUPERVISED.needs_teacher("fixmatch")
    m = _method(evaluate="ema")
    assert m.eval_model() is m.ema.model
    s = _method()  # the student by default
    assert s.eval_model() is s.trainable


def test_training_reduces_the_loss_on_a_fixed_batch():
    method = _method("cross_image", threshold=0.0, strong=["colour_jitter"])
    opt = torch.optim.SGD(method.trainable.parameters(), lr=0.05, momentum=0.9)
    batch = _batch()
    batch["mask"] = (batch["image"][:, 0] > 0).long() * 2  # learnable: the sign of channel 0
    first = None
    for _ in range(15):
        terms = method.training_step(batch)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        method.after_step()
        first = first if first is not None else float(terms["ce"].detach())
    assert float(terms["ce"].detach()) < 0.8 * first


def test_config_validation():
    from components.config import ConfigError, validate

    for change, key in (
        ({"threshold": 1.5}, "method.semisup.threshold"),
        ({"ema_momentum": 1.0}, "method.semisup.ema_momentum"),
        ({"strong": ["mixup"]}, "method.semisup.strong"),
        ({"feature": "logits"}, "method.semisup.feature"),
        ({"evaluate": "teacher"}, "method.semisup.evaluate"),
        ({"labeled_loss": "focal"}, "method.semisup.labeled_loss"),
        ({"ohem_threshold": 0.0}, "method.semisup.ohem_threshold"),
        ({"ohem_threshold": 1.2}, "method.semisup.ohem_threshold"),
        ({"ohem_min_kept": -1}, "method.semisup.ohem_min_kept"),
        ({"loss_scale": 0.0}, "method.semisup.loss_scale"),
        # 8 labeled 48 px crops per worker = 18432 pixels: OHEM could never select.
        ({"labeled_loss": "ohem", "ohem_min_kept": 18433}, "method.semisup.ohem_min_kept"),
    ):
        cfg = Config(method=MethodConfig(name="cross_image", semisup=SemiSupConfig(**change)))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(cfg)
    ok = SemiSupConfig(labeled_loss="ohem", ohem_threshold=1.0, ohem_min_kept=18432)
    validate(Config(method=MethodConfig(name="cross_image", semisup=ok)))
    cfg = Config()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, labeled_count=0))
    with pytest.raises(ConfigError, match="data.labeled_count"):
        validate(cfg)


def test_panel_map_is_the_ema_teachers_confident_pseudo_labels():
    from components.semisup.fixmatch import pseudo_labels

    method = _method(threshold=0.3)
    images = _batch()["image"]
    (maps,) = method.panel_maps(images, torch.zeros(images.shape[0], *images.shape[-2:])).values()
    with torch.no_grad():
        labels, _, confident = pseudo_labels(
            method.ema.model(images)["logits"], 0.3, images.shape[-2:]
        )
    assert maps.shape == images.shape[:1] + images.shape[-2:]
    assert torch.equal(maps[confident], labels[confident])
    assert bool((maps[~confident] == 255).all())


def test_cutmix_with_one_unlabeled_image_mixes_the_previous_batch(monkeypatch):
    """A batch of one: the partner is the previous step's image (UniMatch mixes with a second
    unlabeled batch, LiheYoung/UniMatch@0324f3d unimatch.py L121-145 and L161-172), re-predicted
    by the current teacher; the box carries that image's strong view, pseudo labels and real-pixel
    mask, and `unsup` divides by the mixed real pixels (unimatch.py L176-178)."""
    import components.semisup.method as method_module

    method = _method("fixmatch", threshold=0.0, cutmix_prob=1.0)
    seen = []
    method.trainable.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    captured = {}
    real_ce = method_module.confident_ce

    def spy(logits, labels, confident, usable):
        captured.update(labels=labels, confident=confident, usable=usable)
        return real_ce(logits, labels, confident, usable)

    monkeypatch.setattr(method_module, "confident_ce", spy)
    first, second = _batch(seed=0, b_u=1), _batch(seed=1, b_u=1)
    second["u_area"][:] = True  # no padding in the second image: the box brings the first's
    _step(method, first)
    # No previous batch yet and nothing to roll: the first step is not mixed.
    assert torch.equal(seen[-1][2:], first["u_image_strong"])
    _step(method, second)
    student_u = seen[-1][2:]
    assert not torch.equal(student_u, second["u_image_strong"])  # before the fix: equal
    inside = (student_u == first["u_image_strong"]).all(1)[0]  # (H, W): the box
    outside = (student_u == second["u_image_strong"]).all(1)[0]
    assert bool((inside ^ outside).all()) and 0 < int(inside.sum()) < inside.numel()
    from components.semisup.fixmatch import pseudo_labels

    with torch.no_grad():
        size = first["u_image"].shape[-2:]
        t_first = pseudo_labels(method.ema.model(first["u_image"])["logits"], 0.0, size)[0][0]
        t_second = pseudo_labels(method.ema.model(second["u_image"])["logits"], 0.0, size)[0][0]
    assert bool((t_first[inside] != t_second[inside]).any())  # the check can tell them apart
    labels = captured["labels"][0]
    assert torch.equal(labels[inside], t_first[inside])
    assert torch.equal(labels[outside], t_second[outside])
    usable = captured["usable"][0]
    assert torch.equal(usable[inside], first["u_area"][0][inside])
    assert bool(usable[outside].all())
    assert torch.equal(captured["confident"][0], usable)  # threshold 0: every real pixel
