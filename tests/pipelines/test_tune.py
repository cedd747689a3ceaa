"""A tiny Ray Tune sweep through pipelines/tune.py on the shared local Ray instance."""

from __future__ import annotations

import csv
import io
import time

import numpy as np
import pytest
import torch
import yaml

from pipelines import tune


def _one_training_step(cfg) -> float:
    """One optimizer step of `cfg`'s method on a batch of its training split, in this process."""
    from components.data.shards import DatasetInfo, read_split_table
    from components.data.transforms import decode_train_batch
    from components.distillation.build import build_method
    from components.models.build import build_model
    from components.training.trainer import load_teacher

    info = DatasetInfo.load(cfg.data.root)
    k = info.num_classes
    rows = read_split_table(cfg.data.root, "train", ["id", "image", "mask"]).slice(0, 4)
    out = decode_train_batch(
        {c: np.array(v, dtype=object) for c, v in rows.to_pydict().items()},
        crop_size=cfg.data.crop_size,
        scale_range=(1.0, 1.0),
        flip=False,
        seed=0,
        num_classes=k,
    )
    batch = {"image": torch.from_numpy(out["image"]), "mask": torch.from_numpy(out["mask"]).long()}
    t = load_teacher(cfg.teacher.checkpoint, cfg.teacher.model, k)
    teacher = build_model(t.model, k)
    teacher.load_state_dict(t.state)
    method = build_method(cfg, build_model(cfg.model, k), teacher.eval(), num_classes=k)
    opt = torch.optim.SGD(method.trainable.parameters(), lr=cfg.optim.lr)
    loss = method.training_step(batch)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _live_placement_groups() -> list:
    import ray

    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


@pytest.mark.slow
def test_tiny_sweep_stops_early_writes_outputs_and_continues(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys
):
    from components.config import ModelConfig, load_config
    from components.models.build import build_model

    teacher = tmp_path / "teacher.pth"
    torch.save(build_model(ModelConfig(width=0.125), num_classes=4).state_dict(), teacher)
    storage = tmp_path / "out"
    fixed = dict(
        item.split("=", 1)
        for item in tiny_overrides(
            tiny_data,
            str(storage),
            **{
                "teacher.checkpoint": str(teacher),
                "teacher.model.width": "0.125",
                "trainer.epochs": "2",
            },
        )
    )
    # Trials run one at a time in grid order and are ranked by their learning rate at the end of
    # each epoch, so ASHA's decisions are known in advance: the first trial (lr 0.02) runs both
    # epochs, the two after it are below the rung's cutoff after epoch 1 and are stopped.
    sweep = {
        "overrides": fixed,
        "search": {
            "optim.lr": "grid([0.02, 0.01, 0.005])",
            "method.dtiem.levels": "choice([2, 4])",
        },
        "sweep": {
            "name": "tiny",
            "num_samples": 1,
            "metric": "lr",
            "scheduler": "asha",
            "grace_period": 1,
            "reduction_factor": 2,
            "max_concurrent_trials": 1,
        },
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert tune.main(["--config", str(path)]) == 0
    out = capsys.readouterr().out
    folder = storage / "tiny"
    # the command that runs the best trial's config: the regime's pipeline (semisup.py for a
    # semi-supervised sweep such as configs/tune_relation_synthetic.yaml)
    assert f"python pipelines/distill.py --config {folder / 'best.yaml'}" in out
    for name in ("trials.csv", "trials.md", "params.png", "best.yaml"):
        assert (folder / name).is_file(), name

    rows = list(csv.DictReader(io.StringIO((folder / "trials.csv").read_text())))
    assert [float(r["optim.lr"]) for r in rows] == [0.02, 0.01, 0.005]
    assert [r["status"] for r in rows] == ["done", "stopped early", "stopped early"]
    assert [int(r["epochs"]) for r in rows] == [2, 1, 1]
    for r in rows:  # every trial trained: its val mIoU is there, its Train run has a checkpoint
        assert 0.0 <= float(r["best_miou"]) <= 1.0
        assert (folder / "runs" / f"train-{r['trial_id']}").is_dir()
    # The Markdown table, the printed table and the plot show the same trials in the same order.
    md = (folder / "trials.md").read_text()
    md_ids = [ln.split("|")[2].strip() for ln in md.splitlines() if ln.startswith("| ")][1:]
    assert md_ids == [r["trial_id"] for r in rows]
    assert "3 trials, 2 stopped early" in md
    for r in rows:
        assert f"{100 * float(r['best_miou']):.2f}" in md and r["trial_id"] in out
    # Not on a terminal: one progress line per finished trial (tune.py's TrialProgress).
    for r in rows:
        line = f"trial {r['trial_id']} {r['status']} after epoch {r['epochs']}"
        assert sum(ln.startswith(line) for ln in out.splitlines()) == 1, out
    from PIL import Image

    png = Image.open(folder / "params.png")
    points = dict(p.split("=") for p in png.text["points"].split(";"))
    assert {k: pytest.approx(float(v), rel=1e-4) for k, v in points.items()} == {
        r["trial_id"]: float(r["best_lr"]) for r in rows
    }

    # best.yaml is a complete distill config with the winning values; it validates and trains.
    best = load_config(["--config", str(folder / "best.yaml")])
    assert best.optim.lr == 0.02 and best.method.dtiem.levels in (2, 4)
    assert best.teacher.checkpoint == str(teacher) and best.trainer.epochs == 2
    assert np.isfinite(_one_training_step(best))

    # Early-stopped trials left no Train placement group behind (Ray's cleaner may take a moment).
    deadline = time.time() + 60
    while _live_placement_groups() and time.time() < deadline:
        time.sleep(2)
    assert _live_placement_groups() == []

    # The same command again continues the finished sweep: no trial is run again, and nothing
    # from the sweep folder is unpickled (a planted tuner.pkl, as Tune's restore would load it,
    # is never read: it would create `pwned`).
    import pickle

    class Planted:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    (folder / "tune-000" / "tuner.pkl").write_bytes(pickle.dumps(Planted()))
    runs_before = sorted(p.name for p in (folder / "runs").iterdir())
    mtimes = {p: p.stat().st_mtime for p in (folder / "runs").rglob("meta.json")}
    assert tune.main(["--config", str(path)]) == 0
    assert "continuing" in capsys.readouterr().out
    assert not (tmp_path / "pwned").exists()
    assert sorted(p.name for p in (folder / "runs").iterdir()) == runs_before
    assert {p: p.stat().st_mtime for p in (folder / "runs").rglob("meta.json")} == mtimes
    assert list(csv.DictReader(io.StringIO((folder / "trials.csv").read_text()))) == rows


def test_bad_search_key_rejected_before_any_trial(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"search": {"method.dtiem.levels": "choice([1, 8])"}}))
    assert tune.main(["--config", str(path), f"trainer.storage_path={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "method.dtiem.levels" in err and "can give 1" in err
    assert not (tmp_path / "out").exists()
