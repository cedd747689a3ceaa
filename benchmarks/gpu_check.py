"""The GPU check: what a lent GPU machine must confirm before a cluster run, in one short call.

    python benchmarks/gpu_check.py                 # on a GPU machine (a few minutes)
    python benchmarks/gpu_check.py --cpu-smoke     # the same code path on CPU, tiny sizes

Checks, each a line `check <name>: ok|FAILED ...`:
1. bf16 autocast: the student's loss under autocast is finite and within 5% of float32's, and
   its gradients are finite.
2. channels-last: the same logits as the default memory format (bf16 tolerance).
3. NCCL: an all-reduce through a NCCL process group (world 1 on one GPU; all GPUs of the
   machine when there are more, one process each).
4. Throughput at Cityscapes size: teacher DeepLabV3-R101 forward (no grad) + student
   DeepLabV3-R18 forward/backward, batch 8 at 512x1024, bf16, channels-last, the SGD step;
   steps/s and images/s, and the achieved TFLOP/s (model FLOPs by torch's counter, x3 for the
   student's forward + backward) against the GPU's dense bf16 peak (`--peak-tflops`, else a
   table of known GPUs): the physical limit.
What it does not check: whether Ray Data keeps the GPU fed (a cluster run's `data_wait_share`
says that; on one machine here the GPU step is far faster than two CPU cores can decode).
The last line is `gpu_check: ok` or `gpu_check: FAILED (names)`; paste the table into
docs/benchmarks.md with the command and date.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def _peak(name: str, given: float | None) -> float | None:
    if given:
        return given
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def _models(smoke: bool, classes: int):
    from components.config import ModelConfig
    from components.models.build import build_model

    width = 0.125 if smoke else 1.0
    teacher = build_model(ModelConfig(backbone="resnet101", width=width), classes)
    student = build_model(ModelConfig(backbone="resnet18", width=width), classes)
    return teacher.eval(), student.train()


def _loss(student, images, masks):
    import torch.nn.functional as F

    logits = student(images)["logits"]
    logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear")
    return F.cross_entropy(logits, masks, ignore_index=255)


def check_autocast(student, images, masks, device) -> str:
    import torch

    student.zero_grad()
    with torch.no_grad():
        fp32 = float(_loss(student, images, masks))
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = _loss(student, images, masks)
    loss.backward()
    bf16 = float(loss.detach())
    grads_ok = all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    rel = abs(bf16 - fp32) / max(abs(fp32), 1e-9)
    ok = math.isfinite(bf16) and grads_ok and rel < 0.05
    return f"{'ok' if ok else 'FAILED'} (loss fp32 {fp32:.4f}, bf16 {bf16:.4f})"


def check_channels_last(student, images) -> str:
    import copy

    import torch

    model = copy.deepcopy(student).eval()
    with torch.no_grad():
        plain = model(images)["logits"].float()
        cl = model.to(memory_format=torch.channels_last)(
            images.contiguous(memory_format=torch.channels_last)
        )["logits"].float()
    diff = float((plain - cl).abs().max())
    ok = diff <= 1e-3 * max(1.0, float(plain.abs().max()))
    return f"{'ok' if ok else 'FAILED'} (max |diff| {diff:.2e})"


def _nccl_worker(rank: int, world: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    t = torch.full((4,), float(rank + 1), device=f"cuda:{rank}")
    dist.all_reduce(t)
    out.put((rank, float(t[0])))
    dist.destroy_process_group()


def check_nccl() -> str:
    import socket

    import torch
    import torch.multiprocessing as mp

    if not torch.cuda.is_available():
        return "skipped (no GPU)"
    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_nccl_worker, args=(r, world, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    want = world * (world + 1) / 2
    got = (
        [out.get(timeout=5)[1] for _ in range(world)] if all(p.exitcode == 0 for p in procs) else []
    )
    ok = len(got) == world and all(abs(g - want) < 1e-6 for g in got)
    return f"{'ok' if ok else 'FAILED'} ({world} GPU(s), all-reduce {got or 'no result'})"


def throughput(teacher, student, device, batch: int, size: tuple[int, int], steps: int, peak):
    import torch

    from components.model_report import flop_count

    h, w = size
    on_gpu = device.type == "cuda"
    teacher, student = teacher.to(device), student.to(device)
    if on_gpu:
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    images = torch.randn(batch, 3, h, w, device=device)
    if on_gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    masks = torch.randint(0, 19, (batch, h, w), device=device)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            with torch.no_grad():
                teacher(images)
            loss = _loss(student, images, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / steps
    one = images[:1].float()
    flops = batch * (flop_count(teacher, one) + 3 * flop_count(student.eval(), one))
    student.train()
    tflops = flops / seconds / 1e12
    share = f", {100 * tflops / peak:.1f}% of the {peak:g} TFLOP/s bf16 peak" if peak else ""
    return (
        f"{1 / seconds:.2f} steps/s, {batch / seconds:.1f} images/s, "
        f"{flops / 1e12:.2f} TFLOP a step, {tflops:.1f} TFLOP/s achieved{share}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU (tests)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)

    import torch

    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no GPU here (run with --cpu-smoke to exercise the code on CPU)")
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    name = "CPU" if smoke else torch.cuda.get_device_name(0)
    batch, size, steps = (2, (64, 128), 2) if smoke else (args.batch, tuple(args.size), args.steps)
    print(f"device: {name}; torch {torch.__version__}; batch {batch} at {size[0]}x{size[1]}")
    torch.manual_seed(0)
    teacher, student = _models(smoke, 19)
    student = student.to(device)
    images = torch.randn(2, 3, *size, device=device)
    masks = torch.randint(0, 19, (2, *size), device=device)
    results = {
        "bf16 autocast": check_autocast(student, images, masks, device),
        "channels-last": check_channels_last(student, images),
        "nccl": check_nccl() if not smoke else "skipped (--cpu-smoke)",
        "throughput": throughput(
            teacher, student, device, batch, size, steps, _peak(name, args.peak_tflops)
        ),
    }
    for key, text in results.items():
        print(f"check {key}: {text}")
    failed = [k for k, v in results.items() if v.startswith("FAILED")]
    print("gpu_check: " + (f"FAILED ({', '.join(failed)})" if failed else "ok"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
