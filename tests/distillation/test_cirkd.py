import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.distillation.cirkd import (
    MemoryBank,
    memory_contrast_loss,
    minibatch_pixel_relation,
)


def unit_pixels(x: np.ndarray) -> np.ndarray:
    """(B,C,h,w) -> (B, h·w, C), each pixel L2-normalised."""
    b, c = x.shape[:2]
    v = x.reshape(b, c, -1).transpose(0, 2, 1).astype(np.float64)
    return v / np.linalg.norm(v, axis=2, keepdims=True)


def kl_softmax(t_logits: np.ndarray, s_logits: np.ndarray) -> float:
    p_t = np.exp(t_logits) / np.exp(t_logits).sum()
    p_s = np.exp(s_logits) / np.exp(s_logits).sum()
    return float(np.sum(p_t * np.log(p_t / p_s)))


def minibatch_reference(student: np.ndarray, teacher: np.ndarray, tau: float) -> float:
    zs, zt = unit_pixels(student), unit_pixels(teacher)
    b, n = zs.shape[:2]
    total = 0.0
    for i in range(b):
        for j in range(b):
            for a in range(n):
                total += kl_softmax(zt[i, a] @ zt[j].T / tau, zs[i, a] @ zs[j].T / tau)
    return total / (b * b * n)


def memory_reference(student, teacher, entries, tau, anchors) -> float:
    zs, zt = unit_pixels(student).reshape(-1, entries.shape[1]), unit_pixels(teacher)
    zt = zt.reshape(-1, entries.shape[1])
    kls = [kl_softmax(zt[a] @ entries.T / tau, zs[a] @ entries.T / tau) for a in anchors]
    return float(np.mean(kls))


# --- mini-batch relation -----------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_minibatch_matches_numpy_reference(tau):
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 3, 3, 3, generator=g), torch.randn(2, 3, 3, 3, generator=g)
    expected = minibatch_reference(student.numpy(), teacher.numpy(), tau)
    got = minibatch_pixel_relation(student, teacher, tau)
    assert got.item() == pytest.approx(expected, rel=1e-4)


def test_minibatch_channel_counts_may_differ_and_zero_when_equal():
    student, teacher = torch.randn(2, 5, 2, 3), torch.randn(2, 3, 2, 3)
    expected = minibatch_reference(student.numpy(), teacher.numpy(), 0.1)
    assert minibatch_pixel_relation(student, teacher).item() == pytest.approx(expected, rel=1e-4)
    assert minibatch_pixel_relation(teacher.clone(), teacher).item() == pytest.approx(0, abs=1e-5)
    assert minibatch_pixel_relation(4 * teacher, teacher).item() == pytest.approx(0, abs=1e-5)


def test_minibatch_student_resized_not_cropped():
    student, teacher = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 3, 3)
    resized = F.interpolate(student, size=(3, 3), mode="bilinear", align_corners=False)
    got = minibatch_pixel_relation(student, teacher).item()
    assert got == pytest.approx(minibatch_pixel_relation(resized, teacher).item(), rel=1e-6)
    assert abs(got - minibatch_pixel_relation(student[..., :3, :3], teacher).item()) > 1e-4


def test_minibatch_batch_mismatch_and_gradients():
    with pytest.raises(
        ValueError, match=re.escape("(3, 3, 2, 2)") + ".*" + re.escape("(2, 3, 2, 2)")
    ):
        minibatch_pixel_relation(torch.randn(3, 3, 2, 2), torch.randn(2, 3, 2, 2))
    student = torch.randn(2, 3, 3, 3, requires_grad=True)
    teacher = torch.randn(2, 3, 3, 3, requires_grad=True)
    minibatch_pixel_relation(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


# --- memory bank -------------------------------------------------------------------------

LABELS = torch.tensor(
    [
        [[0, 0, 1, 1], [0, 0, 1, 255], [255, 1, 1, 1], [0, 255, 255, 1]],  # 5×class 0, 7×class 1
        [[1, 1, 255, 255], [255, 255, 255, 255], [255, 255, 255, 255], [2, 255, 255, 255]],
    ]
)  # image 1: 2×class 1, 1×class 2; class 3 absent


def upsampled_labels() -> torch.Tensor:
    """(2,8,8) labels whose nearest-downsampling to 4×4 gives back LABELS."""
    return LABELS.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)


