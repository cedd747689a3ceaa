import logging

import numpy as np
import pytest
from scipy.ndimage import maximum_filter, minimum_filter

from components.data import augment, decode, transforms
from components.data.shards import encode_png, mask_labels
from components.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_row,
    decode_eval_batch,
    decode_train_batch,
    decode_unlabeled_batch,
    decode_weak_batch,
    normalize,
    pad_to,
    random_scale_crop_flip,
)

K = 4


def _coded_pair(h: int = 48, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A mask of 8x8 blocks with class (row block + col block) % K, and an image whose red
    channel is 60 * class: the mask can be read back from the image after any transform."""
    rows, cols = np.mgrid[0:h, 0:w]
    mask = ((rows // 8 + cols // 8) % K).astype(np.uint8)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = mask * 60
    image[..., 1] = (cols * 255 // (w - 1)).astype(np.uint8)  # left-to-right ramp shows flips
    return image, mask


def _mask_from_image(image: np.ndarray) -> np.ndarray:
    return np.rint(image[..., 0] / 60).astype(np.uint8)


def test_crop_and_flip_at_scale_one_keep_image_and_mask_aligned():
    image, mask = _coded_pair()
    rng = np.random.default_rng(0)
    flips = 0
    for _ in range(200):
        out_img, out_mask = random_scale_crop_flip(image, mask, 32, (1.0, 1.0), True, rng)
        assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert out_img.dtype == np.uint8 and out_mask.dtype == np.uint8
        assert np.array_equal(_mask_from_image(out_img), out_mask)
        flipped = out_img[0, 0, 1] > out_img[0, -1, 1]
        flips += flipped
        # the crop is a window of the (possibly flipped) original
        source = image[:, ::-1] if flipped else image
        hits = [
            (y, x)
            for y in range(48 - 31)
            for x in range(40 - 31)
            if np.array_equal(source[y : y + 32, x : x + 32], out_img)
        ]
        assert hits
    assert 70 <= flips <= 130


def test_rescaled_image_and_mask_agree_away_from_edges():
    image, mask = _coded_pair()
    rng = np.random.default_rng(1)
    for scale in (0.6, 1.7):
        out_img, out_mask = random_scale_crop_flip(image, mask, 32, (scale, scale), True, rng)
        assert out_img.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        # bilinear blends classes at block edges: compare where the 3x3 neighbourhood is uniform
        interior = (maximum_filter(out_mask, 3) == minimum_filter(out_mask, 3)) & (out_mask != 255)
        agree = _mask_from_image(out_img)[interior] == out_mask[interior]
        assert interior.sum() > 200 and agree.mean() > 0.95


def test_small_images_are_padded_with_zero_and_ignore():
    image, mask = _coded_pair(20, 16)
    image += 1  # so that real pixels are never 0
    out_img, out_mask = random_scale_crop_flip(
        image, mask, 32, (1.0, 1.0), False, np.random.default_rng(0)
    )
    # no room to move the crop: it is the padded image itself
    assert np.array_equal(out_img[:20, :16], image) and np.array_equal(out_mask[:20, :16], mask)
    assert (out_img[20:] == 0).all() and (out_img[:, 16:] == 0).all()
    assert (out_mask[20:] == 255).all() and (out_mask[:, 16:] == 255).all()


def test_pad_to_pads_bottom_right_and_rejects_larger_images():
    image, mask = _coded_pair(8, 8)
    out_img, out_mask = pad_to(image, mask, 10, 12, ignore_index=7)
    assert out_img.shape == (10, 12, 3) and out_mask.shape == (10, 12)
    assert np.array_equal(out_img[:8, :8], image) and out_img[8:].sum() == 0
    assert (out_mask[8:] == 7).all() and (out_mask[:, 8:] == 7).all()
    with pytest.raises(ValueError, match="larger"):
        pad_to(image, mask, 6, 12)


def test_normalize_matches_hand_computation():
    images = np.random.default_rng(2).integers(0, 256, size=(2, 3, 5, 3), dtype=np.uint8)
    out = normalize(images)
    assert out.shape == (2, 3, 3, 5) and out.dtype == np.float32
    b, y, x, c = 1, 2, 4, 2
    mean, std = (123.675, 116.28, 103.53)[c], (58.395, 57.12, 57.375)[c]
    assert out[b, c, y, x] == pytest.approx((images[b, y, x, c] - mean) / std, rel=1e-6)
    assert np.allclose(IMAGENET_MEAN, [123.675, 116.28, 103.53])
    assert np.allclose(IMAGENET_STD, [58.395, 57.12, 57.375])


def _batch(rows: list[tuple[str, bytes, bytes | None]]) -> dict[str, np.ndarray]:
    return {
        name: np.array([r[k] for r in rows], dtype=object)
        for k, name in enumerate(("id", "image", "mask"))
    }


def _bad_and_good_rows() -> dict[str, np.ndarray]:
    image, mask = _coded_pair(36, 36)
    wrong_class = mask.copy()
    wrong_class[3, 3] = 200
    return _batch(
        [
            ("garbage", b"not a png", encode_png(mask)),
            ("small-mask", encode_png(image), encode_png(mask[:20])),
            ("class-200", encode_png(image), encode_png(wrong_class)),
            ("good", encode_png(image), encode_png(mask)),
        ]
    )


def test_check_row_reasons():
    batch = _bad_and_good_rows()
    reasons = [check_row(batch["image"][k], batch["mask"][k], K) for k in range(3)]
    assert "undecodable image" in reasons[0]
    assert "20x36 differs from image size 36x36" in reasons[1]
    assert "[200]" in reasons[2]
    image, mask = check_row(batch["image"][3], batch["mask"][3], K)
    assert image.shape == (36, 36, 3) and mask.shape == (36, 36)
    _, unlabeled = check_row(batch["image"][3], None, K)
    assert (unlabeled == 255).all()


def test_decode_train_batch_keeps_every_row_and_marks_bad_ones(caplog):
    with caplog.at_level(logging.WARNING, logger="segdistill.data"):
        out = decode_train_batch(
            _bad_and_good_rows(),
            crop_size=32,
            scale_range=(1.0, 1.0),
            flip=True,
            seed=0,
            num_classes=K,
        )
    assert out["valid"].tolist() == [False, False, False, True]
    assert out["id"].tolist() == ["garbage", "small-mask", "class-200", "good"]
    assert out["image"].shape == (4, 3, 32, 32) and out["image"].dtype == np.float32
    assert out["mask"].shape == (4, 32, 32) and out["mask"].dtype == np.int64
    assert (out["mask"][:3] == 255).all() and (out["image"][:3] == 0).all()
    assert out["mask"][3].max() < K
    # the good row's image and mask are still aligned after augmentation
    red = out["image"][3, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert np.array_equal(np.rint(red / 60), out["mask"][3])
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and logged[0].startswith("skipping row garbage:")


def test_decode_train_batch_is_reproducible_with_a_seed():
    kwargs = {"crop_size": 24, "scale_range": (0.5, 2.0), "flip": True, "num_classes": K}
    batch = _bad_and_good_rows()
    a = decode_train_batch(batch, seed=5, **kwargs)
    b = decode_train_batch(batch, seed=5, **kwargs)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
    c = decode_train_batch(batch, seed=6, **kwargs)
    assert not np.array_equal(a["image"], c["image"])


def _augmented_rows() -> dict[str, np.ndarray]:
    """Three good labeled rows of different sizes, with their `image_labels` column."""
    pairs = [_coded_pair(36, 36), _coded_pair(48, 40), _coded_pair(40, 30)]
    batch = _batch([(f"row-{k}", encode_png(i), encode_png(m)) for k, (i, m) in enumerate(pairs)])
    batch["image_labels"] = np.array([mask_labels(m) for _, m in pairs], dtype=object)
    return batch


TRAINING_DECODERS = {
    "train": (decode_train_batch, {}),
    "unlabeled": (decode_unlabeled_batch, {"strong": ("colour_jitter", "grayscale", "blur")}),
    "weak": (decode_weak_batch, {}),
}


@pytest.mark.parametrize("name", sorted(TRAINING_DECODERS))
def test_training_decoders_share_the_seeding_rule(name):
    decoder, extra = TRAINING_DECODERS[name]
    kwargs = {"crop_size": 24, "scale_range": (0.5, 2.0), "flip": True, "num_classes": K, **extra}
    batch = _augmented_rows()

    def run(**seed):
        out = decoder({k: v.copy() for k, v in batch.items()}, shuffle=True, **kwargs, **seed)
        assert out["valid"].all()
        return out

    a, b = run(seed=5), run(seed=5)
    assert a.keys() == b.keys()
    for column in a:
        np.testing.assert_array_equal(a[column], b[column], err_msg=column)
    c = run(seed=6)
    assert not np.array_equal(a["image"], c["image"])
    # no seed (the default, or None): fresh entropy on every call
    assert not np.array_equal(run()["image"], run(seed=None)["image"])


def test_transforms_re_exports_augment_and_decode():
    for name in transforms.__all__:
        source = augment if name in augment.__all__ else decode
        assert getattr(transforms, name) is getattr(source, name), name
    assert sorted(transforms.__all__) == sorted(augment.__all__ + decode.__all__)


def test_decode_eval_batch_pads_and_handles_unlabeled_rows():
    image, mask = _coded_pair(36, 30)
    batch = _batch(
        [
            ("labeled", encode_png(image), encode_png(mask)),
            ("unlabeled", encode_png(image), None),
            ("too-big", encode_png(_coded_pair(48, 48)[0]), None),
        ]
    )
    out = decode_eval_batch(batch, pad_height=40, pad_width=40, num_classes=K)
    assert out["valid"].tolist() == [True, True, False]
    assert out["image"].shape == (3, 3, 40, 40) and out["mask"].shape == (3, 40, 40)
    assert np.array_equal(out["mask"][0, :36, :30], mask)
    assert (out["mask"][0, 36:] == 255).all() and (out["mask"][0, :, 30:] == 255).all()
    assert (out["mask"][1] == 255).all()
    assert np.allclose(out["image"][0], out["image"][1])
    # padded image pixels are 0 before normalization
    assert np.allclose(out["image"][0, :, 38, 38], -IMAGENET_MEAN / IMAGENET_STD)


def test_empty_batch_keeps_column_shapes():
    out = decode_eval_batch(_batch([]), pad_height=8, pad_width=8, num_classes=K)
    assert out["image"].shape == (0, 3, 8, 8) and out["mask"].shape == (0, 8, 8)
    assert out["valid"].shape == (0,) and out["id"].shape == (0,)


def test_rectangular_crops_keep_image_and_mask_aligned():
    """data.crop_size [h, w] (CIRKD crops Cityscapes at 512x1024): the crop has that shape and
    image and mask come from the same place (the mask is the image's red channel / 50 here)."""
    import numpy as np

    from components.data.augment import crop_hw, random_scale_crop_flip

    rng = np.random.default_rng(0)
    mask = rng.integers(0, 5, size=(40, 70)).astype(np.uint8)
    image = np.stack([mask * 50, mask * 10, np.zeros_like(mask)], axis=-1).astype(np.uint8)
    for seed in range(10):
        img, msk, area = random_scale_crop_flip(
            image, mask, (16, 32), (1.0, 1.0), True, np.random.default_rng(seed), with_area=True
        )
        assert img.shape == (16, 32, 3) and msk.shape == (16, 32) and area.all()
        assert (img[..., 0] == msk * 50).all()
    # Larger than the image: padded bottom/right, padding ignored and outside `area`.
    img, msk, area = random_scale_crop_flip(
        image, mask, (48, 80), (1.0, 1.0), False, rng, with_area=True
    )
    assert msk.shape == (48, 80) and (msk[40:] == 255).all() and not area[40:].any()
    assert crop_hw(48) == (48, 48) and crop_hw([512, 1024]) == (512, 1024)


def test_crop_first_resampling_equals_resizing_the_whole_image_then_cropping():
    """The crop is resampled alone (augment.resample_window): the reference is what the
    decoder did before, skimage's resize of the whole image (bilinear / nearest, no
    anti-aliasing) then the crop. Equal to within one grey level (float rounding at .5), and
    the masks equal except where the source coordinate (o + 0.5) * in / out - 0.5 is an exact
    tie between two source pixels (nearest neighbour may pick either)."""
    from skimage.transform import resize

    rng = np.random.default_rng(1)
    off_by_one = pixels = 0
    for _ in range(300):
        h, w = rng.integers(3, 90, 2)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 6, (h, w), dtype=np.uint8)
        s = rng.uniform(0.4, 2.2)
        nh, nw = max(1, round(h * s)), max(1, round(w * s))
        oh, ow = rng.integers(1, nh + 1), rng.integers(1, nw + 1)
        y, x = rng.integers(0, nh - oh + 1), rng.integers(0, nw - ow + 1)
        whole = resize(image, (nh, nw), order=1, preserve_range=True, anti_aliasing=False)
        ref = np.clip(np.rint(whole), 0, 255).astype(np.uint8)[y : y + oh, x : x + ow]
        ref_mask = resize(mask, (nh, nw), order=0, preserve_range=True, anti_aliasing=False)
        ref_mask = ref_mask.astype(np.uint8)[y : y + oh, x : x + ow]
        got, got_mask = augment.resample_window(image, mask, (nh, nw), (y, x), (oh, ow))
        assert got.shape == ref.shape and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - ref)
        assert diff.max() <= 1
        off_by_one += int((diff > 0).sum())
        pixels += diff.size
        ry = (np.arange(y, y + oh) + 0.5) * h / nh - 0.5
        rx = (np.arange(x, x + ow) + 0.5) * w / nw - 0.5
        tie = (np.abs(ry % 1 - 0.5) < 1e-9)[:, None] | (np.abs(rx % 1 - 0.5) < 1e-9)[None, :]
        assert not ((got_mask != ref_mask) & ~tie).any()
    assert off_by_one < 0.01 * pixels


