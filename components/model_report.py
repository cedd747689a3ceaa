"""The model report: size, compute, speed, memory and accuracy of a teacher and a student, side by
side with the student / teacher ratio, as a distillation paper's table.

    row = measure_model("outputs/<student run>", Settings(height=512, width=1024))
    report = build_report({"teacher": t_row, "student": s_row}, settings)
    print(to_markdown(report))

What each number is (also written into the report):
- parameters: sum of `p.numel()` over the model's parameters (the aux head, used in training
  only, included; buffers such as BatchNorm statistics not).
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` on one forward pass (batch 1) at the input
  size. Its convention: a multiply-add is 2 FLOPs (conv: 2 x out elements x C_in/groups x kernel
  area; matmul: 2 m n k); only convolutions, matmuls and attention are counted (no bias,
  BatchNorm, activation, pooling or interpolation). MACs = FLOPs / 2, the unit many segmentation
  papers call "FLOPs" (mmcv's get_model_complexity_info counts MACs).
- latency: wall time of one forward pass at batch 1 (`torch.inference_mode`, eval mode, the
  model's logits at its output stride: no upsampling), median and 90th percentile over `runs`
  passes after `warmup` passes; on GPU each pass is followed by `torch.cuda.synchronize()`.
  Throughput: `batch` / the median time of a batch-`batch` pass.
- ONNX Runtime latency: the model exported by components/export.py (logits upsampled to the
  input size, so a little more work than the eager row) run by onnxruntime's CPU provider with as
  many intra-op threads as torch uses here.
- peak memory, CPU: the resident-memory growth of a batch-1 forward pass, measured in a fresh
  Python process (tracemalloc does not see torch's C++ allocations): after a warm-up
  pass (which loads code and builds kernels), the peak RSS is reset (/proc/self/clear_refs) and
  the figure is VmHWM over a second pass minus VmRSS before it. glibc's mmap threshold is fixed
  at 64 KiB in that process so freed activations return to the OS (otherwise malloc keeps them
  and the second pass reuses them unseen). Limits: Linux only (elsewhere the first pass's
  ru_maxrss growth, code pages included, is reported and the method says so); it counts pages
  (oneDNN scratch and thread buffers included), not tensors, and allocations under 64 KiB stay
  in the heap. GPU: `torch.cuda.max_memory_allocated()` over the pass (weights included),
  tensors only (not the caching allocator's reserve or the CUDA context).
- mIoU: `metrics.miou` of the checkpoint's meta.json (validation mIoU of that epoch), and with
  a dataset, measured here on its split (whole-image inference, as evaluate.py by default).
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("teacher", "student")


@dataclass
class Settings:
    height: int = 512
    width: int = 1024
    runs: int = 10  # timed passes
    warmup: int = 2  # untimed passes before them
    batch: int = 4  # batch of the throughput measurement
    onnx: bool = True  # measure onnxruntime latency when onnxruntime is installed
    memory: bool = True  # measure CPU peak memory (in a fresh process)
    exporter: str = "auto"  # ONNX exporter (components/export.py)
    data: str | None = None  # dataset folder: also measure mIoU on `split`
    split: str = "val"
    eval_batch: int = 8


# --- the measurements -----------------------------------------------------------------------


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flop_count(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of `model(x)` as torch's FlopCounterMode counts them (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return int(counter.get_total_flops())


def timings(fn, runs: int, warmup: int, sync=None) -> list[float]:
    """Seconds of each of `runs` calls of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        out.append(time.perf_counter() - start)
    return out


def summary_ms(seconds: list[float]) -> dict:
    """{"median_ms", "p90_ms", "runs"} of a list of seconds (p90 by linear interpolation)."""
    values = np.asarray(seconds) * 1000
    return {
        "median_ms": float(np.median(values)),
        "p90_ms": float(np.percentile(values, 90)),
        "runs": len(seconds),
    }


