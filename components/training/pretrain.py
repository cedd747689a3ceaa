"""Backbone pretraining by image classification on a synthetic image set: the embedded
benchmark's stand-in for the ImageNet weights every published result starts from.

    cfg = resolve_pretrained(cfg)      # every `pretrained: synthetic` -> its backbone file
    path = pretrained_backbone(cfg.model, cfg)

The image set (`pretrain.root`, 4096 + 256 images of 48 px by default) comes from the same
texture generator as the segmentation sets (components/data/synthetic.py) with its own seed and
more classes (8 textures; the segmentation sets' 4 are among them, as ImageNet holds the VOC and
Cityscapes classes), so no segmentation image is seen. The target is the multi-label
presence vector of the foreground textures (`image_labels`), learned with binary cross-entropy
on the backbone's globally average-pooled last map and a linear layer; the classifier is dropped
after training. Training runs on Ray Train like every other run (one worker per
`trainer.num_workers`, Ray Data streaming the shards, a checkpoint each epoch that a rerun
resumes from), under `trainer.storage_path`/pretrain-<backbone>-<hash>/, where the backbone's
state_dict is written as `backbone.pt` (our key names, which `model.pretrained` loads strictly).
The hash covers the backbone's architecture (backbone, width, variant, output_stride, drop_path)
and the `pretrain` section, so a changed setting pretrains again and an unchanged one reuses.
On one worker the stage is reproducible: the data order and crops are seeded per epoch
(components/data/ingest.py), the classifier's init and torch's RNG by `pretrain.seed`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.config import Config, fingerprint, from_dict, to_dict
from components.data.decode import decode_split
from components.data.device import model_batch
from components.data.ingest import SegDataConfig, train_dataset
from components.data.local_val import local_root
from components.data.shards import DatasetInfo
from components.data.synthetic import _differences, ensure_synthetic
from components.models.build import MIT_STRIDES, build_backbone
from components.models.mit import build_mit
from components.schema import (
    MITS,
    SYNTHETIC_PRETRAINED,
    ConfigError,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    SyntheticConfig,
)
from components.training import local_mode
from components.training.checkpoint import atomic_torch_save
from components.training.distributed import set_cpu_threads
from components.training.runlock import run_lock
from components.training.runlog import quiet_train_console
from components.training.storage import absolute_storage, is_uri

BACKBONE_FILE = "backbone.pt"
COLUMNS = {"image": "uint8", "labels": "float32", "valid": "bool"}  # of the weak rows
ARCHITECTURE = ("backbone", "width", "variant", "output_stride", "drop_path")


def build_encoder(model: ModelConfig) -> nn.Module:
    """The randomly initialised backbone `build_model` would make for `model`."""
    if model.backbone in MITS:
        return build_mit(
            model.backbone, model.width, MIT_STRIDES[model.output_stride], model.drop_path
        )
    return build_backbone(model.backbone, model.width, model.output_stride, model.variant)


class Classifier(nn.Module):
    """Backbone, global average pooling of its last map, a linear layer (one logit per
    foreground class)."""

    def __init__(self, backbone: nn.Module, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        channels = backbone.out_channels
        last = channels[-1] if isinstance(channels, tuple) else channels["layer4"]
        self.fc = nn.Linear(last, num_labels)

    def forward(self, images: Tensor) -> Tensor:
        feats = self.backbone(images)
        last = feats[0][-1] if isinstance(feats, tuple) else feats["layer4"]  # MiT: (maps, attns)
        return self.fc(last.mean(dim=(2, 3)))


def label_vectors(masks: np.ndarray, valid: np.ndarray, num_classes: int, ignore: int) -> Tensor:
    """(B, K-1) multi-hot presence of the foreground classes in each mask (ignore left out)."""
    out = np.zeros((len(masks), num_classes - 1), np.float32)
    for j, mask in enumerate(masks):
        ids = np.unique(mask[(mask != ignore) & (mask > 0)])
        out[j, ids.astype(np.int64) - 1] = 1.0
    out[~valid] = 0.0
    return torch.from_numpy(out)


def micro_f1(logits: Tensor, targets: Tensor) -> float:
    """Micro-averaged F1 of the labels predicted at probability 0.5."""
    pred = logits > 0
    tp = (pred & (targets > 0)).sum().item()
    fp = (pred & (targets == 0)).sum().item()
    fn = (~pred & (targets > 0)).sum().item()
    return 2 * tp / max(1, 2 * tp + fp + fn)


def _hyper(model: ModelConfig, p: PretrainConfig) -> tuple[float, float]:
    """AdamW's lr and weight decay: the configured ones, else the family's."""
    lr = p.lr if p.lr is not None else (1e-3 if model.backbone in MITS else 3e-3)
    return lr, (p.weight_decay if p.weight_decay is not None else 0.05)


def _pretrain_worker(config: dict) -> None:
    """One Ray Train worker of the pretraining run (see the module docstring)."""
    if not config.get("verbose"):
        quiet_train_console()  # Ray Train's report dumps, as in the segmentation runs
    model_cfg = from_dict({"model": config["model"]}).model
    p = PretrainConfig(**config["pretrain"])
    k, ignore = config["num_classes"], config["ignore_index"]
    ctx = ray.train.get_context()
    torch.manual_seed(p.seed + ctx.get_world_rank())
    device = ray.train.torch.get_device()
    if device.type != "cuda":  # as the segmentation runs (2 on this machine; was Ray's 1)
        set_cpu_threads(config.get("torch_threads"))
    net = Classifier(build_encoder(model_cfg), k - 1).to(device)
    lr, wd = _hyper(model_cfg, p)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    steps, start = config["steps_per_epoch"], 0
    total = steps * p.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (1 - min(i, total - 1) / total) ** 0.9)
    checkpoint = ray.train.get_checkpoint()
    resume = checkpoint.path if checkpoint is not None else config.get("resume")
    if resume is not None:
        state = torch.load(Path(resume) / "state.pt", map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        start = state["epoch"]
    model = ray.train.torch.prepare_model(net) if ctx.get_world_size() > 1 else net
    val = decode_split(config["root"], DatasetInfo.from_json(config["info"]), "val", None, False)
    val_images = torch.from_numpy(val["image"])
    val_labels = label_vectors(val["mask"], val["valid"], k, ignore)
    shard = ray.train.get_dataset_shard("train")
    dtypes = {c: getattr(torch, t) for c, t in COLUMNS.items()}
    for epoch in range(start, p.epochs):
        model.train()
        t0, losses = time.perf_counter(), []
        batches = shard.iter_torch_batches(
            batch_size=p.batch_size, dtypes=dtypes, device=device, drop_last=True
        )
        for i, batch in enumerate(batches):
            if i == steps:
                break
            batch = model_batch({c: batch[c] for c in dtypes})
            weight = batch["valid"].float()[:, None].expand_as(batch["labels"])
            logits = model(batch["image"])
            loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad():
            images = model_batch({"image": val_images, "valid": torch.from_numpy(val["valid"])})
            logits = torch.cat([net(b.to(device)).cpu() for b in images["image"].split(64)])
        metrics = {
            "epoch": epoch + 1,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "val_f1": micro_f1(logits, val_labels),
            "epoch_s": time.perf_counter() - t0,
        }
        with tempfile.TemporaryDirectory() as folder:
            if ctx.get_world_rank() == 0:
                state = {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "schedule": sched.state_dict(),
                    "epoch": epoch + 1,
                }
                if config.get("in_driver"):  # local mode keeps a checkpoint in memory only
                    folder = _own_checkpoint(Path(config["run_folder"]), state)
                else:
                    torch.save(state, Path(folder) / "state.pt")
                print(
                    f"pretrain epoch {epoch + 1}/{p.epochs}: loss {metrics['loss']:.4f}, "
                    f"val F1 {100 * metrics['val_f1']:.1f}%, {metrics['epoch_s']:.1f} s",
                    flush=True,
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


def _own_checkpoint(run_folder: Path, state: dict, keep: int = 2) -> str:
    """A local-mode run's checkpoint, written where Ray's would be (`checkpoint_<time>`, the
    name `_newest_state` sorts by) with its state file complete or absent; the `keep` newest
    kept, as the worker mode's `CheckpointConfig(num_to_keep=2)`."""
    now = datetime.datetime.now()
    folder = run_folder / f"checkpoint_{now:%Y-%m-%d_%H-%M-%S}.{now.microsecond // 1000:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, folder / "state.pt")
    found = sorted(run_folder.glob("checkpoint_*/state.pt"), key=lambda f: f.parent.name)
    for old in found[:-keep]:
        shutil.rmtree(old.parent, ignore_errors=True)
    return str(folder)


