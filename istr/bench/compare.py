"""`istr bench`: ISTR vs torchvision Mask R-CNN, side by side in one process.

Both models see the same seeded uint8 batch (height x width) and synthetic targets, the same dtype
(fp32 on CPU, bf16 autocast on CUDA), the same norm (FrozenBatchNorm, all ResNet stages trainable,
random weights, nothing downloaded) and the same AdamW + grad-clip step. Iterations alternate
between the models (and which one goes first) so machine drift hits both. Warm-up iterations are
excluded; medians and min/max over the timed iterations are reported. ISTR gets the batch padded
to a multiple of 32 as ``collate_batch`` does; Mask R-CNN gets it unpadded and pads it itself.

Inference time is what a user gets: ISTR forward + ``postprocess`` (top-k, codec decode, paste,
threshold); Mask R-CNN forward incl. its own postprocess (NMS, paste) + threshold. RLE encoding is
left out of both and shown only in ISTR's phase table. A separate instrumented pass breaks an ISTR
train step and an ISTR inference into phases (forward hooks + wrappers, CUDA-synchronised).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from istr.bench.phases import istr_infer_phases, istr_train_phases, phase_summary, sync_device
from istr.bench.sweep import add_sweep_overhead_arguments
from istr.codecs import MASK_SIZE
from istr.engine.memory import keep_freed_memory

BACKBONES = {"r18": "resnet18", "r50": "resnet50", "r101": "resnet101"}


# ----------------------------------------------------------------------------- inputs
def synthetic_batch(
    batch: int, height: int, width: int, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, list[dict]]:
    """Seeded uint8 images [B,3,H,W] and per-image targets (3-6 boxes, rectangle/ellipse masks)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    extent = torch.tensor([float(width), float(height)])  # (x, y)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (1,), generator=g))
        wh = (0.15 + 0.5 * torch.rand(n, 2, generator=g)) * extent
        x0y0 = torch.rand(n, 2, generator=g) * (extent - wh)
        boxes = torch.minimum(torch.cat([x0y0, x0y0 + wh], 1).floor().clamp(min=0), extent.repeat(2))
        masks = torch.zeros(n, height, width, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            if i % 2:  # ellipse inscribed in the box
                cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            masks[i] = inside.to(torch.uint8)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def fit_bench_codec(dim: int, seed: int = 0):
    """A PCA codec fitted on 512 random 28x28 rectangles/ellipses (weights never matter for speed)."""
    from istr.codecs import build_codec

    g = torch.Generator().manual_seed(seed)
    c = torch.arange(MASK_SIZE) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    lo = torch.rand(512, 2, generator=g) * 8
    hi = MASK_SIZE - torch.rand(512, 2, generator=g) * 8
    x0, y0, x1, y1 = (t[:, None, None] for t in (lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]))
    rect = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    ell = (((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) <= 1
    masks = torch.where(torch.arange(512)[:, None, None] % 2 == 0, rect, ell).float()
    codec = build_codec("pca", dim)
    codec.fit(masks)
    return codec


# ----------------------------------------------------------------------------- models
def build_istr(backbone: str, num_classes: int, num_queries: int | None, device: torch.device, seed: int):
    from istr.config import load_config
    from istr.engine.train import build_optimizer
    from istr.losses import build_criterion, loss_weights
    from istr.matcher import build_matcher
    from istr.model import build_model

    overrides = [
        f"model.backbone={backbone}",
        "model.norm=frozen_bn",
        "model.hidden_dim=256",
        f"model.num_queries={num_queries or 300}",
        "model.num_stages=6",
        f"model.pooler={'sparse' if device.type == 'cpu' else 'roi_align'}",
    ]
    cfg = load_config(None, overrides)
    codec = fit_bench_codec(cfg.codec.dim, seed).to(device)
    torch.manual_seed(seed)
    model = build_model(cfg.model, num_classes, codec.dim).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg.train)
    criterion = build_criterion(cfg.loss, build_matcher(cfg.matcher, codec), codec)
    return cfg, model, codec, optimizer, scheduler, criterion, loss_weights(cfg.loss)


def build_maskrcnn(backbone: str, num_classes: int, height: int, width: int, device: torch.device, seed: int):
    """torchvision Mask R-CNN (+1 background class) with ISTR's norm: FrozenBN, all 5 stages trainable.

    ``min_size = min(H, W)`` and ``max_size = max(H, W)`` make its transform's resize scale exactly 1,
    so it sees the H x W input as given (and pads it to a multiple of 32, as ISTR's collate does).

    Same structure as ``maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)`` except that
    builder picks plain BatchNorm when no weights are given; FrozenBN matches ISTR's ``frozen_bn``.
    ``box_score_thresh=0`` so the random-weight model still returns its 100 detections per image
    (with the default 0.05 it would return none and skip the mask head and paste).
    """
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(seed)
    fpn = resnet_fpn_backbone(backbone_name=backbone, weights=None, trainable_layers=5)
    model = MaskRCNN(
        fpn, num_classes=num_classes + 1, min_size=min(height, width), max_size=max(height, width), box_score_thresh=0.0
    )
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------- steps
class Bench:
    """Holds both models and their inputs; each ``*_infer``/``*_train`` call is one timed unit."""

    def __init__(self, device, backbone, height, width, batch, num_classes, num_queries, seed=0):
        from istr.data.collate import collate_batch
        from istr.engine.train import TrainState

        self.device, self.batch, self.amp = device, batch, device.type == "cuda"
        self.height, self.width = height, width
        images, targets = synthetic_batch(batch, height, width, num_classes, seed)
        self.cfg, self.model, self.codec, opt, sched, self.criterion, weights = build_istr(
            backbone, num_classes, num_queries, device, seed
        )
        self.state = TrainState(
            self.model, self.codec, self.criterion, opt, sched, weights, device, self.amp, self.cfg.train.clip_grad_norm
        )
        self.istr_batch = collate_batch(list(zip(images, targets)))  # padded to a multiple of 32
        self.images, self.sizes = self.istr_batch["images"].to(device), self.istr_batch["image_sizes"].to(device)
        if device.type == "cuda":
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.mrcnn_images = [img[:, :height, :width] for img in self.images]  # unpadded views
        self.mrcnn = build_maskrcnn(backbone, num_classes, height, width, device, seed)
        from istr.engine.train import build_optimizer

        self.mrcnn_opt, _ = build_optimizer(self.mrcnn, self.cfg.train)
        self.mrcnn_targets = [
            {"boxes": t["boxes"].to(device), "labels": (t["labels"] + 1).to(device), "masks": t["masks"].to(device)}
            for t in targets
        ]
        self.detections = {"istr": 0.0, "maskrcnn": 0.0}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def istr_infer(self) -> None:
        from istr.model.inference import postprocess

        self.model.eval()
        with torch.no_grad():
            with self._autocast():
                outputs = self.model(self.images, self.sizes)
            results = postprocess(
                outputs, self.codec, self.sizes, self.sizes, self.cfg.eval.max_detections, self.cfg.eval.mask_threshold
            )
        sync_device(self.device)
        self.detections["istr"] = sum(len(r["scores"]) for r in results) / self.batch

    def istr_train(self) -> None:
        from istr.engine.train import train_step

        self.model.train()
        train_step(self.state, self.istr_batch)  # .item() calls inside synchronise
        sync_device(self.device)

    def maskrcnn_infer(self) -> None:
        self.mrcnn.eval()
        with torch.no_grad(), self._autocast():
            results = self.mrcnn([img.float() / 255 for img in self.mrcnn_images])
            masks = [r["masks"][:, 0] > 0.5 for r in results]
        sync_device(self.device)
        self.detections["maskrcnn"] = sum(len(m) for m in masks) / self.batch

    def maskrcnn_train(self) -> None:
        self.mrcnn.train()
        with self._autocast():
            losses = self.mrcnn([img.float() / 255 for img in self.mrcnn_images], self.mrcnn_targets)
        loss = sum(losses.values())
        self.mrcnn_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.mrcnn.parameters(), self.cfg.train.clip_grad_norm)
        self.mrcnn_opt.step()
        float(loss.detach())
        sync_device(self.device)


