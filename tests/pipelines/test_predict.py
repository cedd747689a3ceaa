"""pipelines/predict.py and components/predict.py: the pure parts in this process, the Ray Data
runs (marked slow) on the shared session instance."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import ModelConfig
from components.data.augment import normalize
from components.data.shards import DatasetInfo, ShardWriter, decode_image, decode_mask, encode_png
from components.data.sources.cityscapes import TRAIN_CLASSES
from components.inference import EvalMode, infer_logits
from components.models.build import build_model
from components.predict import (
    CITYSCAPES,
    Item,
    Plan,
    PredictError,
    Predictor,
    assign_stems,
    cityscapes_name,
    decode_batch,
    default_palette,
    label_png,
    label_to_train_ids,
    list_images,
    overlay,
    plan_pool,
    safe_stem,
    train_to_label_ids,
    write_batch,
)
from components.training.checkpoint import save_checkpoint
from pipelines import predict


def _checkpoint(folder: Path, num_classes: int = 4, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    cfg = ModelConfig(width=0.125)
    model = build_model(cfg, num_classes).eval()
    meta = {
        "num_classes": num_classes,
        "model": dataclasses.asdict(cfg),
        "class_names": [f"c{k}" for k in range(num_classes)],
        "ignore_index": 255,
        "progress": {"iteration": 1},
    }
    save_checkpoint(folder / "epoch_0001", model.state_dict(), None, meta)
    return folder, model


def _photos(root: Path) -> dict[str, Path]:
    """scikit-image's sample photos in nested folders, as JPEG and PNG (one upper-case name)."""
    from skimage import data

    files = {
        "astronaut": (root / "astronaut.jpg", data.astronaut()),
        "a/coffee": (root / "a" / "coffee.png", data.coffee()),
        "a/b/chelsea": (root / "a" / "b" / "chelsea.JPG", data.chelsea()),
    }
    for path, pixels in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(
            path, format="JPEG" if path.suffix.lower() == ".jpg" else "PNG"
        )
    return {stem: path for stem, (path, _) in files.items()}


def _reference(model, image: np.ndarray | Path, mode: EvalMode) -> tuple[np.ndarray, np.ndarray]:
    """A plain in-process prediction: (argmax, top-1 minus top-2 logit margin); pixels whose
    margin is below float noise may differ between processes (thread counts)."""
    if isinstance(image, Path):
        image = decode_image(image.read_bytes())
    logits = infer_logits(model, torch.from_numpy(normalize(image[None])), mode)[0]
    top2 = logits.topk(2, dim=0).values
    return logits.argmax(0).numpy(), (top2[0] - top2[1]).numpy()


# ----------------------------------------------------------------------------------------------
# Pure parts


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("a/b/x", "a/b/x"),
        ("../../escape", "__/__/escape"),
        ("/etc/passwd", "etc/passwd"),
        ("a/../../b", "a/__/__/b"),
        ("..\\..\\win", "__/__/win"),
        ("./a//b/.", "a/b"),
        ("..", "__"),
        ("", "_"),
        ("/", "_"),
        ("a\x00b", "a_b"),
    ],
)
def test_safe_stem_never_steps_out(name, stem):
    assert safe_stem(name) == stem


def test_stems_are_unique_and_keep_folders():
    rels = ["x.jpg", "x.png", "a/y.jpeg", "a/y", "b/z.webp", "../x.jpg", "__/x.jpg"]
    stems = assign_stems(rels, strip_extension=True)
    assert stems[:5] == ["x.jpg", "x.png", "a/y.jpeg", "a/y", "b/z"]
    assert stems[5:] == ["__/x.jpg", "__/x.jpg~2"]  # equal once cleaned: numbered in input order
    assert len(set(stems)) == len(stems)
    # Row ids keep their dots: no extension is taken off.
    assert assign_stems(["2008_000123.v2", "a/b"], strip_extension=False) == [
        "2008_000123.v2",
        "a/b",
    ]


def test_output_paths_stay_below_the_output_folder(tmp_path):
    plan = Plan(str(tmp_path / "out"), default_palette(4), formats=(CITYSCAPES,))
    ids = [
        "../../escape",
        "/abs/berlin_000000_000019",
        "a/../../../b",
        "..",
        "berlin/x_leftImg8bit",
    ]
    root = str(tmp_path / "out") + "/"
    for stem in assign_stems(ids, strip_extension=False):
        paths = plan.paths(stem)
        assert set(paths) == {"labels", "overlays", "cityscapes"}
        assert all(p.startswith(root) and ".." not in p.split("/") for p in paths.values())
    assert plan.paths("berlin/x_leftImg8bit")["cityscapes"].endswith("berlin/x_leftImg8bit.png")
    with pytest.raises(PredictError, match="outside"):
        plan.paths("../../etc/x")  # a stem that did not come from assign_stems


