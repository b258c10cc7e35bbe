"""The short form of an ablation's tables: per axis, a verdict on the paper's claim that its default arm is the best,
the cost, and mask AP ± CI, Δ, p, MDE and n per arm.

`istr ablate` writes it as `<out>/summary.md` from the tables it has just written, so the numbers are the tables'
own. The README's "What the ablations show" holds `results/tiny/summary.md` between its `ablation tables` markers
(`tests/test_results_tiny.py` keeps the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.render import format_p
from analysis.stats import ALPHA
from istr.axes import axis as find_axis
from istr.io import atomic_write_text

ABLATION_SUMMARY_FILE = "summary.md"


def verdict(numbers: pd.DataFrame, cells: int, expected: int) -> str:
    """The paper's claim, that the default arm is the best, against the arms' paired tests at level ALPHA.

    "reproduced": every other arm is separated below the default; "reversed": some arm is separated above it;
    "partly reproduced": some arms separated below, the rest not separable; "not separable": none separated.
    A table still missing cells says how many, and no verdict.
    """
    if cells < expected:
        return f"not run in full yet: {cells} of {expected} cells, shown as they are"
    others = numbers[~numbers["is_default"]]
    n = int(numbers["segm_AP_n"].min())
    separated = others[others["p"] < ALPHA]
    rest = others[~(others["p"] < ALPHA)]
    mdes = rest["mde_segm_AP"]
    if separated.empty:
        return f"**not separable at n = {n}, MDE = {mdes.min():.1f}–{mdes.max():.1f} AP**"
    above = separated["delta_segm_AP"] > 0
    head = "reversed" if above.any() else ("reproduced" if rest.empty else "partly reproduced")
    parts = [f"{r.arm} {'above' if r.delta_segm_AP > 0 else 'below'} the default by {abs(r.delta_segm_AP):.1f} AP "
             f"(p {format_p(r.p)})" for r in separated.itertuples()]  # fmt: skip
    if not rest.empty:
        parts.append(f"{', '.join(rest['arm'])} not separable at n = {n} (MDE ≤ {mdes.max():.1f} AP)")
    return f"**{head}**: " + "; ".join(parts)


def axis_summary(axis: str, numbers: pd.DataFrame, expected: int) -> str:
    """One axis' heading line (title, verdict, CPU/GPU-hours) and its compact table, from the table's numbers."""
    cells = int(numbers["segm_AP_n"].sum())
    lines = [
        f"**{find_axis(axis).title}** (`{axis}`). Verdict: {verdict(numbers, cells, expected)}. "
        f"{numbers['cpu_gpu_hours'].sum():.1f} CPU/GPU-hours, the shared default arm included.",
        "",
        "| arm | mask AP (95% CI) | Δ vs default | p | MDE | n |",
        "|---|---|---|---|---|---|",
    ]
    for r in numbers.itertuples():
        n = int(r.segm_AP_n)
        ap = f"{r.segm_AP_mean:.1f} ± {r.segm_AP_ci95:.1f}" if n > 1 else (f"{r.segm_AP_mean:.1f}" if n else "—")
        delta = "" if r.is_default else ("—" if math.isnan(r.delta_segm_AP) else f"{r.delta_segm_AP:+.1f}")
        p = "" if r.is_default or math.isnan(r.p) else format_p(r.p)
        mde = "—" if math.isnan(r.mde_segm_AP) else f"{r.mde_segm_AP:.1f}"
        lines.append(f"| {r.arm} | {ap} | {delta} | {p} | {mde} | {n} |")
    return "\n".join(lines) + "\n"


def write_summary(tables: Mapping[str, pd.DataFrame], expected: Mapping[str, int], out: Path) -> Path:
    """`<out>/summary.md`: :func:`axis_summary` of every axis in `expected` (its grid's cell count), in that order."""
    blocks = [axis_summary(axis, pd.DataFrame(tables[axis].attrs["numbers"]), cells)
              for axis, cells in expected.items() if axis in tables]  # fmt: skip
    path = Path(out) / ABLATION_SUMMARY_FILE
    atomic_write_text(path, "\n".join(blocks))
    return path
