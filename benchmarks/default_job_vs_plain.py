"""The embedded default job (`python pipelines/distill.py`) against the same job in plain PyTorch.

    python benchmarks/default_job_vs_plain.py     # no arguments; about 8 minutes on 2 CPU cores

Both arms are whole commands, timed from process start to exit, with their peak memory (the
sum of the resident set sizes of the command's process tree, Ray's processes included, sampled
every 0.2 s; shared pages count once per process, so it over-counts both arms alike):

- `segdistill`: `python pipelines/distill.py` with its embedded defaults (the synthetic dataset
  made on the first run, a teacher of 10 epochs = 640 steps, the SSTKD student of 7 epochs =
  448 steps, evaluation of the 64 val images after every epoch), storage and data in a fresh
  folder.
- `plain`: this file with `--plain DIR`: the same steps in one process with torch DataLoaders
  (one loader worker, the same decoders), the same models, methods, optimizers, schedules and
  evaluation code (components/), the teacher saved to a file and reused on the second run.

The default job's backbones come from the synthetic pretraining stage (`model.pretrained:
synthetic`, issue 21), which runs once per machine and is cached (`outputs/pretrain-*`). It is
made (or found) before the timed runs and is not part of them: every segdistill folder gets a
copy of the cached stage, and the plain arm loads the same two files. (Its own cost, once:
about 2 min for the student's backbone and 4-5 for the teacher's on 2 cores; docs/benchmarks.md.)

First run: nothing else exists (dataset, teacher and student are made). Second run: the dataset and
the teacher exist; the student is trained again (its run folder deleted first; the plain arm
overwrites its file). (A new `trainer.seed` would not do: the cached teacher's run name includes
the seed, so segdistill would train a new teacher.) The arms alternate
(segdistill, plain; plain, segdistill), REPEATS pairs of first runs then of second runs; the
medians are compared. The last line is the second run's ratio (segdistill / plain), the one a
user repeating experiments pays: `... ratio X.XX`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

REPEATS = 2


# ----------------------------------------------------------------------------------------------
# The plain arm (run as a subprocess of this file)


def _train(cfg, info, teacher, epochs: int, lr: float, log) -> tuple:
    """Train `cfg.model` with `cfg.method` for `epochs`, evaluating val after each; returns
    (model, last val mIoU)."""
    from plain_loop import collate, plain_method, row_loader, split_rows, train_decoder

    from components.data.decode import decode_eval_batch
    from components.data.device import model_batch
    from components.data.local_val import eval_pad
    from components.metrics import miou
    from components.training.core import train_one_epoch
    from components.training.evaluation import evaluate_counts

    d, k = cfg.data, info.num_classes
    cfg.optim.lr = lr
    method, optimizer, schedule, steps = plain_method(cfg, info, teacher, epochs, cfg.trainer.seed)
    train_decode = train_decoder(cfg, info)
    pad_height, pad_width = eval_pad(info, d.val_split)
    val_decode = partial(
        decode_eval_batch, pad_height=pad_height, pad_width=pad_width,
        num_classes=k, ignore_index=info.ignore_index, normalized=False,
    )  # fmt: skip
    train = row_loader(d.root, d.train_split, d.batch_size, train_decode, workers=1)
    val_rows = split_rows(d.root, d.val_split)
    progress = {"iteration": 0}
    value = float("nan")
    for epoch in range(epochs):
        train_one_epoch(method, map(model_batch, iter(train)), optimizer, schedule, progress, steps)
        batches = (
            model_batch(collate(val_rows[i : i + d.val_batch_size], val_decode))
            for i in range(0, len(val_rows), d.val_batch_size)
        )
        counts = evaluate_counts(method.eval_model(), batches, k, info.ignore_index)
        value = miou(counts.confusion)[0]
        log(f"epoch {epoch + 1}/{epochs}: val mIoU {100 * value:.2f}")
    return method.eval_model(), value


def plain(folder: str, seed: int, pretrained: list[str]) -> int:
    """The default job in plain PyTorch: dataset, teacher (or its saved weights), student;
    `pretrained`: the `model.pretrained` / `teacher.model.pretrained` overrides (files)."""
    import torch

    from components.config import merge_config, validate
    from components.data.synthetic import ensure_synthetic
    from components.models.build import build_model
    from components.training.trainer import teacher_training_config
    from pipelines.distill import default_config

    out = Path(folder)
    overrides = [f"data.root={out / 'data'}", f"trainer.seed={seed}", *pretrained]
    cfg = merge_config(None, overrides, default_config())
    validate(cfg)
    info = ensure_synthetic(cfg.data.root, cfg.data.synthetic)
    teacher_file = out / "teacher.pt"
    if teacher_file.exists():
        teacher = build_model(cfg.teacher.model, info.num_classes)
        teacher.load_state_dict(torch.load(teacher_file, weights_only=True))
    else:
        tcfg = teacher_training_config(cfg)
        teacher, _ = _train(tcfg, info, None, cfg.teacher.epochs, cfg.teacher.lr, print)
        torch.save(teacher.state_dict(), teacher_file)
    teacher.eval()
    student, value = _train(cfg, info, teacher, cfg.trainer.epochs, cfg.optim.lr, print)
    torch.save(student.state_dict(), out / f"student-{seed}.pt")
    print(f"student val mIoU {100 * value:.2f}")
    return 0


# ----------------------------------------------------------------------------------------------
# The driver: both arms as commands, timed, memory sampled


def _tree_rss(pid: int) -> int:
    """Bytes: the summed VmRSS of `pid` and its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
        except OSError:
            continue
        child = int(entry.name)
        parents[child] = int(stat.rsplit(")", 1)[1].split()[1])
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[child] = int(line.split()[1]) * 1024
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, pp in parents.items():
            if pp == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(rss.get(p, 0) for p in tree)


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak tree RSS GiB); fails loudly if the command fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode != 0:
        sys.stdout.write(output[-3000:])
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode})")
    return wall, peak[0] / 2**30