def test_cityscapes_train_ids_to_label_ids_and_back():
    # The official table (cityscapesScripts helpers/labels.py): trainId k -> labelId.
    official = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
    train = np.arange(19, dtype=np.uint8)
    assert train_to_label_ids(train).tolist() == official
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 19, size=(37, 53)).astype(np.uint8)
    labels = train_to_label_ids(pred)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= set(official)
    np.testing.assert_array_equal(label_to_train_ids(labels), pred)
    # labelIds of the classes not trained on come back as ignore.
    assert label_to_train_ids(np.array([0, 9, 14, 29, 30])).tolist() == [255] * 5
    assert len(TRAIN_CLASSES) == 19
    assert (
        cityscapes_name("berlin/berlin_000000_000019") == "berlin/berlin_000000_000019_leftImg8bit"
    )
    assert cityscapes_name("x_leftImg8bit") == "x_leftImg8bit"


def test_label_png_holds_class_ids_and_the_palette():
    labels = np.arange(12, dtype=np.uint8).reshape(3, 4) % 5
    palette = default_palette(5)
    data = label_png(labels, palette)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and img.size == (4, 3)
    assert np.asarray(img.getpalette()[:15]).reshape(5, 3).tolist() == palette
    np.testing.assert_array_equal(decode_mask(data), labels)
    assert default_palette(5) == palette and palette[0] == [0, 0, 0]  # deterministic


def test_overlay_is_half_image_half_colour():
    image = np.full((2, 3, 3), 200, np.uint8)
    labels = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    palette = [[0, 0, 0], [255, 0, 0], [0, 100, 0]]
    out = overlay(image, labels, palette)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [100, 100, 100]
    assert out[0, 1].tolist() == [228, 100, 100]  # (200 + 255) / 2 rounds half to even: 228
    assert out[0, 2].tolist() == [100, 150, 100]


