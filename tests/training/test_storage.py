"""trainer.storage_path as a local folder or a URI: the write check and checkpoint lookup.

URIs are exercised through `file://`, which pyarrow opens as a real filesystem URI (the same
code path as s3:// and gs://, without a network)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from components.config import ConfigError
from components.training import storage
from components.training.checkpoint import (
    CheckpointError,
    load_model_state,
    resolve_checkpoint,
    save_checkpoint,
)


def _checkpoint(folder, iteration: int, epoch: int, value: float) -> None:
    state = {"w": torch.full((3,), value)}
    meta = {"progress": {"iteration": iteration, "epoch": epoch}, "metrics": {"miou": value}}
    save_checkpoint(folder, state, None, meta)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SEGDISTILL_CACHE", str(root))
    return root


def test_local_folder_is_created_and_left_clean(tmp_path):
    target = tmp_path / "a" / "b"
    storage.check_writable(str(target))
    assert target.is_dir() and list(target.iterdir()) == []


def test_file_uri_is_writable(tmp_path):
    storage.check_writable(f"file://{tmp_path}/runs")
    assert (tmp_path / "runs").is_dir() and list((tmp_path / "runs").iterdir()) == []


def test_path_below_a_file_is_named(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    for path in (str(blocker / "runs"), f"file://{blocker}/runs"):
        with pytest.raises(ConfigError) as e:
            storage.check_writable(path)
        assert f"trainer.storage_path '{path}': not writable" in str(e.value)


def test_unknown_scheme_is_named():
    with pytest.raises(ConfigError) as e:
        storage.check_writable("nosuchfs://bucket/runs", key="sweep.storage_path")
    assert "sweep.storage_path 'nosuchfs://bucket/runs'" in str(e.value)


def test_unanswered_storage_fails_without_waiting_for_the_probe(monkeypatch):
    # The probe never answers until the test releases it: the check must give up on its own
    # (no wall-clock bound here; a loaded CI machine made one flaky).
    release = threading.Event()
    monkeypatch.setattr(storage, "_probe", lambda path: release.wait(600))
    try:
        with pytest.raises(ConfigError, match=r"s3://b/runs': no answer within 0.2 s"):
            storage.check_writable("s3://b/runs", timeout_s=0.2)
        assert not release.is_set()
    finally:
        release.set()


def test_unreachable_object_store_is_named_in_bounded_time(monkeypatch):
    # A real S3 client against a closed local port: it retries for longer than the check waits.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    start = time.monotonic()
    with pytest.raises(ConfigError) as e:
        storage.check_writable(uri, timeout_s=5)
    assert time.monotonic() - start < 90  # the client alone retries for minutes
    text = str(e.value)
    assert text.startswith(f"trainer.storage_path '{uri}': ")
    assert "no answer within 5 s" in text or "not writable" in text


def test_join_keeps_the_query():
    assert storage.join("s3://b/runs?endpoint_override=h:9000", "r1") == (
        "s3://b/runs/r1?endpoint_override=h:9000"
    )
    assert storage.join("gs://b/runs/", "r1", "x") == "gs://b/runs/r1/x"


def test_fetch_latest_checkpoint_of_a_run_uri(tmp_path, cache):
    run = tmp_path / "runs" / "r1"
    _checkpoint(run / "checkpoint_b", iteration=10, epoch=1, value=1.0)
    _checkpoint(run / "checkpoint_a", iteration=20, epoch=2, value=2.0)  # later, despite the name
    (run / "checkpoint_c").mkdir()  # incomplete: no meta.json, never chosen

    local = resolve_checkpoint(f"file://{run}")
    assert local.is_relative_to(cache)
    state, meta = load_model_state(local)  # sizes and SHA-256 verified against meta.json
    assert torch.equal(state["w"], torch.full((3,), 2.0))
    assert meta["progress"]["iteration"] == 20
    # a second lookup reuses the copy; a checkpoint folder or a file in it resolve to themselves
    assert resolve_checkpoint(f"file://{run}") == local
    single = resolve_checkpoint(f"file://{run}/checkpoint_b/model.pt")
    assert load_model_state(single)[1]["progress"]["iteration"] == 10


def test_finished_run_on_uri_storage(tmp_path, cache):
    runs = tmp_path / "runs"
    _checkpoint(runs / "r1" / "checkpoint_1", iteration=5, epoch=1, value=1.0)
    uri = f"file://{runs}"
    assert storage.finished_uri_checkpoint(uri, "r1", epochs=2) is None
    assert storage.finished_uri_checkpoint(uri, "missing", epochs=1) is None
    done = storage.finished_uri_checkpoint(uri, "r1", epochs=1)
    assert load_model_state(done)[1]["metrics"]["miou"] == 1.0


def test_missing_and_empty_uris_are_named(tmp_path, cache):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        resolve_checkpoint(f"file://{tmp_path}/nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(f"file://{tmp_path}/empty")


def test_teacher_loads_from_a_run_uri(tmp_path, cache):
    import dataclasses

    from components.config import ModelConfig
    from components.models.build import build_model
    from components.training.trainer import load_teacher

    model = ModelConfig(backbone="resnet18", width=0.125)
    state = build_model(model, 4).state_dict()
    meta = {"model": dataclasses.asdict(model), "progress": {"iteration": 3, "epoch": 1}}
    save_checkpoint(tmp_path / "runs" / "teacher-x" / "epoch_0001", state, None, meta)

    uri = f"file://{tmp_path}/runs/teacher-x"
    teacher = load_teacher(uri, ModelConfig(), num_classes=4)
    assert teacher.source == uri  # named by its URI, not by the local cache copy
    assert teacher.model == model
    assert all(torch.equal(teacher.state[k], v) for k, v in state.items())
    with pytest.raises(CheckpointError, match="teacher predicts 4 classes but the dataset has 5"):
        load_teacher(uri, ModelConfig(), num_classes=5)
