"""`istr bench`: the command (its arguments and its table); ISTR vs torchvision Mask R-CNN measured by
istr/bench/timing.py, one model's preset cell by istr/bench/cell.py, the sweep harness by istr/bench/sweep.py.
Results and their history: benchmarks/README.md.
"""

from __future__ import annotations

import argparse

from istr.bench.models import BACKBONES
from istr.bench.sweep import add_sweep_overhead_arguments
from istr.bench.timing import run_bench


def format_table(result: dict) -> str:
    """:func:`~istr.bench.timing.run_bench`'s dict as the console table: rates side by side, then ISTR's phases."""
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


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
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
