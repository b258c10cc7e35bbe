"""The timing driver of ``istr bench``: ISTR vs torchvision Mask R-CNN, side by side in one process.

Iterations alternate between the models (and which one goes first) so machine drift hits both. Warm-up
iterations are excluded; medians and min/max over the timed iterations are reported. A separate instrumented
pass breaks an ISTR train step and an ISTR inference into phases (istr/bench/phases.py: forward hooks +
wrappers, CUDA-synchronised), so the phase timing never slows the timed iterations.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from istr.bench.models import BACKBONES
from istr.bench.phases import istr_infer_phases, istr_train_phases, phase_summary
from istr.bench.units import Bench
from istr.engine.memory import keep_freed_memory
from istr.io import atomic_write_json


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(seconds: list[float], per: float) -> dict:
    """Rates (``per`` units per second) from per-iteration seconds: median, min, max + median ms."""
    rates = [per / s for s in seconds]
    return {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "ms_median": 1000 * statistics.median(seconds),
        "n": len(seconds),
    }


def run_bench(
    device: str = "cpu",
    backbone: str = "resnet50",
    size: int = 512,
    batch: int = 2,
    iters: int = 10,
    warmup: int = 2,
    json_path: str | Path | None = None,
    num_classes: int = 80,
    num_queries: int | None = None,
    phase_iters: int | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """Measure ISTR vs Mask R-CNN (inference img/s, train steps/s) + ISTR phases; return the JSON dict.

    Inputs are ``height x width``; either one left out is ``size``.
    """
    backbone = BACKBONES.get(backbone, backbone)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("istr bench: --device cuda but torch.cuda.is_available() is False")
    height, width = height or size, width or size
    kept = dev.type == "cpu" and keep_freed_memory()  # before either model allocates
    b = Bench(dev, backbone, height, width, batch, num_classes, num_queries, seed)
    units = {
        ("istr", "inference"): b.istr_infer,
        ("maskrcnn", "inference"): b.maskrcnn_infer,
        ("istr", "train"): b.istr_train,
        ("maskrcnn", "train"): b.maskrcnn_train,
    }
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for it in range(warmup + iters):
        order = ("istr", "maskrcnn") if it % 2 == 0 else ("maskrcnn", "istr")
        for kind in ("inference", "train"):
            for name in order:
                seconds = _timed(units[(name, kind)])
                if it >= warmup:
                    times[(name, kind)].append(seconds)
    result: dict = {
        "config": {
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "backbone": backbone,
            "height": height,
            "width": width,
            "batch": batch,
            "iters": iters,
            "warmup": warmup,
            "num_classes": num_classes,
            "num_queries": b.model.num_queries,
            "num_stages": len(b.model.stages),
            "pooler": b.cfg.model.pooler,
            "dtype": "bf16-autocast" if b.amp else "fp32",
            "norm": "frozen_bn (both)",
            "optimizer": "AdamW + clip_grad_norm (both)",
            "malloc_keeps_freed_memory": kept,  # istr.engine.memory, the whole process (both models)
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
    }
    for name in ("istr", "maskrcnn"):
        result[name] = {
            "inference_img_per_s": _stats(times[(name, "inference")], batch),
            "train_steps_per_s": _stats(times[(name, "train")], 1.0),
            "train_img_per_s": _stats(times[(name, "train")], batch)["median"],
            "detections_per_image": b.detections[name],
        }
    result["ratio"] = {
        "inference": result["istr"]["inference_img_per_s"]["median"]
        / result["maskrcnn"]["inference_img_per_s"]["median"],
        "train": result["istr"]["train_steps_per_s"]["median"] / result["maskrcnn"]["train_steps_per_s"]["median"],
    }
    n_phase = max(1, phase_iters if phase_iters is not None else min(iters, 3))
    train = phase_summary([istr_train_phases(b) for _ in range(n_phase)])
    share = sum(train["phases"][k]["pct"] for k in ("matcher", "criterion (incl. decode)"))
    train["matcher+criterion_pct"] = share
    result["phases"] = {"train": train, "inference": phase_summary([istr_infer_phases(b) for _ in range(n_phase)])}
    if json_path:
        atomic_write_json(Path(json_path), result)
    return result