def test_a_crop_of_a_large_image_reads_only_its_window():
    """Pixels far outside the crop's source window cannot change it (the decode cost scales
    with the crop): the same crop of an image whose far rows/columns are noise."""
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (400, 600), dtype=np.uint8)
    got = augment.resample_window(image, mask, (560, 840), (100, 200), (64, 64))
    noisy, noisy_mask = image.copy(), mask.copy()
    noisy[:50], noisy[150:], noisy[:, :120], noisy[:, 220:] = 0, 255, 7, 9
    noisy_mask[:50], noisy_mask[150:] = 3, 1
    again = augment.resample_window(noisy, noisy_mask, (560, 840), (100, 200), (64, 64))
    assert np.array_equal(got[0], again[0]) and np.array_equal(got[1], again[1])


@pytest.mark.parametrize("name", ["train", "unlabeled", "weak", "eval"])
def test_uint8_transfer_form_normalises_on_the_device_to_the_same_numbers(name):
    """Rows travel as uint8 (`normalized=False`); data/device.model_batch makes exactly the
    float32 images (invalid rows 0) and int64 masks the `normalized=True` decoders give."""
    import torch

    from components.data.device import model_batch

    image, mask = _coded_pair()
    good = {"image": encode_png(image), "mask": encode_png(mask)}
    batch = {
        "id": np.array(["a", "b", "c"]),
        "image": np.array([good["image"], b"not a png", good["image"]], dtype=object),
        "mask": np.array([good["mask"], good["mask"], good["mask"]], dtype=object),
        "image_labels": np.array([[0, 1], [2], [3]], dtype=object),
    }
    common = {"num_classes": K}
    if name == "eval":
        decoder, kw = decode_eval_batch, {"pad_height": 48, "pad_width": 48}
    else:
        decoder = {"train": decode_train_batch, "unlabeled": decode_unlabeled_batch,
                   "weak": decode_weak_batch}[name]  # fmt: skip
        kw = {"crop_size": 24, "scale_range": (0.7, 1.4), "flip": True, "seed": 5}
        if name == "unlabeled":
            kw["strong"] = ("colour_jitter", "blur")
    ref = decoder(batch, **kw, **common)
    raw = decoder(batch, **kw, **common, normalized=False)
    assert raw["image"].dtype == np.uint8 and raw["image"].shape[-1] == 3
    assert raw["mask"].dtype == np.uint8
    assert raw["image"].nbytes * 4 == ref["image"].nbytes
    got = model_batch({k: torch.as_tensor(v) for k, v in raw.items() if k != "id"})
    for key in ("image", "image_strong", "mask"):
        if key in ref:
            assert got[key].dtype == torch.as_tensor(ref[key]).dtype, key
            assert torch.equal(got[key], torch.as_tensor(ref[key])), key
    assert not bool(got["valid"][1]) and bool((got["image"][1] == 0).all())
    # a second stream's keys under its prefix; float images pass through
    prefixed = model_batch(
        {f"u_{k}": torch.as_tensor(v) for k, v in raw.items() if k != "id"}, "u_"
    )
    assert torch.equal(prefixed["u_image"], got["image"])
    assert model_batch({"image": got["image"]})["image"] is got["image"]
