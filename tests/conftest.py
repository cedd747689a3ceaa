"""Shared fixtures: one local Ray instance per test session, tiny datasets and configs."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from pipelines._common import LOCAL_RUNTIME_ENV, quiet_environment, start_local_ray

    if not ray.is_initialized():
        # As a pipeline starts its own instance: its processes inherit the quiet settings.
        quiet_environment(verbose=False)
        # Two 1-CPU train workers plus one CPU for Ray Data tasks; more logical CPUs only make Ray
        # start more worker processes at once, which thrashes a 2-core machine. The dashboard is
        # on, as in pipelines/tune.py: Ray Train's placement-group cleaner needs its State API
        # (pipelines/_common.init_ray says why).
        with socket.socket() as s:  # not 8265: a user's own head may hold it
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        start_local_ray(
            attempts=5,
            num_cpus=3,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            log_to_driver=True,
            runtime_env=LOCAL_RUNTIME_ENV,  # as init_ray: tasks and actors at nice 0
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A 4-class synthetic dataset of 32x32 images: 48 train, 16 val rows."""
    from components.config import SyntheticConfig
    from components.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    cfg = SyntheticConfig(num_train=48, num_val=16, size=32, num_classes=4, seed=1)
    ensure_synthetic(str(root), cfg)
    return str(root)


@pytest.fixture(scope="session")
def tiny_overrides():
    """`tiny_overrides(data_root, storage, **extra)` -> dotted overrides for a run of seconds:
    tiny models, 32 px crops, one epoch."""
    return _tiny_overrides


def _tiny_overrides(data_root: str, storage: str, **extra: str) -> list[str]:
    base = {
        "data.root": data_root,
        "data.generate_synthetic": "false",
        "data.crop_size": "32",
        "data.batch_size": "4",
        "data.val_batch_size": "8",
        "data.prefetch_batches": "1",
        "model.width": "0.125",
        "model.pretrained": "null",  # the shipped synthetic configs pretrain (minutes)
        "teacher.model.pretrained": "null",
        "teacher.model.backbone": "resnet18",
        "teacher.model.width": "0.125",
        "teacher.epochs": "1",
        "trainer.epochs": "1",
        "trainer.storage_path": storage,
        "trainer.log_every": "1000",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
