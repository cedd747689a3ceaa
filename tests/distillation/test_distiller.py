"""The composed distillers: term sets, published weights, totals, adapters, errors, extra state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from components.config import Config, ModelConfig, merge_config
from components.distillation.build import build_method, method_terms
from components.distillation.cirkd import memory_contrast_loss, minibatch_pixel_relation
from components.distillation.contourlet import structural_texture_loss
from components.distillation.cwd import channel_wise_distillation
from components.distillation.distiller import Distiller
from components.distillation.logits import pixel_kd
from components.distillation.protocol import segmentation_ce
from components.distillation.texture import statistical_texture_loss
from components.models.build import build_model
from components.training.checkpoint import load_full_state, save_checkpoint

K = 3


def _models(teacher_os: int = 8):
    torch.manual_seed(0)
    student = build_model(ModelConfig(backbone="resnet18", width=0.125), K)
    teacher = build_model(ModelConfig(backbone="resnet18", width=0.25, output_stride=teacher_os), K)
    return student, teacher.eval()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (2, 32, 32), generator=g)
    mask[:, :4] = 255
    return {"image": torch.randn(2, 3, 32, 32, generator=g), "mask": mask}


def _cfg(name: str, *overrides: str) -> Config:
    cfg = merge_config(None, [f"method.name={name}", *overrides])
    return cfg


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("kd", {"pi": 1.0}),
        ("cwd", {"cwd_feat": 50.0, "cwd_logit": 3.0}),
        ("skd", {"pi": 1.0, "skd": 10.0, "adv": 0.001}),
        ("adversarial", {"adv": 0.001}),
        ("cirkd", {"pi": 1.0, "batch_pixel": 1.0, "memory_pixel": 0.1, "memory_region": 0.1}),
        ("sstkd", {"pi": 10.0, "adv": 0.1, "str": 1.0, "sta": 1.0}),
    ],
)
def test_each_method_has_its_published_terms(name, expected):
    assert method_terms(name, _cfg(name).method.weights) == expected


def test_explicit_weights_override_the_published_ones():
    w = _cfg("sstkd", "method.weights.pi=2", "method.weights.sta=0").method.weights
    assert method_terms("sstkd", w) == {"pi": 2.0, "adv": 0.1, "str": 1.0, "sta": 0.0}


def test_explicit_pi_or_adv_combine_with_any_method():
    w = _cfg("cwd", "method.weights.pi=0.5", "method.weights.adv=0.01").method.weights
    assert method_terms("cwd", w) == {"cwd_feat": 50.0, "cwd_logit": 3.0, "pi": 0.5, "adv": 0.01}


@pytest.mark.parametrize("name", ["kd", "cwd", "skd", "adversarial", "cirkd", "sstkd"])
def test_every_term_is_reported_and_the_total_is_their_sum(name):
    student, teacher = _models()
    method = build_method(_cfg(name), student, teacher, num_classes=K)
    terms = method.training_step(_batch())
    expected = {"ce", "aux", "loss", *method_terms(name, _cfg(name).method.weights)}
    if "adv" in expected:
        expected.add("critic")  # logged, not part of the student's loss
    assert set(terms) == expected
    summed = sum(v for k, v in terms.items() if k not in ("loss", "critic"))
    torch.testing.assert_close(terms["loss"], summed)
    assert all(torch.isfinite(v) for v in terms.values())
    terms["loss"].backward()
    trainable = method.trainable
    assert all(p.grad is not None for p in trainable.adapters.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_sstkd_total_matches_the_terms_computed_by_hand():
    student, teacher = _models()
    cfg = _cfg("sstkd", "method.weights.adv=0")
    method = build_method(cfg, student, teacher, num_classes=K)
    batch = _batch()
    torch.manual_seed(3)  # the same dropout masks in both student forwards
    terms = method.training_step(batch)
    torch.manual_seed(3)
    with torch.no_grad():
        t = teacher(batch["image"])
        s = method.trainable(batch["image"])
    low_s, low_t = s["adapted"]["low"], t["features"]["low"]
    by_hand = (
        segmentation_ce(s["logits"], batch["mask"])
        + 0.4 * segmentation_ce(s["aux_logits"], batch["mask"])
        + 10.0 * pixel_kd(s["logits"], t["logits"])
        + structural_texture_loss(low_s, low_t, 2, 8)
        + statistical_texture_loss(low_s, low_t, 16, 3, 2.0)
    )
    # BN in train mode uses batch statistics in both forwards, so the values agree.
    torch.testing.assert_close(terms["loss"].detach(), by_hand, rtol=1e-4, atol=1e-5)


def test_cirkd_and_cwd_terms_match_their_functions_with_a_stride_16_teacher():
    # Teacher OS 16, student OS 8: embeddings differ in size and are resized, never cropped.
    student, teacher = _models(teacher_os=16)
    method = build_method(_cfg("cirkd"), student, teacher, num_classes=K)
    batch = _batch()
    torch.manual_seed(3)
    terms = method.training_step(batch)
    torch.manual_seed(3)
    with torch.no_grad():
        t_embed = teacher(batch["image"])["features"]["embed"]
        s_embed = method.trainable(batch["image"])["adapted"]["embed"]
    assert s_embed.shape[-1] == 2 * t_embed.shape[-1]
    torch.testing.assert_close(
        terms["batch_pixel"].detach(), minibatch_pixel_relation(s_embed, t_embed, 0.1)
    )
    pixel, _ = memory_contrast_loss(s_embed, t_embed, method.bank, 0.1, None, batch["mask"])
    assert terms["memory_pixel"] > 0 and pixel > 0
    assert int(method.bank.pixel_count.sum()) > 0

    method = build_method(_cfg("cwd"), *_models(teacher_os=16), num_classes=K)
    torch.manual_seed(3)
    terms = method.training_step(batch)
    torch.manual_seed(3)
    with torch.no_grad():
        t_embed = method.teacher(batch["image"])["features"]["embed"]
        s_embed = method.trainable(batch["image"])["adapted"]["embed"]
    torch.testing.assert_close(
        terms["cwd_feat"].detach(), 50 * channel_wise_distillation(s_embed, t_embed, 4.0)
    )


def test_zero_weights_remove_terms_and_their_adapters():
    student, teacher = _models()
    cfg = _cfg("sstkd", "method.weights.str=0", "method.weights.sta=0", "method.weights.adv=0")
    method = build_method(cfg, student, teacher, num_classes=K)
    assert len(method.trainable.adapters) == 0 and method.holistic is None
    assert set(method.training_step(_batch())) == {"ce", "aux", "pi", "loss"}
    assert method.eval_model() is student


class _NoLowTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.name = "segformer-stub"
        self.feature_channels = {"embed": 8}

    def forward(self, images):  # pragma: no cover - never reached
        raise AssertionError


def test_teacher_without_low_feature_is_named():
    student, _ = _models()
    with pytest.raises(ValueError, match=r"teacher model 'segformer-stub' has no 'low' feature"):
        build_method(_cfg("sstkd"), student, _NoLowTeacher(), num_classes=K)


def test_unknown_term_is_rejected():
    student, teacher = _models()
    with pytest.raises(ValueError, match="unknown distillation terms"):
        Distiller(student, teacher, {"pixel": 1.0}, _cfg("kd").method, K)


def test_critic_and_memory_bank_survive_a_checkpoint(tmp_path):
    student, teacher = _models()
    cfg = _cfg("cirkd", "method.weights.adv=0.01")
    method = Distiller(
        student, teacher, {"pi": 1.0, "memory_pixel": 0.1, "adv": 0.01}, cfg.method, K
    )
    for seed in range(2):
        method.training_step(_batch(seed))
    full = {"trainable": method.trainable.state_dict(), "method": method.extra_state()}
    save_checkpoint(str(tmp_path), method.eval_model().state_dict(), full, {"progress": {}})
    state, _ = load_full_state(str(tmp_path))

    student2, teacher2 = _models()
    fresh = Distiller(
        student2, teacher2, {"pi": 1.0, "memory_pixel": 0.1, "adv": 0.01}, cfg.method, K
    )
    fresh.trainable.load_state_dict(state["trainable"])
    fresh.load_extra_state(state["method"])
    for a, b in zip(method.bank.buffers(), fresh.bank.buffers()):
        assert torch.equal(a, b)
    assert fresh.holistic.optimizer.state_dict()["state"][0]["step"] == 2
    torch.manual_seed(7)
    expected = method.training_step(_batch(5))
    torch.manual_seed(7)
    got = fresh.training_step(_batch(5))
    for key in ("memory_pixel", "adv", "critic"):
        torch.testing.assert_close(got[key], expected[key])

    with pytest.raises(KeyError, match="no 'memory_bank' state"):
        fresh.load_extra_state({"holistic": copy.deepcopy(method.extra_state()["holistic"])})