def test_enqueue_fills_the_right_rows_with_unit_vectors():
    torch.manual_seed(0)
    embed = torch.randn(2, 4, 4, 4)
    bank = MemoryBank(
        num_classes=4, dim=4, pixel_size=8, region_size=4, pixels_per_class_per_image=3
    )
    bank.enqueue(embed, upsampled_labels())
    z = unit_pixels(embed.numpy())  # (2,16,4)
    lab = LABELS.flatten(1).numpy()
    assert bank.pixel_count.tolist() == [3, 5, 1, 0]  # 3 | 3 + 2 | 1 | none
    assert bank.region_count.tolist() == [1, 2, 1, 0]
    assert bank.pixel_ptr.tolist() == [3, 5, 1, 0]
    queue = bank.pixel_queue.numpy()
    np.testing.assert_allclose(np.linalg.norm(queue[:3, :1], axis=-1), 1.0, rtol=1e-5)
    for k, sources in [(0, [0, 0, 0]), (1, [0, 0, 0, 1, 1]), (2, [1])]:
        for slot, image in enumerate(sources):  # image-major order, members of class k only
            dist = np.linalg.norm(z[image][lab[image] == k] - queue[k, slot], axis=1)
            assert dist.min() < 1e-5
    chosen = [tuple(np.round(v, 5)) for v in queue[0, :3]]
    assert len(set(chosen)) == 3  # drawn without replacement
    assert np.all(queue[3] == 0) and np.all(queue[0, 3:] == 0)
    for k, slot, image in [(0, 0, 0), (1, 0, 0), (1, 1, 1), (2, 0, 1)]:
        mean = z[image][lab[image] == k].mean(axis=0)
        np.testing.assert_allclose(
            bank.region_queue[k, slot].numpy(), mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6
        )


def test_ignore_pixels_never_enqueued():
    embed = torch.zeros(2, 4, 4, 4)
    embed[:, 0] = 1.0  # every labelled pixel points along e0 ...
    ignore = (LABELS == 255).unsqueeze(1).expand(-1, 4, -1, -1)
    embed[ignore] = 0.0
    embed[:, 3][LABELS == 255] = 1.0  # ... every ignore pixel along e3
    bank = MemoryBank(num_classes=4, dim=4, pixel_size=64, pixels_per_class_per_image=16)
    bank.enqueue(embed, upsampled_labels())
    assert torch.all(bank.filled("pixel")[:, 3] == 0) and torch.all(
        bank.filled("region")[:, 3] == 0
    )
    assert bank.pixel_count.sum().item() == int((LABELS != 255).sum())


def test_pointer_wraps_around():
    labels = torch.full((1, 2, 2), 255)
    labels[0, 0] = 0  # exactly two class-0 pixels per image
    a, b = torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    a[:, 0], b[:, 1] = 2.0, 5.0
    bank = MemoryBank(
        num_classes=1, dim=3, pixel_size=3, region_size=1, pixels_per_class_per_image=2
    )
    bank.enqueue(a, labels)
    bank.enqueue(b, labels)
    e0, e1 = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])
    assert torch.equal(bank.pixel_queue[0], torch.stack([e1, e0, e1]))  # slots 2, 0 rewritten
    assert bank.pixel_ptr.tolist() == [1] and bank.pixel_count.tolist() == [3]
    assert torch.equal(bank.region_queue[0, 0], e1)
    assert bank.region_ptr.tolist() == [0] and bank.region_count.tolist() == [1]


def test_enqueue_rejects_bad_shapes_and_labels():
    bank = MemoryBank(num_classes=2, dim=4)
    with pytest.raises(ValueError, match=re.escape("(1, 3, 2, 2)")):
        bank.enqueue(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        bank.enqueue(torch.randn(1, 4, 2, 2), torch.full((1, 2, 2), 5))


def filled_bank() -> tuple[MemoryBank, np.ndarray, np.ndarray]:
    """A hand-filled bank whose unfilled slots hold garbage that must never be read."""
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(num_classes=2, dim=4, pixel_size=3, region_size=2)
    bank.pixel_queue.copy_(F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1))
    bank.region_queue.copy_(F.normalize(torch.randn(2, 2, 4, generator=g), dim=-1))
    bank.pixel_queue[0, 2] = 100.0
    bank.pixel_queue[1, 1:] = -50.0
    bank.region_queue[0, 1] = 9.0
    bank.region_queue[1] = 9.0
    bank.pixel_count.copy_(torch.tensor([2, 1]))
    bank.region_count.copy_(torch.tensor([1, 0]))
    q = bank.pixel_queue.numpy().astype(np.float64)
    pixel_entries = np.concatenate([q[0, :2], q[1, :1]])
    region_entries = bank.region_queue[0, :1].numpy().astype(np.float64)
    return bank, pixel_entries, region_entries


