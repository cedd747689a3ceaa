"""Shared by the entry scripts: import path, the pipeline skeleton, Ray start-up, errors.

    def main(argv=None) -> int:
        return run_pipeline(SUPERVISED, argv, __doc__, execute)   # parse, check, Ray, run, print

`execute(cfg, info, args)` is the pipeline's own part (train, compare, diagnose) and returns the
report it prints; everything around it is the same for distill, semisup and wsss.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import logging
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

# `python pipelines/x.py` puts pipelines/ first on sys.path; the project root must be there too
# (under `ray job submit --working-dir .` the package may not be installed on the head node).
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


KEYS_HELP = """\
Config keys are set as key.sub=value after the flags (every key, with its comment, is in
components/schema.py; --print-config shows them all with the values this command would use).
The most used:
  data.root=DIR                 a dataset from pipelines/prepare_data.py (docs/datasets.md)
  data.batch_size=8             per worker;  data.crop_size=512
  model.backbone=resnet18       student (resnet18/34/50/101, mit_b0..b5); model.head=pspnet
  teacher.checkpoint=PATH       a run folder, checkpoint or state_dict; unset: train one first
  method.name=sstkd             see docs/methods.md;  method.weights.<term>=0.5 (0 = off)
  optim.lr=0.02                 trainer.epochs=7
  trainer.num_workers=2         trainer.storage_path=outputs (or s3://...)
  eval.mode=slide eval.crop=[512,1024] eval.stride=[341,683]   eval.flip=true
"""


def parse_args(
    argv: list[str] | None, doc: str, add_arguments: Callable | None = None
) -> argparse.Namespace:
    """`--config FILE`, the pipeline's own flags, then `key.sub=value` overrides."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file in the schema of components/schema.py")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (defaults, --config and overrides) as YAML and exit",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output too (Train's logs, Ray Data's plans and progress bars)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser.parse_args(argv)


def run_pipeline(
    regime,
    argv: list[str] | None,
    doc: str,
    execute: Callable,
    default_config: Callable | None = None,
    add_arguments: Callable | None = None,
) -> int:
    """Parse, validate (the method must be of `regime`), check the storage, start Ray, prepare
    the dataset, `execute(cfg, info, args)` -> report, print it. Returns the exit code: 2 for
    bad input (a key, a file, a dataset), 1 for a failed training, 0 otherwise."""
    from components.config import ConfigError, merge_config, validate
    from components.regimes import regime_of

    args = parse_args(argv, doc, add_arguments)
    try:
        base = default_config() if default_config is not None and not args.config else None
        overrides = [*args.overrides, *(["trainer.verbose=true"] if args.verbose else [])]
        cfg = merge_config(args.config, overrides, base)
        own = regime_of(cfg.method.name)
        if own is not regime:
            raise ConfigError(
                f"'method.name': {cfg.method.name} is {own.name}; run it with {own.pipeline} "
                f"({regime.pipeline} runs {', '.join(regime.methods)})"
            )
        validate(cfg)
        check_pretrained(cfg)
    except ConfigError as e:
        return fail(str(e))
    if args.print_config:
        from components.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    quiet_environment(cfg.trainer.verbose)

    import ray.train

    from components.data.shards import DatasetError
    from components.training.checkpoint import CheckpointError
    from components.training.local_mode import expects_driver
    from components.training.runlock import RunFolderBusy
    from components.training.storage import check_writable
    from components.training.trainer import failure_message, prepare_dataset, storage_of

    start = time.perf_counter()
    try:
        check_writable(storage_of(cfg))  # before Ray starts or anything is trained
    except ConfigError as e:
        return fail(str(e))
    try:
        info = prepare_dataset(cfg)  # checked before Ray starts (a typo costs no start-up)
        init_ray(dashboard=not expects_driver(cfg.trainer))
        report = execute(cfg, info, args)
    except (ConfigError, DatasetError, CheckpointError, RunFolderBusy) as e:
        return fail(str(e))
    except ray.train.TrainingFailedError as e:
        return fail(f"training failed: {failure_message(e)}{RESUME_HINT}", code=1)
    except KeyboardInterrupt:
        command = " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
        print(
            f"\ninterrupted; the run keeps its last checkpoint. To resume: python {command}",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(f"\n{report}\n  wall time {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def check_pretrained(cfg) -> None:
    """`model.pretrained` (and the teacher's) loads whole, before Ray starts: a file that fits
    only in part is a ConfigError naming the key and the tensors, not a worker's traceback."""
    from components.config import SYNTHETIC_PRETRAINED, ConfigError
    from components.models.build import build_model

    for key, model in (("model", cfg.model), ("teacher.model", cfg.teacher.model)):
        if model.pretrained == SYNTHETIC_PRETRAINED:  # made (and checked) by its stage
            continue
        if model.pretrained and not (key == "teacher.model" and cfg.teacher.checkpoint):
            try:
                build_model(model, num_classes=2)
            except ValueError as e:
                raise ConfigError(f"'{key}.pretrained': {e}") from None


RESUME_HINT = "\nthe run keeps its last complete checkpoint: the same command resumes from it"


def quiet_environment(verbose: bool) -> None:
    """Ray's side of readable output, set before Ray starts. Ray Train's workers print every
    `print` twice (their stdout, and again through its logger): its print patch is off. Without
    --verbose, the lines workers send to the driver lose Ray's "(RayTrainWorker pid=...)"
    prefix, and Ray's notices about itself stay off the console: what is left is ours.

    The environment is read by the processes of a local instance started from here; a
    cluster's own nodes keep their settings. Ray's log files in the session folder are complete
    either way: Ray Data's console handler is raised to ERROR, its file handler is not."""
    os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"  # handed on to the workers by Ray Train
    if verbose:
        return
    os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ:  # once per process, not per pipeline call
        os.environ["RAY_DATA_LOGGING_CONFIG"] = _ray_data_logging_config()
    # Importing ray.data (above) applied its default config in this process: again, with ours.
    from ray.data._internal.logging import configure_logging

    configure_logging()
    # Ray Train passes this deprecated option to Ray Data itself (ray/train/_internal/
    # data_config.py); nothing a user can change.
    notice = "`ExecutionOptions.exclude_resources` is deprecated"
    warnings.filterwarnings("ignore", message=re.escape(notice))
    extra = f"ignore:{notice}"
    previous = os.environ.get("PYTHONWARNINGS")
    if not previous:
        os.environ["PYTHONWARNINGS"] = extra
    elif extra not in previous:
        os.environ["PYTHONWARNINGS"] = f"{previous},{extra}"
    # "Token authentication is enabled for this Ray cluster" on every local start.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )


def _ray_data_logging_config() -> str:
    """Ray Data's own logging config with its console handler at ERROR (its "Progress bars
    disabled" and "execution finished" notices) in a private temp file (mode 0600, removed at
    exit): a logging config can name classes to build, so no shared path is read."""
    import tempfile

    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "ERROR"
    fd, path = tempfile.mkstemp(prefix="segdistill-ray-data-logging-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=True)

    def remove() -> None:
        # Ray's own at-exit shutdown was registered first (at import), so it would run after
        # this: a process Ray starts meanwhile (Ray Data's detached autoscaling coordinator,
        # created as a dataset's last execution ends) would find no file and print a traceback
        # (seen with evaluate.py). Ray is stopped first here; its own call is then a no-op.
        stop_local_ray()
        Path(path).unlink(missing_ok=True)

    atexit.register(remove)
    return path


def init_ray(dashboard: bool = True) -> None:
    """Connect to the cluster named by RAY_ADDRESS (set by `ray job submit` for its jobs) or
    recorded by `ray start` on this machine by this user; otherwise start a private local
    instance. Never Ray's `address="auto"`, which also joins any other Ray instance it finds
    among the machine's processes (another user's, or another run's private one, which then
    takes this run down when its driver exits).

    The local instance has its dashboard (on 127.0.0.1 only) unless `dashboard` is false (a
    run that trains in the driver, Ray Train's local mode, and evaluate.py and predict.py have
    no worker group to clean up: components/training/local_mode.py; the dashboard was 1.1 GiB
    of processes on a 2-core machine): Ray Train's placement-group cleaner asks the dashboard's
    State API whether a run's controller is still alive. Without an
    answer it logs a warning every second for the whole run, and the workers' placement group of
    every trial that Tune stops (ASHA, or at its last epoch) stays reserved until the sweep
    ends, so later trials wait for ever for the CPUs it holds. Ray binds its other ports on all
    interfaces (it replaces 127.0.0.1 by the machine's address itself); Ray 2.60's token
    authentication, on by default, refuses clients without this user's token."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or recorded_cluster()
    if address:
        ray.init(address=address)
        print(f"ray: connected to the cluster at {address}", flush=True)
        return
    start_local_ray(
        include_dashboard=dashboard, dashboard_host="127.0.0.1", runtime_env=LOCAL_RUNTIME_ENV
    )


# The private local instance's tasks and actors (decoding, the training worker) run at nice 0,
# like a plain PyTorch program and its DataLoader workers, instead of Ray's default 15, at which
# the training worker yields its core to Ray's own processes (raylet, GCS, agents, at nice 0).
# Measured on 2 cores (benchmarks/loop_overhead.py, docs/benchmarks.md): the same median step
# either way; the rare very slow step (616 ms, 25x the median, in one of three runs at 15) was
# not seen at 0 (worst 90 ms). `ray job submit` sets 0 for its supervisor; on a cluster the
# operator's setting stands.
LOCAL_RUNTIME_ENV = {"env_vars": {"RAY_worker_niceness": "0"}}


def recorded_cluster() -> str | None:
    """The address of a cluster `ray start` started on this machine, from Ray's own record,
    when this user wrote the record and the cluster's GCS still answers (a stale record, left
    by a cluster that died, is ignored)."""
    import socket

    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    try:
        if path.stat().st_uid != os.getuid():
            return None  # another user's cluster
        address = path.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def start_local_ray(attempts: int = 3, **kwargs) -> None:
    """`ray.init(**kwargs)` for a new local instance, tried again when the node times out during
    start-up: Ray waits a fixed 30 s for its raylet to register, which a loaded 2-core machine
    can miss (seen in CI-like runs); a second try usually starts in a few seconds.

    A timed-out attempt leaves its GCS, dashboard and monitor processes running (`ray.shutdown`
    does not know them); they are this process's children, so they are stopped here before the
    next try instead of loading the machine for the rest of the session."""
    import ray

    for attempt in range(1, attempts + 1):
        before = _child_pids()
        try:
            ray.init(**kwargs)
            atexit.register(stop_local_ray)  # runs before Ray's own (registered at its import)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            print(f"ray start-up timed out (attempt {attempt}/{attempts}); retrying", flush=True)
            ray.shutdown()
            _stop(_child_pids() - before)


def stop_local_ray() -> None:
    """`ray.shutdown()`, with the private instance's autoscaler monitor stopped first (SIGKILL).

    Ray stops its processes one at a time, each given up to 1 s after SIGTERM; the monitor
    spends its second trying to tell the drivers through the GCS, already stopped, that "the
    autoscaler failed", and is then killed: 1.0 of the 1.4 s `ray.shutdown()` took on 2 cores
    (ray==2.60.0, ray/_private/node.py `kill_all_processes`, ray/autoscaler/_private/monitor.py
    `_signal_handler`; measured 2026-12-01, docs/benchmarks.md). A fixed local node has nothing
    for it to scale or save. Only processes this process started are touched (none when it
    connected to a cluster); where Ray's node object has changed, plain `ray.shutdown()`."""
    import ray

    if not ray.is_initialized():
        return
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None)
    monitor = getattr(ray._private.ray_constants, "PROCESS_TYPE_MONITOR", "monitor")
    if isinstance(processes, dict) and monitor in processes:
        # any failure: Ray's own shutdown below stops it as before
        with contextlib.suppress(Exception):
            node._kill_process_type(monitor, allow_graceful=False, check_alive=False, wait=True)
    ray.shutdown()


def _child_pids() -> set[int]:
    """PIDs of this process's children (Linux /proc; empty elsewhere)."""
    me, found = os.getpid(), set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            found.add(int(entry))
    return found


def _stop(pids: set[int], grace_s: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after `grace_s`, then reap."""
    import signal
    import time

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        if sig == signal.SIGTERM:
            time.sleep(grace_s)
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except OSError:
            pass


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code