def _timed(fn) -> float:
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


# ----------------------------------------------------------------------------- driver
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
    import torchvision

    from istr.io import atomic_write_json

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


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [
        f"istr bench: {c['device']} ({c['device_name']}, {c['threads']} threads)  {c['backbone']}  "
        f"{c['height']}x{c['width']} (HxW)  batch {c['batch']}  {c['dtype']}  "
        f"{c['iters']} iters (+{c['warmup']} warm-up)",
        f"{'':20}{'ISTR':>24}{'Mask R-CNN':>24}{'ISTR/MRCNN':>12}",
    ]
    for key, label, ratio in (
        ("inference_img_per_s", "inference img/s", "inference"),
        ("train_steps_per_s", "train steps/s", "train"),
    ):
        cells = []
        for name in ("istr", "maskrcnn"):
            s = result[name][key]
            cells.append(f"{s['median']:.3g} [{s['min']:.3g}-{s['max']:.3g}]")
        lines.append(f"{label:20}{cells[0]:>24}{cells[1]:>24}{result['ratio'][ratio]:>12.2f}")
    lines.append(
        "(median [min-max]; detections/img: ISTR {:.0f}, Mask R-CNN {:.0f})".format(
            result["istr"]["detections_per_image"], result["maskrcnn"]["detections_per_image"]
        )
    )
    for kind in ("train", "inference"):
        p = result["phases"][kind]
        lines.append(
            f"ISTR {kind} phases (mean of {p['n']} instrumented runs; total {p['total_ms']:.0f} ms, "
            f"sum of phases {p['sum_ms']:.0f} ms)"
        )
        for name, v in p["phases"].items():
            lines.append(f"  {name:28}{v['ms']:10.1f} ms{v['pct']:7.1f} %")
        if kind == "train":
            lines.append(f"  {'matcher+criterion share':28}{p['matcher+criterion_pct']:20.1f} %")
    return "\n".join(lines)