def test_list_images_recursive_any_case_and_not_the_output(tmp_path):
    for rel in ["a.jpg", "b/c.PNG", "b/d/e.JpEg", "f.webp", "notes.txt", "out/labels/a.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    inputs = list_images(str(tmp_path), exclude=str(tmp_path / "out"))
    assert [it.stem for it in inputs.items] == ["a", "b/c", "b/d/e", "f"]
    assert all(Path(it.key).is_file() for it in inputs.items)
    single = list_images(str(tmp_path / "b" / "c.PNG"))
    assert [it.stem for it in single.items] == ["c"]
    with pytest.raises(PredictError, match="no such file or folder"):
        list_images(str(tmp_path / "b" / "d" / "nothing"))
    with pytest.raises(PredictError, match="not an image"):
        list_images(str(tmp_path / "notes.txt"))


def test_actor_pool_sizes():
    assert plan_pool({"CPU": 2}, None, None) == plan_pool({"CPU": 2.0}, 1, 1)
    assert plan_pool({"CPU": 16}, None, None).actors == 15
    assert plan_pool({"CPU": 16}, None, 4).actors == 3
    assert plan_pool({"CPU": 16}, None, None, images=20).actors == 3  # 3 blocks of 8 images
    assert plan_pool({"CPU": 16}, 6, None, images=20).actors == 6  # as asked
    gpu = plan_pool({"CPU": 32, "GPU": 4}, None, None)
    assert gpu.actors == 4 and gpu.gpu and "GPU" in gpu.describe()
    with pytest.raises(PredictError, match="need 3 CPUs; the cluster has 2"):
        plan_pool({"CPU": 2}, 2, 1)
    with pytest.raises(PredictError, match="the cluster has 4"):
        plan_pool({"CPU": 32, "GPU": 4}, 5, None)


def test_stages_in_process_match_a_plain_prediction(tmp_path):
    """decode -> Predictor -> write, run here on a photo and a corrupt file: the bad row is named
    and passed through, the label map is the plain in-process argmax."""
    folder, model = _checkpoint(tmp_path / "ckpt")
    photos = _photos(tmp_path / "in")
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    items = [Item(str(photos["a/coffee"]), "coffee", "a/coffee"), Item(str(bad), "bad", "broken")]
    batch = {"path": np.array([it.key for it in items], dtype=object)}
    batch["bytes"] = np.array([Path(it.key).read_bytes() for it in items], dtype=object)
    keys = {it.key: (it.stem, it.source) for it in items}
    decoded = decode_batch(batch, keys, "path")
    assert decoded["error"][0] == "" and "cannot decode" in decoded["error"][1]
    predicted = Predictor(str(folder / "epoch_0001"), EvalMode(), threads=2)(decoded)
    plan = Plan(str(tmp_path / "out"), default_palette(4))
    rows = write_batch(predicted, plan)
    assert rows["error"][0] == "" and rows["error"][1].startswith("cannot decode")
    assert [int(rows["height"][0]), int(rows["width"][0])] == [400, 600]
    labels = decode_mask((tmp_path / "out" / "labels" / "a" / "coffee.png").read_bytes())
    expected, margin = _reference(model, photos["a/coffee"], EvalMode())
    assert np.all((labels == expected) | (margin < 1e-4))
    assert not (tmp_path / "out" / "labels" / "broken.png").exists()


@pytest.fixture
def no_ray(monkeypatch):
    """Checks that must fail before any work: Ray must not even start."""
    import pipelines._common as common

    def refuse(*a, **k):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(common, "init_ray", refuse)


def test_bad_arguments_fail_before_any_work(no_ray, tmp_path, capsys):
    folder, _ = _checkpoint(tmp_path / "ckpt")
    photos = tmp_path / "in"
    _photos(photos)
    base = ["--checkpoint", str(folder)]

    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    assert predict.main([*base, str(photos), "--out", str(blocker / "out")]) == 2
    assert f"--out '{blocker / 'out'}': not writable" in capsys.readouterr().err

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    assert predict.main([*base, str(empty), "--out", str(tmp_path / "o1")]) == 2
    assert f"{empty}: no images found" in capsys.readouterr().err

    assert (
        predict.main([*base, str(photos), "--out", str(tmp_path / "o2"), "--format", "cityscapes"])
        == 2
    )
    assert "needs a 19-class model" in capsys.readouterr().err

    data = tmp_path / "data"
    _shards(data, 5, {"x": np.zeros((8, 8, 3), np.uint8)})
    assert predict.main([*base, "--data", str(data), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "model predicts 4 classes" in err and "dataset.json has 5" in err

    assert predict.main([*base, str(tmp_path / "ckpt"), "--out", str(tmp_path / "o4")]) == 2
    assert "no images found" in capsys.readouterr().err  # a folder of checkpoint files

    assert predict.main([*base, str(photos), "--out", str(tmp_path / "o5"), "--mode", "slide"]) == 2
    assert "needs a crop and a stride" in capsys.readouterr().err
    assert not any((tmp_path / o / "labels").exists() for o in ("o1", "o2", "o3", "o4", "o5"))


def _shards(root: Path, num_classes: int, images: dict[str, np.ndarray]) -> DatasetInfo:
    with ShardWriter(str(root), "val") as w:
        for row_id, pixels in images.items():
            h, w_ = pixels.shape[:2]
            w.add(row_id, encode_png(pixels), None, [], h, w_)
    palette = [[(37 * k) % 256, (91 * k) % 256, (53 * k) % 256] for k in range(num_classes)]
    names = [f"class{k}" for k in range(num_classes)]
    info = DatasetInfo("tiny", num_classes, names, palette, splits={"val": w.info})
    info.save(str(root))
    return info


# ----------------------------------------------------------------------------------------------
# Ray Data runs


@pytest.mark.slow
def test_predicts_a_folder_of_photos_then_resumes(ray_session, tmp_path, capsys):
    folder, model = _checkpoint(tmp_path / "ckpt")
    photos = _photos(tmp_path / "in")
    broken = tmp_path / "in" / "a" / "b" / "broken.png"
    broken.write_bytes(photos["a/coffee"].read_bytes()[:300])  # a truncated PNG
    out = tmp_path / "out"
    args = ["--checkpoint", str(folder), str(tmp_path / "in"), "--out", str(out)]

    # 1 bad image in 4 is more than the default 1%: exit 1, after writing the good ones.
    assert predict.main(args) == 1
    captured = capsys.readouterr()
    assert "4 images, 4 to predict, 0 done" in captured.out
    assert "written 3, skipped 0, bad 1" in captured.out
    assert (
        f"bad image: {broken}: " in captured.err and "more than --max-bad-fraction" in captured.err
    )
    assert str(broken) in (out / "bad_images.txt").read_text()
    for stem, path in photos.items():
        labels = decode_mask((out / "labels" / f"{stem}.png").read_bytes())
        image = decode_image(path.read_bytes())
        assert labels.shape == image.shape[:2] and labels.max() < 4
        over = np.asarray(Image.open(out / "overlays" / f"{stem}.png"))
        assert over.shape == image.shape and over.dtype == np.uint8
        # The actors compute what a plain in-process prediction does (ties aside).
        expected, margin = _reference(model, path, EvalMode())
        assert np.all((labels == expected) | (margin < 1e-4)), stem
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(f"{k}/{s}.png" for k in ("labels", "overlays") for s in photos)

    # Same command, tolerant: every photo is skipped, the broken file is tried (and bad) again.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert predict.main([*args, "--max-bad-fraction", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "4 images, 1 to predict, 3 done" in captured.out
    assert "written 0, skipped 3, bad 1" in captured.out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before


@pytest.mark.slow
def test_shard_split_ids_stay_inside_and_cityscapes_files(
    ray_session, tmp_path, capsys, monkeypatch
):
    import components.predict as cp

    folder, model = _checkpoint(tmp_path / "ckpt", num_classes=19, seed=1)
    rng = np.random.default_rng(0)
    ids = ["../../escape", "/abs/frankfurt_000000_000294", "berlin/berlin_000000_000019"]
    images = {
        i: rng.integers(0, 256, size=(40 + 8 * k, 56, 3), dtype=np.uint8) for k, i in enumerate(ids)
    }
    data = tmp_path / "work" / "data"
    info = _shards(data, 19, images)
    out = tmp_path / "work" / "out"

    plans = []
    build = cp.build_dataset
    monkeypatch.setattr(cp, "build_dataset", lambda *a: plans.append(build(*a)) or plans[-1])
    mode = ["--mode", "slide", "--crop", "32", "--stride", "24", "--flip"]
    args = ["--checkpoint", str(folder), "--data", str(data), "--out", str(out), *mode]
    assert predict.main([*args, "--format", "cityscapes"]) == 0
    text = capsys.readouterr().out
    assert "3 images, 3 to predict, 0 done" in text and "written 3, skipped 0, bad 0" in text
    assert "mode: slide (crop 32x32, stride 24x24), flip" in text

    # Nothing outside the output folder; ids cleaned, not dropped.
    mine = (out, data, folder)
    outside = [p for p in tmp_path.rglob("*") if not any(m in p.parents for m in mine)]
    assert all(p.is_dir() for p in outside), outside
    stems = ["__/__/escape", "abs/frankfurt_000000_000294", "berlin/berlin_000000_000019"]
    official = {c[1] for c in TRAIN_CLASSES}
    slide = EvalMode("slide", crop=32, stride=24, flip=True)
    for row_id, stem in zip(ids, stems):
        label = Image.open(out / "labels" / f"{stem}.png")
        assert label.size == (56, images[row_id].shape[0])
        assert np.asarray(label.getpalette()[: 19 * 3]).reshape(19, 3).tolist() == info.palette
        ids_png = np.asarray(Image.open(out / "cityscapes" / f"{stem}_leftImg8bit.png"))
        assert set(np.unique(ids_png)) <= official
        np.testing.assert_array_equal(label_to_train_ids(ids_png), np.asarray(label))
        expected, margin = _reference(model, images[row_id], slide)
        assert np.all((np.asarray(label) == expected) | (margin < 1e-4))

    # Decoding runs in tasks, not fused into the model's actors.
    stats = plans[0].stats()
    assert "MapBatches(decode_batch)" in stats and "MapBatches(Predictor)" in stats
    assert "MapBatches(decode_batch)->MapBatches(Predictor)" not in stats

    # One output lost: only that row is predicted again (the other rows are dropped in decode).
    (out / "overlays" / f"{stems[2]}.png").unlink()
    assert predict.main([*args, "--format", "cityscapes"]) == 0
    assert "written 1, skipped 2, bad 0" in capsys.readouterr().out
    assert (out / "overlays" / f"{stems[2]}.png").is_file()
