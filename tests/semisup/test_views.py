"""Weak/strong unlabeled views (NumPy decode) and the labeled/unlabeled split plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from components.config import DataConfig
from components.data.semisup_plan import labeled_selection, plan_semisup, semisup_steps
from components.data.shards import DatasetError, DatasetInfo, ShardWriter, encode_png, mask_labels
from components.data.transforms import (
    decode_unlabeled_batch,
    random_scale_crop_flip,
    strong_photometric,
)


def test_area_map_marks_exactly_the_padding():
    image = np.full((20, 12, 3), 200, np.uint8)
    mask = np.zeros((20, 12), np.uint8)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        img, m, area = random_scale_crop_flip(
            image, mask, 16, (0.5, 1.5), True, rng, with_area=True
        )
        # The image is 200 inside, 0 on padding; the mask is 0 inside, ignore on padding.
        np.testing.assert_array_equal(area, img[..., 0] > 0)
        np.testing.assert_array_equal(area, m != 255)


def test_area_flag_does_not_change_the_augmentation():
    image = np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8)
    mask = np.zeros((30, 30), np.uint8)
    a = random_scale_crop_flip(image, mask, 24, (0.7, 1.3), True, np.random.default_rng(5))
    b = random_scale_crop_flip(
        image, mask, 24, (0.7, 1.3), True, np.random.default_rng(5), with_area=True
    )
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_strong_photometric_ops():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(strong_photometric(image, [], rng), image)
    # Grayscale (p 0.2): when applied, all three channels are the ITU-R 601 luma.
    grays = 0
    for _ in range(100):
        out = strong_photometric(image, ["grayscale"], rng)
        if not np.array_equal(out, image):
            grays += 1
            luma = np.rint(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114]))
            np.testing.assert_allclose(out[..., 0], luma, atol=1)
            assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(
                out[..., 1], out[..., 2]
            )
    assert 8 < grays < 35
    # Blur keeps a flat image flat and smooths a checkerboard (lower variance).
    flat = np.full((16, 16, 3), 77, np.uint8)
    for _ in range(10):
        np.testing.assert_array_equal(strong_photometric(flat, ["blur"], rng), flat)
    checker = ((np.indices((16, 16)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    outs = [strong_photometric(checker, ["blur"], rng) for _ in range(20)]
    assert any(o.std() < 0.8 * checker.std() for o in outs)


def _rows(n: int, with_masks: bool = True, bad_mask_row: int | None = None) -> dict:
    rng = np.random.default_rng(1)
    images, masks = [], []
    for i in range(n):
        images.append(encode_png(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)))
        mask = rng.integers(0, 3, (24, 20), dtype=np.uint8)
        masks.append(encode_png(mask[:10] if i == bad_mask_row else mask))
    batch = {"id": np.array([f"u{i}" for i in range(n)]), "image": np.array(images, dtype=object)}
    if with_masks:
        batch["mask"] = np.array(masks, dtype=object)
    return batch


def test_decode_unlabeled_batch_views_share_the_crop():
    batch = _rows(4)
    out = decode_unlabeled_batch(
        batch, crop_size=16, scale_range=(1.0, 1.0), flip=True, strong=[], num_classes=3
    )
    assert out["image"].shape == out["image_strong"].shape == (4, 3, 16, 16)
    assert out["area"].shape == out["mask"].shape == (4, 16, 16) and out["valid"].all()
    # No strong ops: the strong view is the weak one.
    np.testing.assert_array_equal(out["image"], out["image_strong"])
    # With colour jitter only, geometry is shared: the strong view is a per-pixel recolouring
    # of the weak one (torchvision's jitter is pointwise), so on images of flat 4x4 blocks each
    # weak colour maps to one strong colour; a strong view cropped or flipped apart would not.
    rng = np.random.default_rng(5)
    blocks = [np.kron(rng.integers(0, 256, (6, 5, 3)), np.ones((4, 4, 1))) for _ in range(4)]
    batch = dict(batch, image=np.array([encode_png(b.astype(np.uint8)) for b in blocks],
                                       dtype=object))  # fmt: skip
    out = decode_unlabeled_batch(
        batch,
        crop_size=16,
        scale_range=(1.0, 1.0),
        flip=True,
        strong=["colour_jitter"],
        num_classes=3,
        normalized=False,
    )
    changed = 0
    for k in range(4):
        weak = out["image"][k].reshape(-1, 3)
        strong = out["image_strong"][k].reshape(-1, 3)
        pairs = {tuple(w): set() for w in weak}
        for w, s_ in zip(weak, strong):
            pairs[tuple(w)].add(tuple(s_))
        assert all(len(v) == 1 for v in pairs.values())
        changed += not np.array_equal(weak, strong)
    assert changed >= 2  # p 0.8 per image


def test_unlabeled_rows_without_or_with_bad_masks_are_still_used():
    out = decode_unlabeled_batch(
        _rows(3, with_masks=False),
        crop_size=16,
        scale_range=(1, 1),
        flip=False,
        strong=[],
        num_classes=3,
    )
    assert out["valid"].all() and (out["mask"] == 255).all()
    out = decode_unlabeled_batch(
        _rows(3, bad_mask_row=1),
        crop_size=16,
        scale_range=(1, 1),
        flip=False,
        strong=[],
        num_classes=3,
    )
    assert out["valid"].all()
    assert (out["mask"][1] == 255).all() and (out["mask"][0] != 255).any()
    broken = _rows(2)
    broken["image"][0] = b"not a png"
    out = decode_unlabeled_batch(
        broken, crop_size=16, scale_range=(1, 1), flip=False, strong=[], num_classes=3
    )
    assert out["valid"].tolist() == [False, True] and (out["image"][0] == 0).all()


# ----------------------------------------------------------------------------------------------
# The plan: labeled subset, unlabeled rows, steps


def _dataset(root, train: int, unlabeled: int) -> DatasetInfo:
    info = DatasetInfo("t", 3, ["a", "b", "c"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]], 255, {})
    mask = np.zeros((8, 8), np.uint8)
    for split, n in (("train", train), ("val", 2), ("unlabeled", unlabeled)):
        if n == 0 and split == "unlabeled":
            continue
        with ShardWriter(str(root), split) as w:
            for i in range(n):
                w.add(f"{split}-{i}", encode_png(np.zeros((8, 8, 3), np.uint8)), encode_png(mask),
                      mask_labels(mask), 8, 8)  # fmt: skip
        info.splits[split] = w.close()
    info.save(str(root))
    return info


def test_plan_counts_and_steps(tmp_path):
    info = _dataset(tmp_path, 20, 50)
    data = DataConfig(root=str(tmp_path), batch_size=4)
    plan = plan_semisup(data, info)
    assert (plan.labeled_rows, plan.unlabeled_rows, plan.labeled_ids) == (20, 50, None)
    # 2 workers: labeled 10 rows each -> 2 steps, unlabeled 25 -> 6 steps at batch 4.
    steps, lab_passes, unl_passes = semisup_steps(plan, data, 2)
    assert steps == 6
    assert lab_passes == 3 and unl_passes == 1  # ceil(6*4*2 / 20) = 3 passes of the labeled rows
    assert (lab_passes * 20) // 2 >= steps * 4  # every worker gets its 6 labeled batches
    data2 = dataclasses.replace(data, unlabeled_batch_size=8)
    assert semisup_steps(plan, data2, 1)[0] == 6  # max(20//4 = 5, 50//8 = 6)


def test_labeled_count_moves_the_rest_to_unlabeled(tmp_path):
    info = _dataset(tmp_path, 20, 0)
    data = DataConfig(root=str(tmp_path), labeled_count=5, shuffle_seed=3)
    plan = plan_semisup(data, info)
    assert plan.labeled_rows == 5 and plan.unlabeled_rows == 15 and not plan.has_unlabeled_split
    assert len(plan.labeled_ids) == 5 and plan.labeled_ids <= {f"train-{i}" for i in range(20)}
    assert labeled_selection(data, info)[0] == plan.labeled_ids  # deterministic per seed
    other = labeled_selection(dataclasses.replace(data, shuffle_seed=4), info)[0]
    assert other != plan.labeled_ids


@pytest.mark.parametrize(
    "train,unlabeled,count,message",
    [
        (0, 10, None, r"labeled split 'train' is empty \(0 rows\)"),
        (10, 5, 11, r"data.labeled_count=11 but .* has only 10 rows"),
        (10, 0, None, r"no unlabeled images: .*no non-empty split 'unlabeled'"),
        (10, 0, 10, r"leaves none of the 10 'train' rows over"),
    ],
)
def test_bad_splits_name_the_numbers(tmp_path, train, unlabeled, count, message):
    info = _dataset(tmp_path, train, unlabeled)
    with pytest.raises(DatasetError, match=message):
        plan_semisup(DataConfig(root=str(tmp_path), labeled_count=count), info)


def test_too_few_rows_for_the_batch(tmp_path):
    info = _dataset(tmp_path, 3, 40)
    plan = plan_semisup(DataConfig(root=str(tmp_path)), info)
    with pytest.raises(
        DatasetError, match=r"3 labeled rows are too few for 1 worker\(s\) x batch 4"
    ):
        semisup_steps(plan, DataConfig(root=str(tmp_path), batch_size=4), 1)


def test_colour_jitter_is_torchvisions_on_pil():
    """UniMatch's ColorJitter(0.5, 0.5, 0.5, 0.25) (dataset/semi.py L51-52) runs on a PIL image,
    where torchvision calls ImageEnhance.Brightness / Contrast / Color and its PIL adjust_hue, in
    a random order, each result stored as uint8. Values derived by hand below."""
    from PIL import Image

    from components.data.augment import adjust_hue, colour_jitter

    # Hue: PIL's 8-bit hue of pure red is 0; a third of a turn is int(85.0) = 85 -> green.
    red = Image.fromarray(np.array([[[255, 0, 0]]], np.uint8))
    assert np.asarray(adjust_hue(red, 1 / 3)).tolist() == [[[0, 255, 0]]]
    # Backwards wraps around: 0 - 85 -> 171, one step past pure blue (170): (6, 0, 255) by
    # colorsys.hsv_to_rgb(171 / 255, 1, 1) * 255 rounded.
    assert np.abs(np.asarray(adjust_hue(red, -1 / 3)).astype(int) - [6, 0, 255]).max() <= 1

    # The ops run in the drawn order with the drawn factors: replay the draws by hand.
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (6, 7, 3), dtype=np.uint8))
    for seed in range(6):
        got = np.asarray(colour_jitter(image, np.random.default_rng(seed)))
        rng = np.random.default_rng(seed)
        order = rng.permutation(4)
        factors = rng.uniform([0.5, 0.5, 0.5], [1.5, 1.5, 1.5])
        hue = rng.uniform(-0.25, 0.25)
        assert 0.5 <= factors.min() and factors.max() <= 1.5 and abs(hue) <= 0.25
        from PIL import ImageEnhance

        def apply(op, im, factors=factors, hue=hue):
            if op == 3:
                return adjust_hue(im, hue)
            enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op]
            return enhance(im).enhance(factors[op])

        ref = image
        for op in order:
            ref = apply(op, ref)
        assert np.array_equal(got, np.asarray(ref)), seed

    # Each op's result is stored as uint8: brightness x1.5 then x(1/1.5) of a 200 pixel clips
    # at 255 in between and ends at 170, not back at 200 (clipping once at the end would).
    grey = Image.fromarray(np.full((1, 1, 3), 200, np.uint8))
    once = ImageEnhance.Brightness(ImageEnhance.Brightness(grey).enhance(1.5)).enhance(1 / 1.5)
    assert np.asarray(once)[0, 0].tolist() == [170, 170, 170]
    # Contrast blends towards the mean luma, int(mean + 0.5): pixels 0 and 200 -> 100; x0.5.
    pair = Image.fromarray(np.array([[[0, 0, 0], [200, 200, 200]]], np.uint8))
    out = np.asarray(ImageEnhance.Contrast(pair).enhance(0.5))
    assert out[0, :, 0].tolist() == [50, 150]