def _bench(args: argparse.Namespace) -> None:
    if args.sweep_overhead:
        from istr.bench.sweep import sweep_overhead_command

        sweep_overhead_command(args)
        return
    if args.preset:
        from istr.bench.cell import cell_bench_command

        cell_bench_command(args)
        return
    result = run_bench(
        args.device,
        BACKBONES[args.backbone],
        args.size,
        args.batch,
        args.iters,
        args.warmup,
        args.json,
        num_queries=args.num_queries,
        phase_iters=args.phase_iters,
        height=args.height,
        width=args.width,
    )
    print(format_table(result))
    if args.json:
        print(f"JSON written to {args.json}")


def add_parsers(subparsers) -> None:
    """Register ``istr bench`` (and ``--sweep-overhead``) on an ``add_subparsers()`` object; ``args.func(args)``."""
    p = subparsers.add_parser("bench", help="ISTR vs torchvision Mask R-CNN speed, side by side (+ ISTR phases)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backbone", choices=tuple(BACKBONES), default="r50")
    p.add_argument("--size", type=int, default=512, help="square input side in pixels")
    p.add_argument("--height", type=int, default=None, help="input height (default --size), e.g. 800")
    p.add_argument("--width", type=int, default=None, help="input width (default --size), e.g. 1333")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per model and mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--num-queries", type=int, default=None, help="ISTR queries (default: paper's 300)")
    p.add_argument("--phase-iters", type=int, default=None, help="instrumented ISTR runs (default min(iters, 3))")
    p.add_argument("--json", default=None, help="write the results here (atomic)")
    p.add_argument("--threads", type=int, default=1, help="with --preset: torch threads (1: the per-core speed)")
    add_sweep_overhead_arguments(p)
    p.set_defaults(func=_bench)
