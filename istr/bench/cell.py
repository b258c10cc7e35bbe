"""`istr bench --preset tiny`: one ablation cell's train step, plain fp32 vs the fast path, against the machine's peak.

In one process: the preset's model (random weights; the backbone frozen as the preset freezes its
pretrained one), its codec fitted on the preset's training masks, and a few of the preset's own
training batches held in memory (no loader in the timing). The plain path is ``train.amp=false``
(fp32); the fast path is the preset as it runs (bf16 autocast where the CPU has native bf16,
istr/engine/precision.py). Steps alternate between the two, after warm-up, so machine drift hits
both. The FLOPs of one step are counted by ``torch.utils.flop_counter`` (forward + backward of the
matrix products and convolutions), the peak is a 1024² matrix product measured here in fp32 and
bf16 on the same threads, and the efficiency is the achieved FLOP/s over the peak of the step's
precision. Results and their history: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from istr.codecs import MaskCodec
from istr.codecs.fit import fit_or_load_codec
from istr.config import Config, load_config
from istr.data.build import build_dataset, build_train_loader, ensure_dataset, split_paths
from istr.engine.memory import keep_freed_memory
from istr.engine.optim import build_optimizer
from istr.engine.precision import use_amp
from istr.engine.step import TrainState, train_step
from istr.engine.train import seed_everything
from istr.io import atomic_write_json
from istr.losses import build_criterion, loss_weights
from istr.matcher import build_matcher
from istr.model import build_model
from istr.model.backbone import BackboneFPN

PEAK_SIDE = 1024  # the matrix product that measures the machine's peak


def matmul_flops_per_s(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """The best FLOP/s of a ``PEAK_SIDE``² matrix product in ``dtype`` over about ``seconds`` of repeats."""
    a = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    out = torch.empty(PEAK_SIDE, PEAK_SIDE, dtype=dtype)
    torch.mm(a, b, out=out)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * PEAK_SIDE**3 / best


def _frozen_like_preset(cfg: Config, folder: Path) -> Path | None:
    """A random backbone state dict on disk: loading it freezes the stem and first stage as the preset's
    pretrained backbone is frozen (``model.freeze_at``); None where the preset trains from scratch."""
    if cfg.model.pretrained == "none":
        return None
    path = folder / "random_backbone.pt"
    torch.save(BackboneFPN(cfg.model.backbone, cfg.model.hidden_dim, cfg.model.norm).state_dict(), path)
    return path


def build_cell(cfg: Config, batches: int) -> tuple[TrainState, list[dict]]:
    """The preset's train state on the CPU and ``batches`` of its training batches, held in memory."""
    ensure_dataset(cfg.data)
    train_set = build_dataset(cfg.data, "train", train=True)
    codec, _, _ = fit_or_load_codec(cfg.codec, split_paths(cfg.data, "train")[0], train_set.coco,
                                    Path(cfg.cache_dir), cfg.seed)  # fmt: skip
    data = iter(build_train_loader(train_set, cfg.data, cfg.train.batch_size, cfg.seed, 0, 1, 0, pin_memory=False))
    return train_state(cfg, train_set.num_classes, codec), [next(data) for _ in range(batches)]


def train_state(cfg: Config, num_classes: int, codec: MaskCodec) -> TrainState:
    """A fresh train state of ``cfg`` on the CPU (``train.amp`` decides its precision)."""
    seed_everything(cfg.seed)
    with tempfile.TemporaryDirectory() as folder:
        model = build_model(cfg.model, num_classes, codec.dim, _frozen_like_preset(cfg, Path(folder)))
    optimizer, scheduler = build_optimizer(model, cfg.train)
    device = torch.device("cpu")
    return TrainState(model.train(), codec, build_criterion(cfg.loss, build_matcher(cfg.matcher, codec), codec),
                      optimizer, scheduler, loss_weights(cfg.loss), device, use_amp(device, cfg.train.amp),
                      cfg.train.clip_grad_norm)  # fmt: skip


def step_flops(state: TrainState, batch: dict) -> int:
    """FLOPs of one train step (forward + backward; the optimizer's elementwise work is not counted)."""
    with FlopCounterMode(display=False) as counter:
        train_step(state, batch)
    return counter.get_total_flops()


def run_cell_bench(preset: Path, overrides: list[str], threads: int, iters: int, warmup: int,
                   json_path: Path | None = None) -> dict:  # fmt: skip
    """Plain vs fast images/s of ``preset``'s train step at ``threads``, its FLOPs, and the peak; the JSON dict."""
    torch.set_num_threads(threads)
    keep_freed_memory()
    cfg = load_config(preset, overrides)
    fast, batches = build_cell(cfg, batches=4)
    plain = train_state(load_config(preset, [*overrides, "train.amp=false"]), fast.model.num_classes, fast.codec)
    plain.model.load_state_dict(fast.model.state_dict())  # the same weights: the paths differ only in precision
    seconds: dict[str, list[float]] = {"plain": [], "fast": []}
    for it in range(warmup + iters):
        for name, state in (("plain", plain), ("fast", fast))[:: 1 if it % 2 == 0 else -1]:
            start = time.perf_counter()
            train_step(state, batches[it % len(batches)])
            if it >= warmup:
                seconds[name].append(time.perf_counter() - start)
    images = cfg.train.batch_size
    rate = {name: images / statistics.median(times) for name, times in seconds.items()}
    flops = step_flops(plain, batches[0])
    peak = {"fp32": matmul_flops_per_s(torch.float32), "bf16": matmul_flops_per_s(torch.bfloat16)}
    precision = {"plain": "fp32", "fast": "bf16" if fast.amp else "fp32"}
    result = {
        "preset": str(preset),
        "overrides": overrides,
        "threads": threads,
        "iters": iters,
        "warmup": warmup,
        "batch_size": images,
        "precision": precision,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "plain_img_per_s": rate["plain"],
        "fast_img_per_s": rate["fast"],
        "ratio": rate["fast"] / rate["plain"],
        "flops_per_step": flops,
        "peak_flops": peak,
        "efficiency": {name: flops * rate[name] / images / peak[precision[name]] for name in rate},
    }
    if json_path:
        atomic_write_json(Path(json_path), result)
    return result


def format_cell(result: dict) -> str:
    eff, peak = result["efficiency"], result["peak_flops"]
    return "\n".join([
        f"istr bench --preset: {result['preset']}, {result['threads']} thread(s), batch {result['batch_size']}, "
        f"{result['iters']} steps each (+{result['warmup']} warm-up), {result['cpu_capability']}",
        f"  plain ({result['precision']['plain']}): {result['plain_img_per_s']:.1f} img/s "
        f"({eff['plain']:.0%} of the {result['precision']['plain']} peak)",
        f"  fast  ({result['precision']['fast']}): {result['fast_img_per_s']:.1f} img/s "
        f"({eff['fast']:.0%} of the {result['precision']['fast']} peak)",
        f"  fast / plain: {result['ratio']:.2f}x",
        f"  one step: {result['flops_per_step'] / 1e9:.1f} GFLOP; peak {PEAK_SIDE}² matmul: "
        f"fp32 {peak['fp32'] / 1e9:.0f}, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s",
    ])


def cell_bench_command(args: argparse.Namespace) -> None:
    from istr.sweep.spec import resolve_preset

    result = run_cell_bench(resolve_preset(args.preset), list(args.sets), args.threads, args.iters,
                            args.warmup, Path(args.json) if args.json else None)  # fmt: skip
    print(format_cell(result))
    if args.json:
        print(f"JSON written to {args.json}")
