"""Safe by default (issue 26): a private Ray, one process per run folder, no silent synthetic
data, errors that name the key, stored configs read as data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from components.config import Config, ConfigError, from_dict, to_dict
from components.training import trainer
from components.training.checkpoint import save_checkpoint
from components.training.runlock import LOCK_FILE, RunFolderBusy, run_lock
from pipelines import _common, distill

ROOT = Path(__file__).parents[2]


def test_a_mistyped_data_root_is_an_error_not_a_synthetic_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(_common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    typo = tmp_path / "data" / "synthetc"
    assert distill.main([f"data.root={typo}", f"trainer.storage_path={tmp_path}/out"]) == 2
    err = capsys.readouterr().err
    assert "'data.root'" in err and str(typo) in err and "prepare_data.py" in err
    assert not typo.exists()  # nothing generated there


def test_only_the_embedded_roots_are_generated_unless_asked():
    from components.config import DataConfig

    assert trainer.may_generate(DataConfig())  # data/synthetic, the default's own root
    assert trainer.may_generate(DataConfig(root="./data/synthetic_wsss/"))
    assert not trainer.may_generate(DataConfig(root="data/my_data"))
    assert trainer.may_generate(DataConfig(root="data/my_data", generate_synthetic=True))
    assert not trainer.may_generate(DataConfig(generate_synthetic=False))


def test_a_batch_bigger_than_the_split_names_the_keys_before_ray(
    tiny_data, tiny_overrides, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(_common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **{"data.batch_size": "100000"})
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert "'data.batch_size'" in err and "48 rows" in err and "trainer.num_workers=1" in err


def test_a_stored_config_is_data_not_interpolations(monkeypatch):
    monkeypatch.setenv("SEGD_TEST_SECRET", "hunter2")
    stored = to_dict(Config())
    stored["model"]["pretrained"] = "${oc.env:SEGD_TEST_SECRET}"
    stored["trainer"]["storage_path"] = "s3://b/${x}/c\\${y}"
    cfg = from_dict(stored)
    assert cfg.model.pretrained == "${oc.env:SEGD_TEST_SECRET}"  # not "hunter2"
    assert cfg.trainer.storage_path == "s3://b/${x}/c\\${y}"


def test_the_same_run_started_twice_is_refused(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import sys, time
                sys.path.insert(0, {str(ROOT)!r})
                from components.training.runlock import run_lock
                with run_lock({str(run)!r}):
                    print("held", flush=True)
                    time.sleep(60)
            """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = pytest.raises(RunFolderBusy, match=f"in use by PID {holder.pid}")
        with busy, run_lock(str(run)):
            pass
    finally:
        holder.kill()
        holder.wait()
    # Its holder killed with -9: the lock is stale and taken over; released at the end.
    with run_lock(str(run)):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (run / LOCK_FILE).exists()


def test_a_reused_run_name_with_another_model_is_named(tmp_path):
    cfg = Config()
    cfg.trainer.storage_path = str(tmp_path)
    other = to_dict(cfg)
    other["model"]["backbone"] = "resnet101"
    meta = {"config": other, "progress": {"epoch": 1, "iteration": 5}}
    save_checkpoint(tmp_path / "mine" / "epoch_0001", {}, {"x": 1}, meta)
    with pytest.raises(ConfigError, match=r"'trainer.name'.*another config.*resnet101"):
        trainer._check_same_run(cfg, "mine")
    trainer._check_same_run(cfg, "fresh")  # no folder: nothing to compare


def test_a_dead_worker_is_explained():
    text = (
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR "
        "... OOM ..."
    )
    message = trainer.failure_message(RuntimeError(text))
    assert message.startswith("a training worker process died")
    assert "out-of-memory" in message and "data.batch_size" in message


def test_ctrl_c_prints_the_command_that_resumes(tiny_data, tiny_overrides, tmp_path, capsys,
                                                monkeypatch):  # fmt: skip
    from components.regimes import SUPERVISED

    monkeypatch.setattr(_common, "init_ray", lambda *a, **k: None)

    def interrupted(cfg, info, args):
        raise KeyboardInterrupt

    args = tiny_overrides(tiny_data, str(tmp_path / "out"))
    assert _common.run_pipeline(SUPERVISED, args, "doc", interrupted) == 130
    err = capsys.readouterr().err
    assert "To resume: python" in err and f"data.root={tiny_data}" in err


