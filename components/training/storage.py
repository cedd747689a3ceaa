"""Where runs keep their checkpoints: `trainer.storage_path`, a local folder or a URI.

A URI is anything `pyarrow.fs.FileSystem.from_uri` opens: `s3://bucket/runs`, `gs://bucket/runs`,
`hdfs://...`, `file:///abs/path`. Ray Train writes checkpoints there itself; this module does the
rest of what the driver needs:

    check_writable(path)          # before any training: fails in bounded time, naming the path
    finished = finished_uri_checkpoint("s3://b/runs", name, epochs)   # a local copy, or None
    folder = fetch_checkpoint("s3://b/runs/<run>")   # the latest checkpoint, copied locally

Checkpoints read from a URI are copied into a local cache folder (`SEGDISTILL_CACHE`, by default
`~/.cache/segdistill`), keyed by the URI, so the loaders only ever see local files.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from components.config import ConfigError
from components.data.shards import DatasetError, resolve_fs
from components.training.checkpoint import META_FILE, CheckpointError


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def absolute_storage(path: str) -> str:
    """A storage path as Ray wants it: a URI as is, a local path made absolute.

    A relative path under `ray job submit` is not resolved against the job's working dir: Ray
    unpacks that under its session folder (`.../runtime_resources/working_dir_files/_ray_pkg_*`)
    and deletes it with the session, runs and checkpoints included. It is resolved against
    `$SEGDISTILL_HOME` (default `~/segdistill`) instead; the pipelines print where."""
    if is_uri(path) or os.path.isabs(path):
        return path if is_uri(path) else os.path.abspath(path)
    base = os.getcwd()
    if in_job_working_dir(base):
        base = os.environ.get("SEGDISTILL_HOME") or os.path.expanduser("~/segdistill")
    return os.path.abspath(os.path.join(base, path))


def in_job_working_dir(folder: str) -> bool:
    """Whether `folder` is a working dir Ray unpacked for a job (temporary, see above)."""
    parts = Path(folder).parts
    return "runtime_resources" in parts and "working_dir_files" in parts


def join(storage: str, *parts: str) -> str:
    """A path below `storage`, keeping a URI's query (`s3://b/runs?endpoint_override=...`)."""
    base, sep, query = storage.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return resolve_fs(uri)
    except DatasetError as e:  # the same "cannot open this location" message, as a checkpoint's
        raise CheckpointError(str(e)) from e


def _probe(path: str) -> None:
    """Create the folder and write, read back and delete a small file in it."""
    name = f".segdistill-write-test-{uuid.uuid4().hex[:12]}"
    payload = b"segdistill storage check\n"
    if not is_uri(path):
        folder = Path(os.path.expanduser(path)).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / name
        probe.write_bytes(payload)
        ok = probe.read_bytes() == payload
        probe.unlink()
    else:
        fs, root = _open(path)
        fs.create_dir(root, recursive=True)
        probe = f"{root}/{name}"
        with fs.open_output_stream(probe) as f:
            f.write(payload)
        with fs.open_input_stream(probe) as f:
            ok = f.read() == payload
        fs.delete_file(probe)
    if not ok:
        raise OSError("a file written there read back different")


def check_writable(path: str, key: str = "trainer.storage_path", timeout_s: float = 60.0) -> None:
    """Raise ConfigError naming `key` and `path` when a run could not write its checkpoints there.

    Object stores that cannot be reached make their clients retry for minutes; the probe runs
    in a thread and gives up after `timeout_s`, so a wrong endpoint fails in bounded time."""
    outcome: dict = {}

    def run() -> None:
        try:
            _probe(path)
        except Exception as e:  # noqa: BLE001  (any failure is re-raised on the caller thread)
            outcome["error"] = e
        outcome["done"] = True

    thread = threading.Thread(target=run, daemon=True, name="storage-check")
    thread.start()
    thread.join(timeout_s)
    if not outcome.get("done"):
        raise ConfigError(
            f"{key} '{path}': no answer within {timeout_s:g} s "
            "(unreachable? check the address, network and credentials)"
        )
    error = outcome.get("error")
    if error is not None:
        raise ConfigError(
            f"{key} '{path}': not writable: {type(error).__name__}: {error}"
        ) from error


def _cache_root() -> Path:
    return Path(os.environ.get("SEGDISTILL_CACHE", "~/.cache/segdistill")).expanduser()


def _metas(uri: str) -> tuple[pafs.FileSystem, list[tuple[str, dict]]]:
    """The filesystem of `uri` and (folder path in it, meta) for every complete checkpoint at or
    below `uri`, oldest first."""
    fs, root = _open(uri)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise CheckpointError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        root = root.rsplit("/", 1)[0]
    candidates = [f"{root}/{META_FILE}"]
    if fs.get_file_info(candidates[0]).type != pafs.FileType.File:
        selector = pafs.FileSelector(root, recursive=True)
        candidates = [
            i.path
            for i in fs.get_file_info(selector)
            if i.type == pafs.FileType.File and i.base_name == META_FILE
        ]
    found = []
    for meta_path in candidates:
        with fs.open_input_stream(meta_path) as f:
            text = f.read().decode()
        found.append((meta_path.rsplit("/", 1)[0], json.loads(text)))
    found.sort(key=lambda fm: (fm[1].get("progress", {}).get("iteration", -1), fm[0]))
    return fs, found


def _download(fs: pafs.FileSystem, folder: str, meta: dict, uri: str) -> Path:
    """A local copy of one checkpoint folder, reused while its meta.json is the same."""
    key = hashlib.sha256(
        (uri + "\0" + folder + "\0" + json.dumps(meta, sort_keys=True)).encode()
    ).hexdigest()[:20]
    local = _cache_root() / "checkpoints" / key
    if (local / META_FILE).is_file():
        return local
    partial = local.with_name(f"{key}.partial-{os.getpid()}")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(
            folder,
            str(partial),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    except (OSError, pa.ArrowException) as e:
        raise CheckpointError(f"{uri}: cannot copy checkpoint {folder}: {e}") from e
    if not (partial / META_FILE).is_file():
        raise CheckpointError(f"{uri}: copied {folder}, but no {META_FILE} arrived")
    try:
        partial.rename(local)
    except OSError:  # another process finished the same copy first
        if not (local / META_FILE).is_file():
            raise
    return local


def fetch_checkpoint(uri: str) -> Path:
    """The checkpoint at `uri` (a checkpoint folder, a file in one, or a run folder: its latest),
    copied to the local cache."""
    fs, found = _metas(uri)
    if not found:
        raise CheckpointError(f"{uri}: no complete checkpoint (a folder with {META_FILE}) inside")
    return _download(fs, *found[-1], uri)


def finished_uri_checkpoint(storage: str, name: str, epochs: int) -> Path | None:
    """Like trainer.finished_checkpoint for URI storage: a local copy of the checkpoint of run
    `name` that reached `epochs`, or None."""
    run = join(storage, name)
    try:
        fs, found = _metas(run)
    except CheckpointError:
        return None
    for folder, meta in reversed(found):
        if meta.get("progress", {}).get("epoch", 0) >= epochs:
            return _download(fs, folder, meta, run)
    return None


__all__ = [
    "check_writable",
    "fetch_checkpoint",
    "finished_uri_checkpoint",
    "is_uri",
    "join",
]
