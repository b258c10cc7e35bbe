"""The ablation tables' footnotes: the markers a cell may carry, and the notes under every table (how the
uncertainty was computed, which code trained the cells, the seed rule, the MDE target)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.stats import ALPHA, POWER, needed_n
from analysis.val_noise import ImageDraws
from istr.results import SUMMARY_FILE

DASH = "—"

MISSING = "†"  # footnote marker: missing value

NO_TEST = "‡"  # footnote marker: fewer than 2 (paired) seeds

ARM_SD = "§"  # footnote marker: MDE from the arm's own seed SD

NO_VAL = "¶"  # footnote marker: no per-image val records

FOOTNOTES = {
    MISSING: "missing: no completed trial with a defined value (failed, unfinished or undefined metric); never zero.",
    NO_TEST: "fewer than 2 seeds (paired with the default arm, for p): no test, SD or MDE; or identical paired "
    "differences (no p).",
    ARM_SD: "MDE from the arm's own seed SD over its n seeds (and its mean's val-image variance, where counted): it "
    "has no paired differences (the default arm itself, or no seed in common with it).",
    NO_VAL: "no val SD: not every cell of this table kept per-image val records (eval_images.npz).",
}

AXIS_NOTES = [
    "Cells: mean ± 95% CI half-width (t-distribution, n−1 df); bold = best mean per column.",
    "Δ and p: paired over matching seeds vs the default arm; two-sided.",
    f"seed SD: SD of mask AP over the arm's seeds. val SD: SD of Δ (of the mean, for the default arm) over the "
    f"redraws of the val images. MDE: the smallest true Δ mask AP that a two-sided paired t-test at α = {ALPHA} "
    f"detects with power {POWER} at the n of pairs used (noncentral t): d(n) × the SD of the paired differences vs "
    "the default arm, √(s² + n·σ²_img) when val images are counted.",
]

SEEDS_ONLY = "Uncertainty covers seeds only: these results carry no per-image records."

NO_SEED_RULE = "Seeds: no seed rule recorded with these results (istr ablate writes seed_rule.json); n as shown."


def seed_note(seed_rule: Mapping[str, Any] | None, axis: str) -> str:
    """The footnote that states the seed rule declared before the run and the n it reached on `axis`."""
    if seed_rule is None:
        return NO_SEED_RULE
    reached = (seed_rule.get("n_reached") or {}).get(axis)
    return f"Seeds, rule declared before the run: {seed_rule['rule']}" + (
        f" n reached: {reached}." if reached is not None else ""
    )


def _code_version(run_dir: Any) -> tuple[str, bool] | None:
    """(commit, trained with local changes) from a run dir's train_summary.json; None when not recorded."""
    if pd.isna(run_dir):
        return None
    try:
        version = json.loads((Path(str(run_dir)) / SUMMARY_FILE).read_text(encoding="utf-8")).get("code_version")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(version, dict) or not isinstance(version.get("commit"), str) or not version["commit"]:
        return None
    return version["commit"], version.get("dirty") is True


def code_note(df: pd.DataFrame) -> str:
    """The footnote naming the commits that trained the cells of `df` (train_summary.json's code_version), and each
    commit's arms when there are several: a table compares arms fairly only when they ran the same code."""
    dirty: dict[str, bool] = {}
    arms: dict[str, set[str]] = {}
    unrecorded = 0
    cells = df.dropna(subset=["cell_id"]).drop_duplicates("cell_id")
    for run_dir, arm in zip(cells["run_dir"], cells["arm"]):
        version = _code_version(run_dir)
        if version is None:
            unrecorded += 1
            continue
        dirty[version[0]] = dirty.get(version[0], False) or version[1]
        arms.setdefault(version[0], set()).add(str(arm))
    if not dirty:
        return "Code version: not recorded."
    named = {commit: commit[:12] + (" (with local changes)" if dirty[commit] else "") for commit in sorted(dirty)}
    if len(named) == 1 and not unrecorded:
        return f"Code: every cell trained at commit {next(iter(named.values()))}."
    if len(named) > 1:
        named = {c: f"{name} ({', '.join(sorted(arms[c]))})" for c, name in named.items()}
    plural = "s" if len(named) > 1 else ""
    rest = f", and {unrecorded} cell{'s' if unrecorded > 1 else ''} with no recorded version" if unrecorded else ""
    return (f"Code: cells from {len(named)} commit{plural}: {'; '.join(named.values())}{rest}. Arms compare fairly "
            "only where these commits train them alike.")


def _redraws(draws: ImageDraws) -> int:
    return len(next(iter(draws.values())))


def val_note(draws: ImageDraws) -> str:
    """How a table with val-image draws counts both sources of noise."""
    n_draws = _redraws(draws)
    return (
        f"Uncertainty covers seeds and val images: SE² = s²/n + σ²_img, σ²_img = variance of the seed-averaged Δ over "
        f"{n_draws} bootstrap redraws of the {draws.n_images} val images (the same draws for every cell); t with n−1 "
        "df. Conservative: the seed×image part is counted in both terms. The mask AP CI adds σ²_img of the arm's "
        "seed mean likewise; the other AP columns cover seeds only."
    )


def codec_val_note(draws: ImageDraws) -> str:
    """The same, for the codec table's trained mask AP."""
    return (
        f"Uncertainty of the trained mask AP covers seeds and val images: SE² = s²/n + σ²_img, σ²_img = variance of "
        f"the seed mean over {_redraws(draws)} bootstrap redraws of the {draws.n_images} val images; box AP covers "
        "seeds only."
    )


def mde_target_note(numbers: list[dict[str, Any]], target: float) -> str:
    """Whether every arm's MDE reaches `target` AP; if not, which arms miss it, and the n of pairs that would
    reach it at the SD each arm measured (`stats.needed_n`); or that no arm has an MDE (one seed per arm)."""
    missed = [(num["arm"], num["mde_segm_AP"], needed_n(target, num["mde_sd"])) for num in numbers
              if math.isfinite(num["mde_segm_AP"]) and num["mde_segm_AP"] > target]  # fmt: skip
    if not any(math.isfinite(num["mde_segm_AP"]) for num in numbers):
        return f"MDE target {target:g} AP: no arm has an MDE at this n (it needs at least 2 pairs of seeds)."
    if not missed:
        return f"MDE target {target:g} AP: every arm with an MDE reaches it."
    arms = "; ".join(f"{arm} {size:.1f} AP (about {n} seeds would reach it)" for arm, size, n in missed)
    return (f"MDE target {target:g} AP, not reached at this n: {arms}. At these seed and val-image SDs, "
            "the seeds the budget allowed can only separate larger differences.")