def _pretrained_stage() -> dict[str, str]:
    """{"model": file, "teacher.model": file}: the default job's synthetic-pretrained backbones
    in the repository's outputs/ (made there when missing, as the default job would)."""
    from pretrained import pretrained_overrides

    from components.config import merge_config
    from pipelines.distill import default_config

    cfg = merge_config(None, [f"trainer.storage_path={ROOT / 'outputs'}"], default_config())
    pairs = (o.split("=", 1) for o in pretrained_overrides(cfg, ["model", "teacher.model"]))
    return {k.removesuffix(".pretrained"): v for k, v in pairs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--pretrained", nargs="*", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain:
        return plain(args.plain, args.seed, args.pretrained)

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    py = sys.executable
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    stage = time.perf_counter()
    pretrained = _pretrained_stage()
    stage = time.perf_counter() - stage
    print(f"pretraining stage (made once or found, not timed): {stage:.0f} s", flush=True)
    print(f"{os.cpu_count()} CPUs; {REPEATS} pairs of first runs, then of second runs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folders = {(arm, r): Path(tmp) / f"{arm}-{r}" for arm in ("segdistill", "plain")
                   for r in range(REPEATS)}  # fmt: skip
        for run in ("first", "second"):
            for r in range(REPEATS):
                order = ("segdistill", "plain") if r % 2 == 0 else ("plain", "segdistill")
                for arm in order:
                    folder = folders[(arm, r)]
                    if not folder.exists():  # a copy of the cached stage: found, not made
                        for backbone in pretrained.values():
                            src = Path(backbone).parent
                            shutil.copytree(src, folder / "runs" / src.name)
                    folder.mkdir(exist_ok=True)
                    if run == "second":  # the student again, on the cached dataset and teacher
                        for done in (folder / "runs").glob("distill-*"):
                            shutil.rmtree(done)
                    seed = 0
                    if arm == "segdistill":
                        command = [py, "pipelines/distill.py", f"data.root={folder / 'data'}",
                                   "data.generate_synthetic=true",
                                   f"trainer.storage_path={folder / 'runs'}",
                                   f"trainer.seed={seed}", "trainer.progress=lines"]  # fmt: skip
                    else:
                        files = [f"{k}.pretrained={v}" for k, v in pretrained.items()]
                        command = [py, __file__, "--plain", str(folder), "--seed", str(seed),
                                   "--pretrained", *files]  # fmt: skip
                    wall, gib = timed(command, env)
                    results.setdefault((arm, run), []).append((wall, gib))
                    print(f"{run} run {r} {arm}: {wall:.1f} s, peak {gib:.2f} GiB", flush=True)

    print("\n| run | segdistill s | plain s | ratio | segdistill GiB | plain GiB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    ratios = {}
    for run in ("first", "second"):
        a = statistics.median(w for w, _ in results[("segdistill", run)])
        b = statistics.median(w for w, _ in results[("plain", run)])
        ma = statistics.median(m for _, m in results[("segdistill", run)])
        mb = statistics.median(m for _, m in results[("plain", run)])
        ratios[run] = a / b
        print(f"| {run} | {a:.1f} | {b:.1f} | {a / b:.2f} | {ma:.2f} | {mb:.2f} | {ma / mb:.2f} |")
    print(f"default job, first run (segdistill / plain): {ratios['first']:.2f}")
    print(f"default job, second run (segdistill / plain): ratio {ratios['second']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
