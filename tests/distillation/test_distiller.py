"""The composed distillers: term rows, published weights, totals, adapters, errors, extra state,
and a new term added through the table alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from components.config import Config, ConfigError, ModelConfig, merge_config
from components.distillation.build import build_method
from components.distillation.cirkd import memory_contrast_loss, minibatch_pixel_relation
from components.distillation.contourlet import structural_texture_loss
from components.distillation.cwd import channel_wise_distillation
from components.distillation.distiller import Distiller
from components.distillation.logits import pixel_kd
from components.distillation.protocol import segmentation_ce
from components.distillation.term import Term
from components.distillation.terms import TERMS, method_terms
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
        ("kd", {"pixel_kd": 1.0}),
        ("cwd", {"cwd_feature": 50.0, "cwd_logit": 3.0}),
        ("skd", {"pixel_kd": 1.0, "pairwise": 10.0, "adversarial": 0.001}),
        ("adversarial", {"adversarial": 0.001}),
        (
            "cirkd",
            {"pixel_kd": 1.0, "batch_pixel": 1.0, "memory_pixel": 0.1, "memory_region": 0.1},
        ),
        ("sstkd", {"pixel_kd": 10.0, "adversarial": 0.1, "structural": 1.0, "statistical": 1.0}),
    ],
)
def test_each_method_has_its_published_terms(name, expected):
    assert method_terms(name, _cfg(name).method.weights) == expected


def test_explicit_weights_override_the_published_ones():
    w = _cfg("sstkd", "method.weights.pixel_kd=2", "method.weights.statistical=0").method.weights
    expected = {"pixel_kd": 2.0, "structural": 1.0, "statistical": 0.0, "adversarial": 0.1}
    assert method_terms("sstkd", w) == expected


def test_any_explicit_term_combines_with_any_method():
    w = _cfg("cwd", "method.weights.pixel_kd=0.5", "method.weights.adversarial=0.01").method.weights
    expected = {"pixel_kd": 0.5, "cwd_logit": 3.0, "cwd_feature": 50.0, "adversarial": 0.01}
    assert method_terms("cwd", w) == expected
    assert list(method_terms("cwd", w)) == list(expected)  # the table's computation order


@pytest.mark.parametrize("name", ["kd", "cwd", "skd", "adversarial", "cirkd", "sstkd"])
def test_every_term_is_reported_and_the_total_is_their_sum(name):
    student, teacher = _models()
    method = build_method(_cfg(name), student, teacher, num_classes=K)
    terms = method.training_step(_batch())
    expected = {"ce", "aux", "loss", *method_terms(name, _cfg(name).method.weights)}
    if "adversarial" in expected:
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
    cfg = _cfg("sstkd", "method.weights.adversarial=0")
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
    bank = method.states["memory_bank"].bank
    pixel, _ = memory_contrast_loss(s_embed, t_embed, bank, 0.1, None, batch["mask"])
    assert terms["memory_pixel"] > 0 and pixel > 0
    assert int(bank.pixel_count.sum()) > 0

    method = build_method(_cfg("cwd"), *_models(teacher_os=16), num_classes=K)
    torch.manual_seed(3)
    terms = method.training_step(batch)
    torch.manual_seed(3)
    with torch.no_grad():
        t_embed = method.teacher(batch["image"])["features"]["embed"]
        s_embed = method.trainable(batch["image"])["adapted"]["embed"]
    # Normalised by the student's own channels, as CIRKD's CriterionCWD (losses/cwd.py): here
    # fewer than the teacher's, so the term is larger than the per-map mean by their ratio.
    c_s, c_t = method.student_channels["embed"], t_embed.shape[1]
    expected = 50 * channel_wise_distillation(s_embed, t_embed, 4.0, student_channels=c_s)
    torch.testing.assert_close(terms["cwd_feature"].detach(), expected)
    per_map = 50 * channel_wise_distillation(s_embed, t_embed, 4.0)
    torch.testing.assert_close(terms["cwd_feature"].detach(), per_map * c_t / c_s)


def test_zero_weights_remove_terms_and_their_adapters():
    student, teacher = _models()
    off = ("structural", "statistical", "adversarial")
    cfg = _cfg("sstkd", *(f"method.weights.{k}=0" for k in off))
    method = build_method(cfg, student, teacher, num_classes=K)
    assert len(method.trainable.adapters) == 0 and method.states == {}
    assert set(method.training_step(_batch())) == {"ce", "aux", "pixel_kd", "loss"}
    assert method.eval_model() is student


def test_method_none_needs_no_teacher_and_trains_the_student_alone():
    student, _ = _models()
    method = build_method(_cfg("none"), student, None, num_classes=K)
    assert method.trainable is student and method.teacher is None
    terms = method.training_step(_batch())
    assert set(terms) == {"ce", "aux", "loss"}
    with pytest.raises(ValueError, match="need a teacher"):
        build_method(_cfg("kd"), student, None, num_classes=K)


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
        Distiller(student, teacher, {"pixel": 1.0}, _cfg("kd").method, K, TERMS)


def test_critic_and_memory_bank_survive_a_checkpoint(tmp_path):
    student, teacher = _models()
    cfg = _cfg("cirkd", "method.weights.adversarial=0.01")
    weights = {"pixel_kd": 1.0, "memory_pixel": 0.1, "adversarial": 0.01}
    method = Distiller(student, teacher, weights, cfg.method, K, TERMS)
    for seed in range(2):
        method.training_step(_batch(seed))
    full = {"trainable": method.trainable.state_dict(), "method": method.extra_state()}
    save_checkpoint(str(tmp_path), method.eval_model().state_dict(), full, {"progress": {}})
    state, _ = load_full_state(str(tmp_path))

    student2, teacher2 = _models()
    fresh = Distiller(student2, teacher2, weights, cfg.method, K, TERMS)
    fresh.trainable.load_state_dict(state["trainable"])
    fresh.load_extra_state(state["method"])
    banks = [m.states["memory_bank"].bank for m in (method, fresh)]
    for a, b in zip(banks[0].buffers(), banks[1].buffers()):
        assert torch.equal(a, b)
    assert fresh.states["holistic"].optimizer.state_dict()["state"][0]["step"] == 2
    torch.manual_seed(7)
    expected = method.training_step(_batch(5))
    torch.manual_seed(7)
    got = fresh.training_step(_batch(5))
    for key in ("memory_pixel", "adversarial", "critic"):
        torch.testing.assert_close(got[key], expected[key])

    with pytest.raises(KeyError, match="no 'memory_bank' state"):
        fresh.load_extra_state({"holistic": copy.deepcopy(method.extra_state()["holistic"])})


def _toy_term(student: torch.Tensor, teacher: torch.Tensor, view, state) -> torch.Tensor:
    """Mean squared difference of the adapted `embed` maps, plus a counter kept as state."""
    state.steps += 1
    t = torch.nn.functional.interpolate(teacher, size=student.shape[-2:], mode="bilinear")
    return (student - t).pow(2).mean()


class _Counter:
    def __init__(self, settings, num_classes: int, channels: int):
        self.steps, self.channels = 0, channels

    def prepare(self, student, teacher, view):
        return {"toy_calls": torch.tensor(float(self.steps))}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]

    def to(self, device):
        return self


def test_a_new_term_is_one_table_row(monkeypatch):
    # A term defined here, added to the table and to a method row, runs one step through the
    # real config and build path (validation included) without any other file changing.
    from components.config import validate
    from components.distillation import terms as table
    from components.training.core import train_one_epoch
    from components.training.schedule import Schedule, build_optimizer

    toy = Term(_toy_term, feature="embed", state=_Counter, state_key="toy")
    monkeypatch.setitem(table.TERMS, "toy", toy)
    monkeypatch.setitem(table.METHODS, "kd", {"pixel_kd": 1.0, "toy": 2.0})
    cfg = _cfg("kd", "method.weights.toy=3")
    validate(cfg)  # the supervised regime's weight keys follow the table
    student, teacher = _models()
    method = build_method(cfg, student, teacher, num_classes=K)
    assert "embed" in method.trainable.adapters  # the term asked for an adapted feature
    optimizer = build_optimizer(method.trainable, cfg.optim)
    schedule = Schedule.of(optimizer, 10, cfg.optim)
    batch = _batch()
    torch.manual_seed(3)
    with torch.no_grad():
        s_embed = method.trainable(batch["image"])["adapted"]["embed"]
        t_embed = teacher(batch["image"])["features"]["embed"]
    expected = 3.0 * _toy_term(s_embed, t_embed, None, _Counter(None, K, 0))
    progress = {"iteration": 0}
    torch.manual_seed(3)  # the same dropout as above
    stats = train_one_epoch(method, iter([batch]), optimizer, schedule, progress, steps=1)
    assert stats.steps == 1 and progress["iteration"] == 1
    assert stats.sums["toy"] == pytest.approx(float(expected), rel=1e-5)
    assert stats.sums["toy_calls"] == 0.0  # logged by the state's prepare, before the term
    assert method.extra_state()["toy"] == {"steps": 1}
    with pytest.raises(ConfigError, match="method.weights.tyo.*did you mean 'toy'"):
        validate(_cfg("kd", "method.weights.tyo=3"))