def eager_speed(model: nn.Module, device: torch.device, s: Settings) -> dict:
    """Batch-1 latency and batch-`s.batch` throughput of the eager model on `device`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    one = torch.randn(1, 3, s.height, s.width, device=device)
    many = torch.randn(s.batch, 3, s.height, s.width, device=device)
    with torch.inference_mode():
        latency = summary_ms(timings(lambda: model(one), s.runs, s.warmup, sync))
        batched = summary_ms(timings(lambda: model(many), max(1, s.runs // 2), 1, sync))
    return {
        "latency": latency,
        "throughput": {
            "batch": s.batch,
            "images_per_s": s.batch / (batched["median_ms"] / 1000),
            "runs": batched["runs"],
        },
    }


def gpu_memory(model: nn.Module, s: Settings) -> dict:
    """Peak CUDA memory of a batch-1 forward pass (weights included), MB."""
    x = torch.randn(1, 3, s.height, s.width, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mb": peak / 2**20, "forward_mb": (peak - before) / 2**20}


def onnx_speed(model: nn.Module, s: Settings) -> dict:
    """Batch-1 latency of the model exported to ONNX, run by onnxruntime on CPU; or
    {"skipped": reason}."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {"skipped": "onnxruntime not installed (pip install 'segdistill[export]')"}
    from components.export import (
        ExportError,
        export_onnx,
        normalized,
        onnx_session,
        sample_images,
    )

    x = normalized(sample_images(s.height, s.width)[:1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            _, exporter = export_onnx(model, x, path, exporter=s.exporter)
        except ExportError as e:
            return {"skipped": str(e)}
        threads = torch.get_num_threads()
        session = onnx_session(path, threads=threads)
        feed = {session.get_inputs()[0].name: x.numpy()}
        latency = summary_ms(timings(lambda: session.run(None, feed), s.runs, s.warmup))
    return {"latency": latency, "exporter": exporter, "threads": threads}


def _status_mb(key: str) -> float | None:
    """A field of /proc/self/status in MB (Linux: VmRSS, VmHWM), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _maxrss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB Linux


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mb("VmHWM") is not None


def rss_child(paths: list[str], height: int, width: int, threads: int) -> list[dict]:
    """Run in a fresh process (`cpu_memory`), for each checkpoint in turn: load the model, one
    warm-up batch-1 pass (it loads code and builds kernels), reset the peak RSS, a second pass;
    the memory figures of that pass in MB. Without the reset (not Linux) only the first model is
    measured, by the first pass's ru_maxrss growth (code loaded on first use included)."""
    from components.models.checkpointed import load_checkpoint_model

    torch.set_num_threads(threads)
    out = []
    for path in paths:
        model, _ = load_checkpoint_model(path, "cpu")
        x = torch.randn(1, 3, height, width)
        before = _maxrss_mb()
        with torch.inference_mode():
            model(x)
        gc.collect()
        if _reset_peak():
            base = _status_mb("VmRSS")
            with torch.inference_mode():
                model(x)
            peak = _status_mb("VmHWM")
            method = "VmHWM of the second pass - VmRSS before it (peak reset via clear_refs)"
        elif not out:
            base, peak = before, _maxrss_mb()
            method = "ru_maxrss growth over the first pass (code loaded on first use included)"
        else:
            out.append({"skipped": "no peak reset on this system: one model per process"})
            continue
        out.append(
            {
                "rss_before_mb": base,
                "peak_rss_mb": peak,
                "forward_mb": max(0.0, peak - base),
                "method": method,
            }
        )
        del model, x
        gc.collect()
    return out


def cpu_memory(paths: list[str], s: Settings) -> list[dict]:
    """`rss_child` in a fresh interpreter, with glibc's mmap threshold fixed at 64 KiB so that
    freed activations go back to the OS instead of a malloc cache the next pass reuses unseen.
    One dict per path; {"skipped": reason} where it fails."""
    code = (
        "import json, sys; from components.model_report import rss_child; "
        "print(json.dumps(rss_child(json.loads(sys.argv[1]), *map(int, sys.argv[2:]))))"
    )
    tunables = "glibc.malloc.mmap_threshold=65536"
    if os.environ.get("GLIBC_TUNABLES"):
        tunables = os.environ["GLIBC_TUNABLES"] + ":" + tunables
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        GLIBC_TUNABLES=tunables,
        MALLOC_MMAP_THRESHOLD_="65536",  # glibc < 2.26
    )
    argv = [sys.executable, "-c", code, json.dumps(paths), str(s.height), str(s.width)]
    argv.append(str(torch.get_num_threads()))
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-2:])
        return [{"skipped": f"the measuring process failed ({tail})"} for _ in paths]
    return json.loads(done.stdout.strip().splitlines()[-1])