def pretrain_name(model: ModelConfig, p: PretrainConfig) -> str:
    """pretrain-<backbone>-<hash of the backbone's architecture and the pretrain section>."""
    arch = {key: getattr(model, key) for key in ARCHITECTURE}
    p = dataclasses.replace(p, root="")  # where the images are kept does not change them
    return f"pretrain-{model.backbone}-{fingerprint({'model': arch, 'pretrain': dataclasses.asdict(p)})}"


def pretrain_data(p: PretrainConfig) -> DatasetInfo:
    """The classification image set at `p.root`, made on first use (as the embedded datasets)."""
    synthetic = SyntheticConfig(
        num_train=p.num_images,
        num_val=p.num_val,
        size=p.size,
        num_classes=p.num_classes,
        seed=p.seed,
    )
    info = ensure_synthetic(p.root, synthetic)
    differs = _differences(info, synthetic)
    if differs:
        raise ConfigError(
            f"'pretrain.root': {p.root} holds another image set ({'; '.join(differs)}); delete it "
            "or point pretrain.root elsewhere"
        )
    return info


def _newest_state(folder: Path) -> str | None:
    """The newest checkpoint folder of an interrupted pretraining run that holds its state."""
    found = sorted(folder.glob("checkpoint_*/state.pt"), key=lambda f: f.parent.name)
    return str(found[-1].parent) if found else None


