"""End-to-end runs of pipelines/distill.py and evaluate.py on the shared local Ray instance."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from components.training.checkpoint import (
    latest_resumable,
    load_full_state,
    load_model_state,
    read_meta,
    resolve_checkpoint,
)
from pipelines import distill, evaluate

pytestmark = pytest.mark.slow


def _run_dir(storage: Path, prefix: str) -> Path:
    (run,) = [p for p in storage.iterdir() if p.name.startswith(prefix)]
    return run


def test_two_workers_sstkd_then_evaluate_agrees(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    storage = tmp_path / "out"
    args = tiny_overrides(tiny_data, str(storage), **{"trainer.num_workers": "2"})
    assert distill.main(args) == 0
    out = capsys.readouterr().out
    assert "teacher (resnet18" in out and "student (resnet18" in out and "data wait share" in out

    teacher_run = _run_dir(storage, "teacher-none-resnet18")
    student_run = _run_dir(storage, "distill-sstkd-resnet18")
    meta = read_meta(resolve_checkpoint(student_run))
    m = meta["metrics"]
    assert m["world_size"] == 2
    assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["teacher_miou"] <= 1.0
    # The student run took the teacher's mIoU from the teacher run's last evaluation (same data,
    # same `eval`) instead of evaluating the teacher again.
    teacher_meta = read_meta(resolve_checkpoint(teacher_run))
    assert m["teacher_miou"] == teacher_meta["metrics"]["miou"]
    assert "(its own run's last evaluation)" in (student_run / "console.log").read_text()
    for term in ("loss", "ce", "aux", "pixel_kd", "adversarial", "structural", "statistical"):
        assert term in m, term
    assert "critic" in m
    # 48 rows, 2 workers, batch 4 -> 6 steps each.
    assert meta["progress"]["iteration"] == 6

    # The driver-side evaluator must agree with the workers' all-reduced confusion matrices.
    assert evaluate.main(["--checkpoint", str(student_run), "--data", tiny_data]) == 0
    text = capsys.readouterr().out
    shown = float(re.search(r"mIoU\s+([0-9.]+)", text).group(1))
    assert shown == pytest.approx(100 * m["miou"], abs=0.01)
    for name in json.loads((Path(tiny_data) / "dataset.json").read_text())["class_names"]:
        assert name in text

    # Second run of the same command: the teacher is reused, the finished student not retrained.
    assert distill.main(args) == 0
    out = capsys.readouterr().out
    assert f"teacher: reusing {teacher_run}" in out
    assert "had already finished" in out and f"mIoU {100 * m['miou']:.2f}" in out
    assert len(list(teacher_run.glob("epoch_*"))) == 1

    # A student-side change (the README's "structural only") is a new student run on the same
    # cached teacher: the teacher's run name hashes only what makes the teacher.
    one_worker = [a for a in args if not a.startswith("trainer.num_workers")]
    assert distill.main([*one_worker, "method.weights.statistical=0"]) == 0
    out = capsys.readouterr().out
    assert f"teacher: reusing {teacher_run}" in out
    assert [p.name for p in storage.iterdir() if p.name.startswith("teacher-")] == [
        teacher_run.name
    ]
    assert len([p for p in storage.iterdir() if p.name.startswith("distill-sstkd")]) == 2


def test_resume_continues_with_full_state(ray_session, tiny_data, tiny_overrides, tmp_path, capsys):
    from components.config import ModelConfig
    from components.models.build import build_model

    # CIRKD plus the adversarial term: the memory bank and the critic are method state that must
    # come back too. A bare (untrained) teacher state_dict skips training a teacher.
    teacher = tmp_path / "teacher.pth"
    torch.save(build_model(ModelConfig(width=0.125), num_classes=4).state_dict(), teacher)
    storage = tmp_path / "out"
    base = tiny_overrides(
        tiny_data,
        str(storage),
        **{
            "method.name": "cirkd",
            "method.weights.adversarial": "0.01",
            "teacher.checkpoint": str(teacher),
            "teacher.model.width": "0.125",
        },
    )
    assert distill.main(base) == 0
    run = _run_dir(storage, "distill-cirkd")
    first, _ = load_full_state(resolve_checkpoint(run))
    assert first["progress"]["iteration"] == 12 and first["progress"]["epoch"] == 1
    capsys.readouterr()

    # Same experiment with a longer horizon: the same run continues from its checkpoint.
    assert distill.main(base + ["trainer.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "resumed from checkpoint: epoch 1, iteration 12" in out
    assert _run_dir(storage, "distill-cirkd") == run
    second, _ = load_full_state(resolve_checkpoint(run))
    assert second["progress"]["iteration"] == 24 and second["progress"]["epoch"] == 2
    # The rate follows the iteration over the new horizon: the next step is 24 of 24 (rate 0);
    # a schedule restarted at the resume would stand mid-way (12 of 24).
    assert second["optimizer"]["param_groups"][0]["lr"] == 0.0
    # Momentum buffers moved on from the restored ones rather than starting again from zero.
    buf1 = first["optimizer"]["state"][0]["momentum_buffer"]
    buf2 = second["optimizer"]["state"][0]["momentum_buffer"]
    assert buf1.shape == buf2.shape and not torch.equal(buf1, buf2)
    # The critic's Adam kept counting, and the memory bank kept filling from where it was.
    steps = [s["method"]["holistic"]["optimizer"]["state"][0]["step"] for s in (first, second)]
    assert [float(x) for x in steps] == [12.0, 24.0]
    counts = [int(s["method"]["memory_bank"]["region_count"].sum()) for s in (first, second)]
    assert 0 < counts[0] < counts[1]

    # The run folder's record continues across the resume: every step once in TensorBoard,
    # one metrics.jsonl row per epoch, the image panels of the val images.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 25))
    assert [e.step for e in events.Scalars("val/miou")] == [12, 24]
    assert {"train/memory_pixel", "train/adversarial", "val/teacher_miou"} <= set(
        events.Tags()["scalars"]
    )
    panels = [t for t in events.Tags()["images"] if t.startswith("val_images/")]
    assert len(panels) == 4  # trainer.panel_images, image | truth | student | teacher
    image = events.Images(panels[0])[-1]
    assert image.width == 4 * 32 + 3 * 2 and image.height == 32
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [12, 24]
    assert "resumed from checkpoint" in (run / "console.log").read_text()


def test_unknown_key_fails_before_work(tmp_path, capsys):
    assert distill.main(["trainer.epochz=3"]) == 2
    assert "trainer.epochz" in capsys.readouterr().err


def test_unwritable_storage_fails_before_ray(tiny_data, tiny_overrides, tmp_path, capsys):
    import ray

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    was_running = ray.is_initialized()
    assert distill.main(tiny_overrides(tiny_data, f"file://{blocker}/runs")) == 2
    err = capsys.readouterr().err
    assert f"trainer.storage_path 'file://{blocker}/runs': not writable" in err
    assert ray.is_initialized() == was_running  # failed before Ray was started or joined


def test_run_bigger_than_the_cluster_fails_with_numbers(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys, monkeypatch
):
    # 3 workers x 1 CPU + 1 CPU for Ray Data on the session's 3-CPU instance (no autoscaler):
    # Ray Train alone would wait for the placement group for ever. The instance is taken as a
    # cluster started with `ray start` (a private one would share its CPUs among the workers).
    from components.training import resources, trainer

    monkeypatch.setattr(resources, "started_here", lambda: False)
    monkeypatch.setattr(trainer, "started_here", lambda: False)
    extra = {"method.name": "none", "trainer.num_workers": "3", "trainer.resource_wait_s": "2"}
    start = time.monotonic()
    assert distill.main(tiny_overrides(tiny_data, str(tmp_path / "out"), **extra)) == 2
    err = capsys.readouterr().err
    assert "the run needs 4 CPU (trainer.num_workers=3 x (1 CPU) + 1 CPU for Ray Data)" in err
    assert "the cluster has 3 CPU (waited 2 s" in err
    assert time.monotonic() - start < 120
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("meta.json"))


def test_missing_shard_folder_named(ray_session, tiny_data, tiny_overrides, tmp_path, capsys):
    storage = tmp_path / "out"
    args = tiny_overrides(tiny_data, str(storage), **{"data.val_split": "test"})
    assert distill.main(args) == 2
    assert "no split 'test'" in capsys.readouterr().err


def test_teacher_with_other_class_count_rejected(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    from components.config import ModelConfig
    from components.models.build import build_model

    path = tmp_path / "teacher.pth"
    torch.save(build_model(ModelConfig(width=0.125), num_classes=7).state_dict(), path)
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **{"teacher.checkpoint": str(path)})
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "7 classes" in err and "has 4" in err


def test_truncated_teacher_checkpoint_named(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    from components.config import ModelConfig
    from components.models.build import build_model

    path = tmp_path / "teacher.pth"
    torch.save(build_model(ModelConfig(width=0.125), num_classes=4).state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **{"teacher.checkpoint": str(path)})
    assert distill.main(args) == 2
    assert str(path) in capsys.readouterr().err


@pytest.mark.parametrize("local_mode", ["false", "true"])
def test_killed_driver_resumes_from_its_last_checkpoint(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys, local_mode
):
    """`kill -9` of `python pipelines/distill.py` mid-run, then the same command again: the run
    continues from its last complete checkpoint, with the optimizer state, to the end. Both
    ways a run trains: in a worker process, and in the driver (local mode), which writes its
    checkpoints itself."""
    import os
    import signal
    import subprocess
    import sys

    import ray

    from components.config import ModelConfig
    from components.models.build import build_model

    teacher = tmp_path / "teacher.pth"
    torch.save(build_model(ModelConfig(width=0.125), num_classes=4).state_dict(), teacher)
    storage = tmp_path / "out"
    epochs = 8
    args = tiny_overrides(
        tiny_data,
        str(storage),
        **{
            "method.name": "kd",
            "teacher.checkpoint": str(teacher),
            "teacher.model.width": "0.125",
            "trainer.epochs": str(epochs),
            "trainer.local_mode": local_mode,
        },
    )
    root = Path(__file__).parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, str(root / "pipelines" / "distill.py"), *args],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 600
            while not list(storage.glob("distill-kd-*/epoch_0001/meta.json")):
                assert driver.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            driver.send_signal(signal.SIGKILL)
            driver.wait()
    time.sleep(5)  # Ray stops the dead driver's workers; none may still be writing a checkpoint
    run = _run_dir(storage, "distill-kd")
    newest = latest_resumable(run)
    assert newest is not None
    expected = read_meta(newest)["progress"]["epoch"]
    assert 1 <= expected < epochs, expected  # killed mid-run, not after it

    assert distill.main(args) == 0
    out = capsys.readouterr().out
    resumed = re.search(r"resumed from checkpoint: epoch (\d+), iteration (\d+)", out)
    assert resumed, out[-3000:]
    epoch, iteration = int(resumed.group(1)), int(resumed.group(2))
    # From the newest complete checkpoint, whether Ray had recorded it or not.
    assert (epoch, iteration) == (expected, 12 * expected)
    final, _ = load_full_state(resolve_checkpoint(run))
    assert final["progress"]["epoch"] == epochs and final["progress"]["iteration"] == 12 * epochs
    # The LR followed the iteration, not restarted at the resumed one: the horizon's end.
    assert final["optimizer"]["param_groups"][0]["lr"] == 0.0
    # And it ends where the same command run without the kill ends, to the bit: the worker's
    # state comes back from the checkpoint, Ray Data's epoch count (block order, augmentation)
    # continues from it (trainer._continue_epochs).
    whole = tmp_path / "whole"
    assert distill.main([*args, f"trainer.storage_path={whole}"]) == 0
    resumed_weights, _ = load_model_state(resolve_checkpoint(run))
    whole_weights, _ = load_model_state(resolve_checkpoint(_run_dir(whole, "distill-kd")))
    assert all(torch.equal(resumed_weights[k], whole_weights[k]) for k in whole_weights)


def test_bad_rows_counted_then_fail_past_max_bad_fraction(
    ray_session, tiny_overrides, tmp_path, capsys
):
    """Undecodable rows are skipped and counted; more of them than data.max_bad_fraction stops
    the run with the numbers, not a Ray traceback, and leaves no checkpoint of the failed epoch."""
    import numpy as np

    from components.data.shards import DatasetInfo, ShardWriter, encode_png, mask_labels

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    bad = {3, 10, 17, 30, 41}  # 5 of 48 rows
    with ShardWriter(str(root), "train") as writer:
        for i in range(48):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            mask = rng.integers(0, 4, (32, 32), dtype=np.uint8)
            image_bytes = b"not an image" if i in bad else encode_png(image)
            writer.add(f"row-{i}", image_bytes, encode_png(mask), mask_labels(mask), 32, 32)
    info = DatasetInfo("bad", 4, ["a", "b", "c", "d"], [[0, 0, 0]] * 4, 255, {})
    info.splits = {"train": writer.close()}
    with ShardWriter(str(root), "val") as writer:
        for i in range(8):
            image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            mask = rng.integers(0, 4, (32, 32), dtype=np.uint8)
            writer.add(f"val-{i}", encode_png(image), encode_png(mask), mask_labels(mask), 32, 32)
    info.splits["val"] = writer.close()
    info.save(str(root))

    common = {"method.name": "none", "data.max_bad_fraction": "0.2"}
    assert distill.main(tiny_overrides(str(root), str(tmp_path / "ok"), **common)) == 0
    meta = read_meta(resolve_checkpoint(_run_dir(tmp_path / "ok", "distill-none")))
    assert meta["metrics"]["bad_rows"] == len(bad)
    capsys.readouterr()

    strict = {**common, "data.max_bad_fraction": "0.05"}
    assert distill.main(tiny_overrides(str(root), str(tmp_path / "strict"), **strict)) == 1
    captured = capsys.readouterr()
    assert "training failed:" in captured.err
    # Stopped within the epoch, once more bad rows were seen than the epoch may hold in all
    # (0.05 x 48 rows = 2.4), not after it.
    assert "3 bad training rows" in captured.err or "4 bad training rows" in captured.err
    assert "more than data.max_bad_fraction allows this epoch (2)" in captured.err
    assert not list((tmp_path / "strict").rglob("meta.json"))


def _run_cli(args: list[str], tmp_path: Path) -> list[str]:
    """distill.py as a user runs it (a new process on the session's Ray); its output lines."""
    import os
    import subprocess
    import sys

    import ray

    root = Path(__file__).parents[2]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop("RAY_DISABLE_WORKER_LOG_PREFIX", None)
    done = subprocess.run(
        [sys.executable, str(root / "pipelines" / "distill.py"), *args],
        check=False,
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (done.stdout + done.stderr).splitlines()


def test_output_is_ours_unless_verbose(ray_session, tiny_data, tiny_overrides, tmp_path):
    # A teacher (1 epoch) and a student (2 epochs): two fits, as in the default job.
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **{"trainer.epochs": "2"})
    lines = _run_cli(args, tmp_path)
    assert len(lines) < 100, "\n".join(lines)
    epoch_lines = [ln for ln in lines if ": val mIoU" in ln]
    assert len(epoch_lines) == 3 and len(set(epoch_lines)) == 3  # each once (was twice)
    assert not any("RayTrainWorker pid=" in ln or "Reporting training result" in ln for ln in lines)
    assert not any("Execution plan of Dataset" in ln for ln in lines)
    assert any("checkpoint (best)" in ln for ln in lines)
    # Ray's notices about itself: Ray Data's console, its deprecation, the token notice.
    for notice in ("Progress bars disabled", "exclude_resources", "Token authentication"):
        assert not any(notice in ln for ln in lines), notice
    assert not any("|" in ln and "step/s" in ln for ln in lines)  # not a terminal: no bar

    # --verbose brings Ray's own output back (Train's report dumps, the worker prefixes); a bar
    # asked for is drawn by this driver from the worker's state (ray.experimental.tqdm_ray).
    evaluation = ["eval.scales=[0.75,1.0]", "eval.flip=true", "eval.boundary_width=2"]
    again = _run_cli(
        [*args, *evaluation, "trainer.name=verbose-run", "trainer.progress=bar", "--verbose"],
        tmp_path,
    )
    assert any("Reporting training result" in ln for ln in again)
    assert any("RayTrainWorker pid=" in ln for ln in again)
    assert any("epoch 2/2 loss" in ln and "100%" in ln for ln in again), "\n".join(again)
    # The eval section reaches the workers' evaluation: boundary IoU in every row and line.
    rows = (tmp_path / "out" / "verbose-run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and all(0 <= json.loads(r)["boundary_iou"] <= 1 for r in rows)
    assert sum("bIoU@2px" in ln for ln in again) == 2
    # The run folder keeps the resolved config (it reruns the run) and its report.
    from components.config import load_config

    run = tmp_path / "out" / "verbose-run"
    saved = load_config(["--config", str(run / "config.yaml")])
    assert saved.eval.boundary_width == 2 and saved.trainer.name == "verbose-run"
    report = (run / "report.md").read_text()
    assert "![loss terms and val mIoU" in report and (run / "curves.png").is_file()
    assert len(list((run / "panels").glob("*.png"))) == 4  # trainer.panel_images


def test_evaluation_every_n_epochs_keeps_the_best_evaluated_checkpoint(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    """trainer.eval_every=2 over 3 epochs: val after epochs 2 and 3 (the last always), none
    after epoch 1, which reports miou -1 and so can never be kept as the best checkpoint."""
    from components.training.loop import evaluates

    extra = {"method.name": "none", "trainer.epochs": "3", "trainer.eval_every": "2"}
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **extra)
    assert distill.main(args) == 0
    out = capsys.readouterr().out
    assert "epoch 1/3: (val every 2 epochs)" in out
    assert "epoch 2/3: val mIoU" in out and "epoch 3/3: val mIoU" in out
    run = _run_dir(tmp_path / "out", "distill-none")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["miou"] >= 0 for r in rows] == [False, True, True]
    assert rows[-1]["best_epoch"] in (2, 3)
    assert not (run / "epoch_0001").exists()  # neither the best nor the newest
    assert [evaluates(_cfg_every(2, 5), e) for e in range(5)] == [False, True, False, True, True]


def _cfg_every(every: int, epochs: int):
    from components.config import load_config

    return load_config([f"trainer.eval_every={every}", f"trainer.epochs={epochs}"])


def test_the_same_command_gives_the_same_run(ray_session, tiny_data, tiny_overrides, tmp_path):
    """Issue 21: the same command with the same seeds trains the same weights on CPU (one
    worker): data order and augmentation are seeded per epoch (components/data/ingest.py), the
    model's init and the worker's torch RNG by trainer.seed. (A killed and resumed run against
    an uninterrupted one: test_killed_driver_resumes_from_its_last_checkpoint.) A run in the
    driver (local mode, the default for one worker on the Ray instance a command started, as
    here) trains what a run in a worker process trains, to the bit."""
    runs = []
    for name, mode in (("a", "true"), ("b", "true"), ("c", "false")):
        storage = tmp_path / name
        args = tiny_overrides(tiny_data, str(storage), **{"trainer.epochs": "2"})
        assert distill.main([*args, "method.name=none", f"trainer.local_mode={mode}"]) == 0
        run = _run_dir(storage, "distill-none-resnet18")
        weights, meta = load_model_state(resolve_checkpoint(run))
        runs.append((meta["metrics"], weights))
    (m1, w1), *others = runs
    for m2, w2 in others:
        assert (m1["loss"], m1["miou"]) == (m2["loss"], m2["miou"])
        assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