def measured_miou(model: nn.Module, meta: dict, s: Settings) -> dict:
    """mIoU of `model` on `s.data`'s `s.split`, decoded here shard by shard (no Ray)."""
    from components.data.decode import decode_eval_batch
    from components.data.shards import DatasetError, DatasetInfo, iter_shard_tables
    from components.metrics import miou
    from components.training.evaluation import evaluate_counts

    info = DatasetInfo.load(s.data)
    if s.split not in info.splits:
        raise DatasetError(f"{s.data}: no split {s.split!r} (has {', '.join(info.splits)})")
    if info.num_classes != meta["num_classes"]:
        raise DatasetError(
            f"{meta['folder']}: model predicts {meta['num_classes']} classes but "
            f"{s.data}/dataset.json has {info.num_classes}"
        )
    split = info.splits[s.split]

    def batches():
        for _, table in iter_shard_tables(s.data, s.split, ["id", "image", "mask"]):
            columns = {k: np.array(v, dtype=object) for k, v in table.to_pydict().items()}
            for i in range(0, table.num_rows, s.eval_batch):
                chunk = {k: v[i : i + s.eval_batch] for k, v in columns.items()}
                out = decode_eval_batch(
                    chunk,
                    pad_height=split.max_height,
                    pad_width=split.max_width,
                    ignore_index=info.ignore_index,
                    num_classes=info.num_classes,
                )
                yield {
                    "image": torch.from_numpy(out["image"]).float(),
                    "mask": torch.from_numpy(out["mask"]).long(),
                    "valid": torch.from_numpy(out["valid"]).bool(),
                }

    counts = evaluate_counts(model, batches(), info.num_classes, info.ignore_index)
    mean, _ = miou(counts.confusion)
    return {"miou": mean, "data": s.data, "split": s.split, "images": split.rows}


def measure_models(paths: dict[str, str], s: Settings, log=print) -> dict[str, dict]:
    """{role: every number of the report} for {role: checkpoint path}; CPU memory of all the
    models in one fresh process."""
    rows = {}
    for role, path in paths.items():
        log(f"measuring the {role} ({path}) ...")
        rows[role] = measure_model(path, s)
    if s.memory:
        log("measuring peak memory in a fresh process ...")
        found = cpu_memory([rows[role]["checkpoint"] for role in rows], s)
        for role, memory in zip(rows, found):
            rows[role]["cpu_memory"] = memory
    else:
        for row in rows.values():
            row["cpu_memory"] = {"skipped": "not asked for"}
    return rows


def measure_model(path: str, s: Settings) -> dict:
    """Every number of the report for one checkpoint, CPU memory aside (`measure_models`)."""
    from components.export import sha256_file
    from components.models.checkpointed import load_checkpoint_model
    from components.training.checkpoint import MODEL_FILE

    model, meta = load_checkpoint_model(path, "cpu")
    x = torch.randn(1, 3, s.height, s.width)
    row = {
        "checkpoint": meta["folder"],
        "sha256": sha256_file(Path(meta["folder"]) / MODEL_FILE),
        "model": getattr(model, "name", type(model).__name__),
        "num_classes": meta["num_classes"],
        "parameters": parameter_count(model),
        "flops": flop_count(model, x),
    }
    row["macs"] = row["flops"] // 2
    row["cpu"] = eager_speed(model, torch.device("cpu"), s)
    row["cpu"]["threads"] = torch.get_num_threads()
    row["onnxruntime"] = onnx_speed(model, s) if s.onnx else {"skipped": "not asked for"}
    if torch.cuda.is_available():
        gpu = model.to("cuda")
        row["gpu"] = eager_speed(gpu, torch.device("cuda"), s)
        row["gpu"]["name"] = torch.cuda.get_device_name()
        row["gpu_memory"] = gpu_memory(gpu, s)
        model = gpu
    metrics = meta.get("metrics") or {}
    row["miou_meta"] = metrics.get("miou")
    if s.data:
        row["miou_measured"] = measured_miou(model, meta, s)
    return row


# --- the report -----------------------------------------------------------------------------


def environment() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    return env


# (label, the keys of the value in a row, scale for display, decimals)
ROWS = [
    ("parameters (M)", ("parameters",), 1e-6, 2),
    ("GFLOPs (2 per multiply-add)", ("flops",), 1e-9, 2),
    ("GMACs", ("macs",), 1e-9, 2),
    ("CPU latency, median (ms, batch 1)", ("cpu", "latency", "median_ms"), 1, 1),
    ("CPU latency, p90 (ms, batch 1)", ("cpu", "latency", "p90_ms"), 1, 1),
    ("CPU throughput (images/s, batch B)", ("cpu", "throughput", "images_per_s"), 1, 2),
    ("ONNX Runtime CPU latency, median (ms)", ("onnxruntime", "latency", "median_ms"), 1, 1),
    ("ONNX Runtime CPU latency, p90 (ms)", ("onnxruntime", "latency", "p90_ms"), 1, 1),
    ("CPU peak memory, forward (MB, RSS growth)", ("cpu_memory", "forward_mb"), 1, 1),
    ("GPU latency, median (ms, batch 1)", ("gpu", "latency", "median_ms"), 1, 2),
    ("GPU latency, p90 (ms, batch 1)", ("gpu", "latency", "p90_ms"), 1, 2),
    ("GPU throughput (images/s, batch B)", ("gpu", "throughput", "images_per_s"), 1, 1),
    ("GPU peak memory (MB, max_memory_allocated)", ("gpu_memory", "peak_mb"), 1, 1),
    ("mIoU % (meta.json)", ("miou_meta",), 100, 2),
    ("mIoU % (measured)", ("miou_measured", "miou"), 100, 2),
]