def pretrained_backbone(model: ModelConfig, cfg: Config, log=print) -> str:
    """The file of `model`'s synthetic-pretrained backbone, pretraining it first (on Ray Train,
    resuming an interrupted run) when it does not exist yet."""
    from components.training.trainer import _request, quiet_ray_data, storage_of

    storage = storage_of(cfg)
    if is_uri(storage):
        raise ConfigError(
            f"'model.pretrained: {SYNTHETIC_PRETRAINED}' needs a local or mounted "
            f"trainer.storage_path (the workers load the file from it), got {storage}"
        )
    p = cfg.pretrain
    name = pretrain_name(model, p)
    folder = Path(absolute_storage(storage)) / name
    out = folder / BACKBONE_FILE
    if out.is_file():
        log(f"pretrained backbone: reusing {out}")
        return str(out)
    with run_lock(str(folder)):
        if out.is_file():
            return str(out)
        info = pretrain_data(p)
        log(
            f"pretrained backbone: training {name} ({model.backbone} x{model.width:g}) by "
            f"classification on {p.root} ({p.num_images} images, {p.epochs} epochs)"
        )
        request = _request(cfg)
        in_driver = local_mode.runs_in_driver(cfg.trainer, request)
        quiet_ray_data(not cfg.trainer.verbose)  # before the dataset copies the context
        data = DataConfig(
            root=p.root, crop_size=p.size, batch_size=p.batch_size, cache_encoded=True
        )
        steps = (p.num_images // request.num_workers) // p.batch_size
        loop_config = {
            "model": dataclasses.asdict(model),
            "pretrain": dataclasses.asdict(p),
            "num_classes": info.num_classes,
            "ignore_index": info.ignore_index,
            "root": local_root(p.root),
            "info": info.to_json(),
            "steps_per_epoch": steps,
            "resume": _newest_state(folder),
            "verbose": cfg.trainer.verbose,
            "in_driver": in_driver,
            "run_folder": str(folder),
            "torch_threads": cfg.trainer.torch_threads,
        }
        datasets = {"train": train_dataset(data, info, weak=True).select_columns(list(COLUMNS))}
        if in_driver:  # the training function in this process (local_mode.py)
            datasets = local_mode.driver_inputs(datasets, request, cfg.trainer.verbose)
        trainer = ray.train.torch.TorchTrainer(
            _pretrain_worker,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=0 if in_driver else request.num_workers,
                use_gpu=request.use_gpu,
                resources_per_worker=request.per_worker,
            ),
            run_config=ray.train.RunConfig(
                name=name,
                storage_path=str(folder.parent),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.trainer.max_failures),
                logging_config=ray.train.LoggingConfig(
                    log_level="INFO" if cfg.trainer.verbose else "WARNING"
                ),
            ),
            datasets=datasets,
            dataset_config=SegDataConfig(uneven=()),
        )
        result = local_mode.fit(trainer)
        state = torch.load(
            Path(result.checkpoint.path) / "state.pt", map_location="cpu", weights_only=True
        )["model"]
        backbone = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
        tmp = folder / f"{BACKBONE_FILE}.tmp-{os.getpid()}"
        torch.save(backbone, tmp)
        (folder / "pretrain.json").write_text(
            json.dumps(
                {
                    "config": to_dict(cfg)["pretrain"],
                    "model": dataclasses.asdict(model),
                    "metrics": result.metrics,
                },
                indent=1,
                default=str,
            )
        )
        os.replace(tmp, out)  # written last: its presence means the stage finished
    log(
        f"pretrained backbone: {out} (val F1 {100 * result.metrics.get('val_f1', float('nan')):.1f}%)"
    )
    return str(out)


def resolve_pretrained(cfg: Config, log=print) -> Config:
    """`cfg` with `model.pretrained` set to its file where it is `synthetic` (pretrained first
    when missing); unchanged otherwise. A teacher's `synthetic` is resolved by the fit that
    trains it (the student's run builds its teacher from the teacher's weights)."""
    if cfg.model.pretrained != SYNTHETIC_PRETRAINED:
        return cfg
    path = pretrained_backbone(cfg.model, cfg, log)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=path))