@pytest.mark.slow
def test_a_run_never_joins_another_ray_instance(ray_session, tmp_path):
    """The session's instance is a stranger here: Ray's "auto" would have joined it (it scans
    the machine's processes); init_ray starts a private one."""
    session = ray_session.get_runtime_context().gcs_address
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import ray
        from pipelines._common import init_ray
        init_ray(dashboard=False)
        print("gcs", ray.get_runtime_context().gcs_address, flush=True)
        ray.shutdown()
    """)
    done = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("gcs ")][-1]
    assert line.split()[1] != session


def test_relative_storage_under_a_job_is_not_ray_s_temporary_working_dir(tmp_path, monkeypatch):
    from components.training.storage import absolute_storage

    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SEGDISTILL_HOME", raising=False)
    assert absolute_storage("outputs") == str(tmp_path / "home" / "segdistill" / "outputs")
    monkeypatch.setenv("SEGDISTILL_HOME", str(tmp_path / "keep"))
    assert absolute_storage("outputs") == str(tmp_path / "keep" / "outputs")
    assert absolute_storage("/abs/runs") == "/abs/runs"
    assert absolute_storage("s3://b/runs") == "s3://b/runs"
    monkeypatch.chdir(tmp_path)  # an ordinary folder: relative to it, as before
    assert absolute_storage("outputs") == str(tmp_path / "outputs")


@pytest.mark.slow
@pytest.mark.parametrize("local_mode", ["false", "true"])
def test_a_corrupted_newest_checkpoint_resumes_from_the_one_before(
    ray_session, tiny_data, tiny_overrides, tmp_path, capsys, local_mode
):
    """In a worker, Ray's record names the corrupted newest checkpoint and the run folder's
    verified one replaces it; in the driver (local mode) the run folder is the only record."""
    from components.training.checkpoint import verify_files

    extra = {
        "method.name": "none",
        "trainer.epochs": "2",
        "trainer.num_to_keep": "2",
        "trainer.name": "run",
        "trainer.local_mode": local_mode,
    }
    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **extra)
    assert distill.main(args) == 0
    run = tmp_path / "out" / "run"
    state = run / "epoch_0002" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = bytes(16)  # 16 bytes zeroed, same size
    state.write_bytes(bytes(data))
    capsys.readouterr()

    # Not reported as finished: epoch 2 is trained again from epoch 1's checkpoint.
    assert distill.main(args) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "already finished" not in text
    assert f"skipping checkpoint {run / 'epoch_0002'}" in text and "SHA-256 differs" in text
    assert f"resumed from checkpoint: epoch 1, iteration 12 ({run / 'epoch_0001'}" in text
    if local_mode == "false":
        assert "newest was unusable" in text
    verify_files(run / "epoch_0002")  # written again, whole


def test_help_names_keys_and_print_config_shows_the_resolved_yaml(capsys):
    import yaml

    with pytest.raises(SystemExit):
        distill.main(["--help"])
    text = capsys.readouterr().out
    assert "components/schema.py" in text and "data.root=DIR" in text and "--print-config" in text
    assert distill.main(["--print-config", "optim.lr=0.05", "eval.flip=true"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.05 and printed["eval"]["flip"] is True
    assert printed["data"]["root"] == "data/synthetic"  # the embedded default, nothing run


@pytest.mark.slow
def test_use_gpu_without_a_gpu_fails_at_once(ray_session, tiny_data, tiny_overrides, tmp_path,
                                             capsys):  # fmt: skip
    """Was rc 0 with nothing said (issue 26): on the test session's own instance (started by
    this process, as a pipeline starts its private one) it fails at once, naming the GPU."""
    import time

    args = tiny_overrides(tiny_data, str(tmp_path / "out"), **{"trainer.use_gpu": "true"})
    start = time.monotonic()
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert "1 GPU" in err and "0 GPU" in err and "this machine's own Ray instance" in err
    assert time.monotonic() - start < 60  # no resource wait


def test_run_names_did_not_change_with_the_new_keys():
    """Keys added since (eval, trainer.progress, model.pretrained_partial, a None
    data.generate_synthetic) are not in the name, so runs made before them still resume. The
    names were computed with the code at commit 5605b5f."""
    from components.config import load_config

    cfg = load_config([])
    assert trainer.run_name(cfg) == "distill-sstkd-resnet18-e0e063d1"
    teacher = trainer.teacher_training_config(cfg)
    assert trainer.run_name(teacher, prefix="teacher") == "teacher-none-resnet18-0acadb17"
    # The shipped synthetic configs pretrain their backbones since 2026-12-01 (issue 21): a new
    # run; with `model.pretrained=null` the name made before.
    scratch = ["model.pretrained=null"]
    semisup = load_config(["--config", "configs/cross_image_synthetic.yaml", *scratch])
    assert trainer.run_name(semisup) == "semisup-cross_image-resnet18-091cd893"
    pretrained = load_config(["--config", "configs/cross_image_synthetic.yaml"])
    assert trainer.run_name(pretrained) != "semisup-cross_image-resnet18-091cd893"
    flipped = load_config(["eval.flip=true", "trainer.progress=lines", "trainer.eval_every=2"])
    assert trainer.run_name(flipped) == "distill-sstkd-resnet18-e0e063d1"
    # Weakly supervised keys whose new defaults change what TSCD trains (frozen MiT norms, label
    # propagation; trainer.REGIME_ONLY): set to the old behaviour, the old name (computed at
    # 5605b5f); at their defaults a new one; in other regimes' names never.
    tscd = ["--config", "configs/tscd_synthetic.yaml", *scratch]
    old = [*tscd, "method.weakly.freeze_backbone_norms=false", "method.weakly.propagate_after=null"]
    assert trainer.run_name(load_config(old)) == "wsss-tscd-mit_b0-1b658d79"
    assert trainer.run_name(load_config(tscd)) != "wsss-tscd-mit_b0-1b658d79"
    assert trainer.run_name(load_config(["data.val_in_workers=false"])) == (
        "distill-sstkd-resnet18-e0e063d1"
    )


def test_a_partial_pretrained_file_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    import torch

    from components.models.build import build_backbone

    monkeypatch.setattr(_common, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    state = build_backbone("resnet18", 0.25).state_dict()
    state["conv1.weight"] = torch.zeros(16, 3, 3, 3)  # a 3x3 (deep) stem's first conv
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    args = [f"model.pretrained={path}", "model.width=0.25", f"trainer.storage_path={tmp_path}"]
    assert distill.main(args) == 2
    err = capsys.readouterr().err
    assert "'model.pretrained'" in err and "conv1.weight (16, 3, 3, 3) here (16, 3, 7, 7)" in err
