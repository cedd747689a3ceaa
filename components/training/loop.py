"""The per-worker training loop run by every Ray Train worker (any method, any regime).

Each epoch: train on this worker's even split of `train` (semi-supervised runs: and of
`unlabeled`, one batch of each per step, keys of the second prefixed `u_`) for exactly
`steps_per_epoch` steps (a method's optional `after_step()` runs after each optimizer step),
evaluate on its part of `val` (confusion matrices summed across workers), then every worker calls
`ray.train.report` once; rank 0 attaches a checkpoint with the full training state. A restarted
worker group, or the same command run again, resumes from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from components.config import WEAKLY_METHODS, Config, from_dict
from components.distillation.build import build_method
from components.distillation.protocol import unwrap
from components.metrics import miou, pixel_accuracy
from components.models.build import build_model
from components.training.checkpoint import (
    load_full_state,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from components.training.evaluation import predict_confusion
from components.training.schedule import build_optimizer, poly_scheduler

TRAIN_DTYPES = {"image": torch.float32, "mask": torch.int64, "valid": torch.bool}
WEAK_DTYPES = {
    **TRAIN_DTYPES,
    "labels": torch.float32,
    "area": torch.bool,
    "background_only": torch.bool,
}
UNLABELED_DTYPES = {
    "image": torch.float32,
    "image_strong": torch.float32,
    "mask": torch.int64,
    "area": torch.bool,
    "valid": torch.bool,
}


class BadDataError(RuntimeError):
    """Too many rows failed to decode or validate."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum across workers, in place. NCCL only reduces CUDA tensors, so a CPU tensor (step
    counts, loss sums) makes the round trip through the worker's GPU."""
    if _distributed():
        if dist.get_backend() == "nccl" and t.device.type != "cuda":
            on_gpu = t.to(ray.train.torch.get_device())
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _print0(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def _build_teacher(config: dict, num_classes: int, device: torch.device) -> nn.Module | None:
    if config.get("teacher_state") is None:
        return None
    model_cfg = from_dict({"model": config["teacher_model"]}).model
    teacher = build_model(model_cfg, num_classes)
    state = config["teacher_state"]
    if isinstance(state, ray.ObjectRef):
        state = ray.get(state)
    teacher.load_state_dict(state)
    return teacher.to(device).eval()


def _next_batch(streams: dict) -> dict | None:
    """One batch from every stream, keys prefixed by the stream's prefix; None when one ends."""
    batch = {}
    for prefix, stream in streams.items():
        try:
            part = next(stream)
        except StopIteration:
            return None
        batch.update({prefix + k: v for k, v in part.items()})
    return batch


def _mean_terms(sums: dict[str, float], reported: dict[str, int], world: int) -> dict:
    """Each term's mean over the steps (of all workers) that reported it. A diagnostic that only
    some steps give (e.g. `pseudo_acc`) is averaged over those; the names are gathered first, so
    workers whose sets differ still all-reduce the same vector."""
    names = sorted(sums)
    if _distributed():
        gathered: list = [None] * world
        dist.all_gather_object(gathered, names)
        names = sorted(set().union(*gathered))
    if not names:
        return {}
    table = torch.tensor(
        [[sums.get(k, 0.0), float(reported.get(k, 0))] for k in names], dtype=torch.float64
    )
    table = _all_reduce_sum(table)
    return {k: float(total) / max(1.0, float(n)) for k, (total, n) in zip(names, table.tolist())}


def _progress_metrics(progress: dict) -> dict:
    keys = ("epoch", "iteration", "best_miou", "best_epoch", "teacher_miou")
    return {k: progress[k] for k in keys if k in progress}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config` is built by `components.training.trainer`:
    cfg (dict), num_classes, ignore_index, class_names, steps_per_epoch, and optionally
    teacher_state (an ObjectRef to a state_dict) with teacher_model (a ModelConfig dict)."""
    cfg: Config = from_dict(config["cfg"])
    num_classes, ignore_index = config["num_classes"], config["ignore_index"]
    steps_per_epoch = config["steps_per_epoch"]
    t = cfg.trainer
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(t.seed * 1000 + rank)
    if not on_gpu:
        local_workers = max(1, ctx.get_local_world_size())
        torch.set_num_threads(t.torch_threads or max(1, (os.cpu_count() or 1) // local_workers))

    student = build_model(cfg.model, num_classes).to(device)
    teacher = _build_teacher(config, num_classes, device)
    if on_gpu and t.channels_last:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if (on_gpu and t.amp) else None
    method = build_method(
        cfg,
        student,
        teacher,
        num_classes=num_classes,
        autocast_dtype=amp_dtype,
        ignore_index=ignore_index,
    ).to(device)

    o = cfg.optim
    optimizer = build_optimizer(method.trainable, o)
    total_iters = steps_per_epoch * t.epochs
    scheduler = poly_scheduler(optimizer, total_iters, o.poly_power, o.warmup_iters)
    progress = {"epoch": 0, "iteration": 0, "best_miou": -1.0, "best_epoch": -1}

    state, source = None, ""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state, _ = load_full_state(folder)
    # A checkpoint folder can be complete in storage and still unknown to Ray, when the driver
    # was killed between its upload and Ray's bookkeeping; the driver found it (`fit`).
    found = config.get("resume_folder")
    if found is not None and (
        state is None or read_meta(found)["progress"]["iteration"] > state["progress"]["iteration"]
    ):
        state, _ = load_full_state(found)
        source = f" ({found}, which Ray had not registered)"
    if state is not None:
        method.trainable.load_state_dict(state["trainable"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The horizon follows the current config (a resumed run may have more epochs).
        factor = scheduler.lr_lambdas[0]
        factor.total_iters, factor.power, factor.warmup_iters = (
            total_iters,
            o.poly_power,
            o.warmup_iters,
        )
        method.load_extra_state(state.get("method", {}))
        progress.update(state["progress"])
        rngs = state.get("rng", [])
        if rank < len(rngs):
            set_rng_state(rngs[rank])
        _print0(
            rank,
            f"resumed from checkpoint: epoch {progress['epoch']}, "
            f"iteration {progress['iteration']}{source}",
        )

    if world > 1:
        method.trainable = nn.parallel.DistributedDataParallel(
            method.trainable, device_ids=[device.index] if on_gpu else None
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    # Semi-supervised runs stream a second dataset into the same steps.
    unlabeled_shard = ray.train.get_dataset_shard("unlabeled") if config.get("unlabeled") else None
    batch_size = cfg.data.batch_size
    after_step = getattr(method, "after_step", None)
    train_dtypes = WEAK_DTYPES if cfg.method.name in WEAKLY_METHODS else TRAIN_DTYPES
    iter_args = {
        "batch_size": batch_size,
        "drop_last": True,
        "prefetch_batches": cfg.data.prefetch_batches,
        "device": device,
    }

    def evaluate(model: nn.Module) -> torch.Tensor:
        confusion = predict_confusion(
            model,
            val_shard.iter_torch_batches(
                batch_size=cfg.data.val_batch_size,
                dtypes=TRAIN_DTYPES,
                device=device,
                prefetch_batches=cfg.data.prefetch_batches,
            ),
            num_classes,
            ignore_index,
            amp_dtype,
        )
        return _all_reduce_sum(confusion.to(device)).cpu()

    if teacher is not None and "teacher_miou" not in progress:
        # Once per run, on the workers (the driver may be a CPU-only head node).
        progress["teacher_miou"] = miou(evaluate(teacher))[0]
        _print0(rank, f"teacher val mIoU {100 * progress['teacher_miou']:.2f}")

    for epoch in range(progress["epoch"], t.epochs):
        method.trainable.train()
        sums: dict[str, float] = defaultdict(float)
        reported: dict[str, int] = defaultdict(int)  # steps that gave each term
        steps, wait_s, bad_rows, seen_rows = 0, 0.0, 0, 0
        streams = {"": iter(train_shard.iter_torch_batches(dtypes=train_dtypes, **iter_args))}
        if unlabeled_shard is not None:
            streams["u_"] = iter(
                unlabeled_shard.iter_torch_batches(
                    dtypes=UNLABELED_DTYPES,
                    **{**iter_args, "batch_size": cfg.data.unlabeled_batch_size or batch_size},
                )
            )
        t_epoch = time.perf_counter()
        while steps < steps_per_epoch:
            t_wait = time.perf_counter()
            batch = _next_batch(streams)
            if batch is None:
                break  # the step-count check below reports it
            wait_s += time.perf_counter() - t_wait
            for prefix in streams:
                bad_rows += int((~batch[prefix + "valid"]).sum())
                seen_rows += batch[prefix + "valid"].numel()
            if on_gpu and t.channels_last:
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            if amp_dtype is not None:
                with torch.autocast("cuda", dtype=amp_dtype):
                    terms = method.training_step(batch)
            else:
                terms = method.training_step(batch)
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()  # e.g. the EMA teacher's update
            steps += 1
            progress["iteration"] += 1
            for name, value in terms.items():
                sums[name] += float(value.detach())
                reported[name] += 1
            if progress["iteration"] % t.log_every == 0:
                shown = " ".join(f"{k} {float(v.detach()):.4f}" for k, v in terms.items())
                _print0(
                    rank,
                    f"epoch {epoch + 1}/{t.epochs} it {progress['iteration']}/{total_iters} "
                    f"{shown} lr {scheduler.get_last_lr()[0]:.2e}",
                )
        for stream in streams.values():
            for _ in stream:  # an even split has nothing left; drain rather than stall the stream
                pass
        train_s = time.perf_counter() - t_epoch

        counts = _all_reduce_sum(
            torch.tensor([steps, bad_rows, seen_rows, wait_s, train_s], dtype=torch.float64)
        )
        if counts[0] != steps * world:
            raise RuntimeError(
                f"workers ran different step counts this epoch (this one {steps}); "
                "the train split was not divided evenly"
            )
        if counts[2] and counts[1] / counts[2] > cfg.data.max_bad_fraction:
            raise BadDataError(
                f"{int(counts[1])} of {int(counts[2])} training rows were bad (undecodable, wrong "
                f"mask size or label ids >= {num_classes}); more than data.max_bad_fraction="
                f"{cfg.data.max_bad_fraction}. The skipped ids are in the worker logs."
            )

        t_eval = time.perf_counter()
        confusion = evaluate(method.eval_model())
        eval_s = time.perf_counter() - t_eval
        mean_iou, _ = miou(confusion)
        terms_mean = _mean_terms(sums, reported, world)

        progress["epoch"] = epoch + 1
        if mean_iou > progress["best_miou"]:
            progress["best_miou"], progress["best_epoch"] = mean_iou, epoch + 1
        images = float(counts[0]) * batch_size
        metrics = {
            **_progress_metrics(progress),
            "miou": mean_iou,
            "pixel_acc": pixel_accuracy(confusion),
            "lr": optimizer.param_groups[0]["lr"],
            **terms_mean,
            "images_per_s": images / max(1e-9, float(counts[4]) / world),
            "data_wait_share": float(counts[3]) / max(1e-9, float(counts[4])),
            "train_s": float(counts[4]) / world,
            "eval_s": eval_s,
            "bad_rows": int(counts[1]),
            "world_size": world,
        }
        _print0(
            rank,
            f"epoch {epoch + 1}/{t.epochs}: val mIoU {100 * mean_iou:.2f}  "
            + " ".join(f"{k} {v:.4f}" for k, v in terms_mean.items())
            + f"  {metrics['images_per_s']:.1f} img/s, data wait {100 * metrics['data_wait_share']:.0f}%",
        )

        rngs = [None] * world
        if _distributed():
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                full_state = {
                    "trainable": unwrap(method.trainable).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "method": method.extra_state(),
                    "progress": dict(progress),
                    "rng": rngs,
                }
                meta = {
                    "config": config["cfg"],
                    "model": config["cfg"]["model"],
                    "num_classes": num_classes,
                    "class_names": config.get("class_names"),
                    "ignore_index": ignore_index,
                    "progress": dict(progress),
                    "metrics": metrics,
                }
                save_checkpoint(tmp, method.eval_model().state_dict(), full_state, meta)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
