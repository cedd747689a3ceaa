import random
from pathlib import Path

import numpy as np
import pytest
import torch

from components.config import OptimConfig
from components.training.checkpoint import (
    CheckpointError,
    latest_resumable,
    load_full_state,
    load_model_state,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from components.training.schedule import Schedule, build_optimizer, lr_factor


def _save(folder: Path, iteration: int) -> None:
    save_checkpoint(
        folder,
        {"w": torch.arange(4.0)},
        {"progress": {"iteration": iteration}, "rng": [rng_state()]},
        {"progress": {"epoch": iteration, "iteration": iteration}},
    )


def test_latest_resumable_skips_cut_short_and_model_only_folders(tmp_path: Path):
    run = tmp_path / "run"
    assert latest_resumable(run) is None
    _save(run / "epoch_0001", 10)
    _save(run / "epoch_0002", 20)
    _save(run / "epoch_0003", 30)
    state = run / "epoch_0003" / "state.pt"
    state.write_bytes(state.read_bytes()[:-10])  # a copy cut short by a kill
    save_checkpoint(  # newest, but a model-only export cannot resume training
        run / "export", {"w": torch.zeros(4)}, None, {"progress": {"iteration": 40}}
    )
    assert latest_resumable(run) == run / "epoch_0002"
    (run / "epoch_0002" / "model.pt").unlink()
    assert latest_resumable(run) == run / "epoch_0001"


def test_round_trip_and_latest_in_run_folder(tmp_path: Path):
    _save(tmp_path / "run" / "epoch_0001", 10)
    _save(tmp_path / "run" / "epoch_0002", 20)
    (tmp_path / "run" / "epoch_0003").mkdir()  # incomplete: no meta.json
    folder = resolve_checkpoint(tmp_path / "run")
    assert folder.name == "epoch_0002"
    state, _meta = load_model_state(folder)
    assert torch.equal(state["w"], torch.arange(4.0))
    full, _ = load_full_state(folder)
    assert full["progress"]["iteration"] == 20
    assert resolve_checkpoint(folder / "model.pt") == folder
    assert not list(folder.glob(".*tmp"))


def test_truncated_file_is_named(tmp_path: Path):
    _save(tmp_path / "c", 1)
    path = tmp_path / "c" / "state.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state\.pt.*truncated"):
        load_full_state(tmp_path / "c")
    load_model_state(tmp_path / "c")  # the other file is still good


def _flip(path: Path, count: int = 16) -> None:
    data = bytearray(path.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + count):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped model.pt", "meta.json deleted", "meta.json cut"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, damage: str):
    run = tmp_path / "run"
    _save(run / "epoch_0001", 10)
    _save(run / "epoch_0002", 20)
    newest = run / "epoch_0002"
    if damage == "flipped model.pt":
        _flip(newest / "model.pt")
    elif damage == "meta.json deleted":
        (newest / "meta.json").unlink()
    else:
        meta = newest / "meta.json"
        meta.write_text(meta.read_text()[:40])
    warnings: list[str] = []
    assert latest_resumable(run, warn=warnings.append) == run / "epoch_0001"
    assert resolve_checkpoint(run) == run / "epoch_0001"  # evaluation and teachers too
    if damage == "meta.json deleted":
        assert warnings == []  # no meta.json: not a checkpoint at all
    else:
        assert len(warnings) == 1 and "skipping checkpoint" in warnings[0]
        assert str(newest) in warnings[0]


def test_same_size_corruption_says_the_checksum_differs(tmp_path: Path):
    _save(tmp_path / "c", 1)
    _flip(tmp_path / "c" / "state.pt")
    with pytest.raises(CheckpointError, match=r"state\.pt: corrupted \(its SHA-256 differs"):
        load_full_state(tmp_path / "c")


def test_no_verified_checkpoint_is_an_error_not_a_guess(tmp_path: Path):
    _save(tmp_path / "run" / "epoch_0001", 10)
    _flip(tmp_path / "run" / "epoch_0001" / "model.pt")
    with pytest.raises(CheckpointError, match="no checkpoint inside passes its checksums"):
        resolve_checkpoint(tmp_path / "run")


def test_missing_checkpoint_named(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such"):
        resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_rng_state_restores_all_generators(tmp_path: Path):
    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    _save(tmp_path / "c", 1)
    saved, _ = load_full_state(tmp_path / "c")  # weights_only load of the RNG state works
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    set_rng_state(saved["rng"][0])


def test_poly_schedule_values_and_resume_from_the_iteration_alone():
    def f(i):
        return lr_factor(i, total_iters=100, power=0.9, warmup_iters=10)

    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(50) == pytest.approx(0.5**0.9) and f(100) == 0.0 and f(150) == 0.0
    optim = OptimConfig(lr=0.1, poly_power=0.9)
    opt = build_optimizer(torch.nn.Linear(1, 1), optim)
    schedule = Schedule.of(opt, 100, optim)
    for i in range(30):
        schedule.apply(opt, i)
        opt.step()
    # A resumed run: a fresh optimizer (base lr from the config) loads the saved state, whose
    # groups carry the decayed lr; the iteration alone sets the rate again, no schedule state.
    opt2 = build_optimizer(torch.nn.Linear(1, 1), optim)
    opt2.load_state_dict(opt.state_dict())
    Schedule.of(opt2, 100, optim).apply(opt2, 30)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 30 / 100) ** 0.9)
    # A longer horizon (more epochs) moves the decay, as a resumed longer run should.
    Schedule.of(opt2, 200, optim).apply(opt2, 30)
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 30 / 200) ** 0.9)