def _get(row: dict, path: tuple[str, ...]):
    value = row
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def build_report(rows: dict[str, dict], s: Settings) -> dict:
    """{"settings", "environment", "models": {role: row}, "ratio": {label: student / teacher}}."""
    report = {"settings": asdict(s), "environment": environment(), "models": rows}
    if "teacher" in rows and "student" in rows:
        ratio = {}
        for label, path, _, _ in ROWS:
            t, st = _get(rows["teacher"], path), _get(rows["student"], path)
            if t is not None and st is not None and t != 0:
                ratio[label] = st / t
        report["ratio"] = ratio
    return report


def _cell(value, scale: float, decimals: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value * scale:,.{decimals}f}"


def to_markdown(report: dict) -> str:
    s, env, rows = report["settings"], report["environment"], report["models"]
    roles = [r for r in ROLES if r in rows]
    ratio = report.get("ratio")
    header = ["", *roles] + (["student / teacher"] if ratio is not None else [])
    lines = [
        "# Model report",
        "",
        (
            f"Input {s['height']}x{s['width']}; latency over {s['runs']} runs after "
            f"{s['warmup']} warm-up runs at batch 1, throughput at batch B = {s['batch']}."
        ),
        (
            f"Machine: {env['cpu']} ({env['cpu_count']} logical CPUs, torch using "
            f"{env['torch_threads']} threads), GPU: {env['gpu'] or 'none'}; torch "
            f"{env['torch']}, onnxruntime {env['onnxruntime'] or 'not installed'}."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        "| model | "
        + " | ".join(rows[r]["model"] for r in roles)
        + (" | |" if ratio is not None else " |"),
    ]
    for label, path, scale, decimals in ROWS:
        values = [_get(rows[r], path) for r in roles]
        if all(v is None for v in values):
            continue
        cells = [_cell(v, scale, decimals) for v in values]
        if ratio is not None:
            cells.append(f"{ratio[label]:.3f}" if label in ratio else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Checkpoints:"]
    lines += [
        f"- {r}: {rows[r]['checkpoint']} (model.pt sha256 {rows[r]['sha256'][:16]}…)" for r in roles
    ]
    notes = []
    for r in roles:
        row = rows[r]
        for key in ("onnxruntime", "cpu_memory"):
            if "skipped" in row.get(key, {}):
                notes.append(f"- {r} {key}: not measured ({row[key]['skipped']})")
        if "method" in row.get("cpu_memory", {}):
            notes.append(f"- {r} CPU memory: {row['cpu_memory']['method']}")
        if "miou_measured" in row:
            m = row["miou_measured"]
            notes.append(f"- {r} measured mIoU: {m['data']} [{m['split']}, {m['images']} images]")
        if "exporter" in row.get("onnxruntime", {}):
            o = row["onnxruntime"]
            notes.append(
                f"- {r} ONNX: {o['exporter']} exporter, {o['threads']} intra-op threads, "
                "logits upsampled to the input size inside the graph"
            )
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", FOOTNOTE + (RATIO_NOTE if ratio is not None else "")]
    return "\n".join(lines) + "\n"


FOOTNOTE = (
    "FLOPs: torch.utils.flop_counter.FlopCounterMode, 2 FLOPs per multiply-add, convolutions,"
    " matmuls and attention only; GMACs = GFLOPs / 2 (what many segmentation papers call"
    ' "FLOPs"). Latency and throughput: the eager model in eval mode under'
    " torch.inference_mode, logits at the output stride. CPU memory: peak RSS growth of a"
    " batch-1 pass after a warm-up pass, in a fresh process."
)
RATIO_NOTE = (
    " Ratio: student / teacher (below 1: the student is smaller, faster, or less accurate)."
)


def write_report(report: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "model_report.md", out / "model_report.json"
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return md, js


__all__ = [
    "ROLES",
    "Settings",
    "build_report",
    "cpu_memory",
    "eager_speed",
    "flop_count",
    "measure_model",
    "measure_models",
    "measured_miou",
    "onnx_speed",
    "parameter_count",
    "summary_ms",
    "timings",
    "to_markdown",
    "write_report",
]