def test_memory_loss_matches_numpy_reference_on_hand_filled_bank():
    bank, pixel_entries, region_entries = filled_bank()
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    s, t = student.numpy(), teacher.numpy()
    pixel, region = memory_contrast_loss(student, teacher, bank, tau=0.1, num_anchors=None)
    assert pixel.item() == pytest.approx(
        memory_reference(s, t, pixel_entries, 0.1, range(8)), rel=1e-4
    )
    assert region.item() == pytest.approx(
        memory_reference(s, t, region_entries, 0.1, range(8)), abs=1e-6
    )
    # with labels: anchors are the non-ignore pixels only (labels nearest-downsampled 4×4 -> 2×2)
    labels = torch.tensor([[0, 255], [1, 1]]).repeat_interleave(2, 0).repeat_interleave(2, 1)
    labels = torch.stack([labels, torch.full((4, 4), 255)])
    pixel, _ = memory_contrast_loss(student, teacher, bank, 0.5, num_anchors=8, labels=labels)
    assert pixel.item() == pytest.approx(
        memory_reference(s, t, pixel_entries, 0.5, [0, 2, 3]), rel=1e-4
    )


def test_memory_loss_anchor_subsampling_uses_real_anchors():
    bank, pixel_entries, _ = filled_bank()
    student, teacher = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    per_anchor = [
        memory_reference(student.numpy(), teacher.numpy(), pixel_entries, 0.1, [a])
        for a in range(8)
    ]
    pixel, _ = memory_contrast_loss(student, teacher, bank, num_anchors=1)
    assert min(abs(pixel.item() - v) for v in per_anchor) < 1e-5 * max(per_anchor)


def test_memory_loss_zero_when_equal_and_with_empty_bank():
    bank, _, _ = filled_bank()
    x = torch.randn(2, 4, 2, 2)
    pixel, region = memory_contrast_loss(x.clone(), x, bank)
    assert pixel.item() == pytest.approx(0, abs=1e-6) and region.item() == pytest.approx(
        0, abs=1e-6
    )
    student = torch.randn(2, 4, 2, 2, requires_grad=True)
    pixel, region = memory_contrast_loss(student, x, MemoryBank(num_classes=2, dim=4))
    assert pixel.item() == 0 and region.item() == 0
    assert pixel.requires_grad and region.requires_grad
    (pixel + region).backward()
    assert student.grad is not None and torch.all(student.grad == 0)


def test_memory_loss_resizes_student_checks_shapes_and_gradients():
    bank, _, _ = filled_bank()
    student = torch.randn(2, 4, 4, 4, requires_grad=True)
    teacher = torch.randn(2, 4, 2, 2, requires_grad=True)
    resized = F.interpolate(student.detach(), size=(2, 2), mode="bilinear", align_corners=False)
    pixel, region = memory_contrast_loss(student, teacher, bank, num_anchors=None)
    ref = memory_contrast_loss(resized, teacher.detach(), bank, num_anchors=None)
    assert pixel.item() == pytest.approx(ref[0].item(), rel=1e-6)
    assert region.item() == pytest.approx(ref[1].item(), rel=1e-6)
    (pixel + region).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    with pytest.raises(
        ValueError, match=re.escape("(2, 5, 2, 2)") + ".*" + re.escape("(2, 4, 2, 2)")
    ):
        memory_contrast_loss(torch.randn(2, 5, 2, 2), teacher.detach(), bank)
    with pytest.raises(ValueError, match="bank dim 4"):
        memory_contrast_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), bank)


def test_state_dict_round_trip_restores_bank_and_loss():
    torch.manual_seed(5)
    bank = MemoryBank(
        num_classes=4, dim=4, pixel_size=5, region_size=3, pixels_per_class_per_image=2
    )
    for _ in range(3):
        bank.enqueue(torch.randn(2, 4, 4, 4), upsampled_labels())
    state = bank.state_dict()
    assert set(state) == {
        f"{n}_{s}" for n in ("pixel", "region") for s in ("queue", "ptr", "count")
    }
    fresh = MemoryBank(
        num_classes=4, dim=4, pixel_size=5, region_size=3, pixels_per_class_per_image=2
    )
    fresh.load_state_dict(state)
    for name, buf in bank.state_dict().items():
        assert torch.equal(buf, fresh.state_dict()[name]), name
    student, teacher = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    a = memory_contrast_loss(student, teacher, bank, num_anchors=None)
    b = memory_contrast_loss(student, teacher, fresh, num_anchors=None)
    assert a[0].item() == b[0].item() and a[1].item() == b[1].item() and a[0].item() > 0


def test_enqueue_is_deterministic_given_the_seed():
    embed = torch.randn(2, 4, 4, 4)
    banks = []
    for _ in range(2):
        torch.manual_seed(7)
        bank = MemoryBank(num_classes=4, dim=4, pixels_per_class_per_image=2)
        bank.enqueue(embed, upsampled_labels())
        banks.append(bank)
    assert torch.equal(banks[0].pixel_queue, banks[1].pixel_queue)
