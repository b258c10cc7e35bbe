"""The paper's per-axis ablation tables: mean ± 95% CI, paired Δ to the default arm and its p, each arm's seed SD
and val-image SD, the minimum detectable effect (MDE) of the paired test at the n used, cost columns.

The mask AP numbers speak for the population of images, not only the val set: when every cell of a table kept
its per-image val records (`eval_images.npz`), its CI, p and MDE add the variance of a redrawn val set to the seed
variance (variance components, `analysis.stats.paired_vs_default`, draws from `analysis.val_noise`); otherwise
the table covers seeds only, and its footnote says which.

CLI: `python -m analysis.tables --runs runs/sweeps [--studies a,b] [--codec-report CSV] [--seed-rule JSON]
--out results/` writes `<axis>.md/.tex/.csv` per axis found (+ `codec_upper_bound.*` for the codecs trained) and
prints the Markdown tables. The Markdown/LaTeX cells are formatted text; the CSV holds the numbers (mean, CI
half-width, SD and n as separate columns). Default arms: the base preset's values of the axis keys of `sweeps/*.yaml`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.load import load_codec_report, results_from_cli
from analysis.notes import (
    ARM_SD,
    AXIS_NOTES,
    DASH,
    FOOTNOTES,
    MISSING,
    NO_TEST,
    NO_VAL,
    SEEDS_ONLY,
    code_note,
    codec_val_note,
    mde_target_note,
    seed_note,
    val_note,
)
from analysis.render import format_p, to_markdown, write_table
from analysis.stats import (
    arm_order,
    default_arm,
    describe,
    effective_sd,
    mde,
    paired_vs_default,
    seed_mean_draws,
    val_variance,
)
from analysis.val_noise import ImageDraws, image_draws
from istr.axes import CODEC_AXES  # the axes whose arms are (codec type, dim) pairs

METRIC_COLUMNS: dict[str, str] = {
    "segm_AP": "mask AP",
    "segm_AP50": "AP50",
    "segm_AP75": "AP75",
    "segm_APs": "APs",
    "segm_APm": "APm",
    "segm_APl": "APl",
    "bbox_AP": "box AP",
}
DELTA_COL = "Δ mask AP vs default"
P_COL = "p (paired t-test)"  # seeds only
P_VAL_COL = "p (seeds + val images)"
SD_COL = "seed SD"
VAL_SD_COL = "val SD"
MDE_COL = "MDE"
HOURS_COL = "CPU/GPU-hours"
IPS_COL = "img/s"
BASE = "(base)"
DEFAULT_SUFFIX = " (default)"
CODEC_ORDER = ("pca", "dct", "sparse", "ae")


def _fmt_cell(mean: float, ci95: float, n: int) -> str:
    if n == 0:
        return DASH + MISSING
    if n == 1:
        return f"{mean:.1f} (n=1)"
    return f"{mean:.1f} ± {ci95:.1f} (n={n})"


def _fmt_num(value: float, digits: int, absent: str) -> str:
    return DASH + absent if math.isnan(value) else f"{value:.{digits}f}"


def _table_draws(sub: pd.DataFrame, val_draws: ImageDraws | None) -> tuple[ImageDraws | None, str]:
    """The val-image draws a table uses: those of its cells (with a mask AP) when every one has them, so that one
    method covers all its arms; else None and the note saying the table covers seeds only, and why."""
    draws = image_draws(sub) if val_draws is None else val_draws
    cells = sorted(set(sub.dropna(subset=["segm_AP"])["cell_id"].astype(str)))
    missing = sum(cell not in draws for cell in cells)
    if cells and not missing:
        return draws, ""
    if missing == len(cells):
        return None, SEEDS_ONLY
    return None, (f"Uncertainty covers seeds only: {missing} of {len(cells)} cells carry no per-image records "
                  "(eval_images.npz), and one method covers all arms of a table.")  # fmt: skip


def _mde_numbers(paired: pd.Series, own: dict[str, float], own_var: float) -> dict[str, Any]:
    """The MDE of mask AP: from the SD of the paired differences when there are ≥ 2 pairs, else the arm's own SD;
    either widened by the val-image variance (of Δ, or of the arm's mean) to `stats.effective_sd` when known."""
    if paired["n_pairs"] >= 2 and not math.isnan(paired["sd_diff"]):
        n, basis = int(paired["n_pairs"]), "paired"
        sd = effective_sd(n, float(paired["sd_diff"]), float(paired["sd_val"]) ** 2)
    else:
        n, basis = int(own["n"]), "arm"
        sd = effective_sd(n, float(own["sd"]), own_var)
    return {"mde_segm_AP": mde(n, sd), "mde_n": n, "mde_sd": sd, "mde_sd_basis": basis}


def axis_table(
    df: pd.DataFrame,
    axis: str,
    defaults: Mapping[str, str] | None = None,
    seed_rule: Mapping[str, Any] | None = None,
    val_draws: ImageDraws | None = None,
    mde_target: float | None = None,
) -> pd.DataFrame:
    """One ablation axis as a table of display strings: rows = arms (default first), columns as in the paper, then
    the seed SD, the val-image SD and the MDE of mask AP.

    `defaults` maps axes to default arms (`stats.default_arm`); `seed_rule` is `istr ablate`'s seed_rule.json;
    `val_draws`: the cells' mask AP on redraws of the val images (`val_noise.image_draws`; None: read from the
    axis's run dirs), used for the mask AP CI, p and MDE when every cell of the axis has them. `mde_target`: the
    MDE every arm should reach; a note names the arms above it and the seeds they would need.
    `table.attrs` carries `axis`, `default_arm`, `note` (how the default was chosen), `best` ({column: [row labels]}
    with the best mean, rendered bold by the writers), `footnotes` ({marker: text} for markers used), `notes` and
    `numbers` (one dict of plain numbers per row: what the CSV holds).
    """
    sub = df[df["axis"] == axis]
    base, note = default_arm(df, axis, defaults)
    arms = arm_order(df, axis, defaults)
    labels = [a + DEFAULT_SUFFIX if a == base else a for a in arms]
    draws, seeds_only = _table_draws(sub, val_draws)
    paired = paired_vs_default(sub, "segm_AP", base, draws).set_index("arm")
    p_col = P_COL if draws is None else P_VAL_COL

    rows: dict[str, dict[str, str]] = {}
    means: dict[str, dict[str, float]] = {}
    numbers: list[dict[str, Any]] = []
    for arm, label in zip(arms, labels):
        g = sub[sub["arm"] == arm]
        row: dict[str, str] = {}
        num: dict[str, Any] = {"arm": label, "is_default": arm == base}
        means[label] = {}
        own_var = val_variance(seed_mean_draws(g, "segm_AP", draws))
        for metric, col in METRIC_COLUMNS.items():
            m = describe(g[metric], own_var if metric == "segm_AP" and not math.isnan(own_var) else 0.0)
            num.update({f"{metric}_{k}": v for k, v in m.items()})
            row[col], means[label][col] = _fmt_cell(m["mean"], m["ci95"], m["n"]), m["mean"]
        pr = paired.loc[arm]
        num.update({"delta_segm_AP": math.nan if arm == base else float(pr["delta"]), "n_pairs": int(pr["n_pairs"]),
                    "sd_diff": float(pr["sd_diff"]), "sd_val": float(pr["sd_val"]), "se": float(pr["se"]),
                    "p": float(pr["p"])})  # fmt: skip
        if arm == base:
            row[DELTA_COL] = row[p_col] = BASE
        else:
            row[DELTA_COL] = DASH + MISSING if pr["n_pairs"] == 0 else f"{pr['delta']:+.1f} (n={int(pr['n_pairs'])})"
            if pr["n_pairs"] == 0:
                row[p_col] = DASH + MISSING
            elif math.isnan(pr["p"]):
                row[p_col] = DASH + NO_TEST
            else:
                row[p_col] = format_p(float(pr["p"]))
        num.update(_mde_numbers(pr, describe(g["segm_AP"]), own_var))
        row[SD_COL] = _fmt_num(num["segm_AP_sd"], 2, NO_TEST)
        row[VAL_SD_COL] = _fmt_num(num["sd_val"], 2, MISSING if draws is not None else NO_VAL)
        row[MDE_COL] = _fmt_num(num["mde_segm_AP"], 1, NO_TEST)
        if num["mde_sd_basis"] == "arm" and not math.isnan(num["mde_segm_AP"]):
            row[MDE_COL] += ARM_SD
        wall = g["wall_s"].dropna()
        ips = g["img_per_s"].dropna()
        num["cpu_gpu_hours"] = float(wall.sum() / 3600) if len(wall) else math.nan
        num["img_per_s"] = float(ips.mean()) if len(ips) else math.nan
        row[HOURS_COL] = _fmt_num(num["cpu_gpu_hours"], 2, MISSING)
        row[IPS_COL] = _fmt_num(num["img_per_s"], 1, MISSING)
        rows[label] = row
        numbers.append(num)

    columns = [*METRIC_COLUMNS.values(), DELTA_COL, p_col, SD_COL, VAL_SD_COL, MDE_COL, HOURS_COL, IPS_COL]
    table = pd.DataFrame.from_dict(rows, orient="index")[columns]
    table.index.name = "arm"
    best = _best_labels(means, METRIC_COLUMNS.values())
    used = "".join(table.to_numpy().ravel().astype(str))
    table.attrs = {
        "axis": axis,
        "default_arm": base,
        "note": note,
        "best": best,
        "footnotes": {m: t for m, t in FOOTNOTES.items() if m in used},
        "notes": [
            *AXIS_NOTES,
            seeds_only if draws is None else val_note(draws),
            code_note(sub),
            seed_note(seed_rule, axis),
            *([mde_target_note(numbers, mde_target)] if mde_target else []),
        ],
        "numbers": numbers,
    }
    return table


def _best_labels(means: dict[str, dict[str, float]], columns) -> dict[str, list[str]]:
    best: dict[str, list[str]] = {}
    for col in columns:
        vals = {lab: m[col] for lab, m in means.items() if col in m and not math.isnan(m[col])}
        if vals:
            top = max(vals.values())
            best[col] = [lab for lab, v in vals.items() if v == top]
    return best


def codec_table(
    df: pd.DataFrame,
    report: pd.DataFrame | None,
    defaults: Mapping[str, str] | None = None,
    val_draws: ImageDraws | None = None,
) -> pd.DataFrame | None:
    """Each trained codec's reconstruction upper bound beside its trained mask AP (docs/method.md#ablations).

    Rows = the (type, dim) codecs of the embedding axes' trials, the preset's default codec first; columns =
    val reconstruction IoU and oracle mask AP from `istr codec-report` (`report`; "—" when absent), the
    train-set IoU the trial's codec reported, the trained mask/box AP over seeds, and trained ÷ oracle AP.
    The mask AP CI adds the val-image variance of the seed mean when every trial has `val_draws` (as `axis_table`).
    None when no trial of a codec axis has codec columns. `table.attrs["numbers"]`: the rows as plain numbers.
    """
    trials = df[df["axis"].isin(CODEC_AXES)].dropna(subset=["codec_type", "codec_dim"])
    if trials.empty:
        return None
    axis = str(trials["axis"].iloc[0])
    default = trials[(trials["axis"] == axis) & (trials["arm"] == default_arm(trials, axis, defaults)[0])]
    sub = trials.drop_duplicates("cell_id")  # the default cell is a row of both codec axes
    draws, seeds_only = _table_draws(sub, val_draws)
    default_key = (str(default["codec_type"].iloc[0]), int(default["codec_dim"].iloc[0])) if len(default) else None
    order = {t: i for i, t in enumerate(CODEC_ORDER)}
    keys = sorted({(str(t), int(d)) for t, d in zip(sub["codec_type"], sub["codec_dim"])},
                  key=lambda k: (k != default_key, order.get(k[0], len(order)), k[0], k[1]))  # fmt: skip
    rows: dict[str, dict[str, str]] = {}
    means: dict[str, dict[str, float]] = {}
    numbers: list[dict[str, Any]] = []
    for ctype, dim in keys:
        g = sub[(sub["codec_type"] == ctype) & (sub["codec_dim"] == dim)]
        label = f"{ctype}-{dim}" + (DEFAULT_SUFFIX if (ctype, dim) == default_key else "")
        match = report[(report["type"] == ctype) & (report["dim"] == dim)] if report is not None else pd.DataFrame()
        val_iou = float(match["mask_iou"].iloc[0]) if len(match) else math.nan
        oracle = float(match["oracle_segm_AP"].iloc[0]) if len(match) else math.nan
        train_iou = g["codec_iou"].dropna()
        row = {
            "recon IoU (val)": DASH + MISSING if math.isnan(val_iou) else f"{val_iou:.3f}",
            "oracle mask AP": DASH + MISSING if math.isnan(oracle) else f"{oracle:.1f}",
            "recon IoU (train)": f"{train_iou.mean():.3f}" if len(train_iou) else DASH + MISSING,
        }
        own_var = val_variance(seed_mean_draws(g, "segm_AP", draws))
        mask, box = describe(g["segm_AP"], 0.0 if math.isnan(own_var) else own_var), describe(g["bbox_AP"])
        row["trained mask AP"] = _fmt_cell(mask["mean"], mask["ci95"], mask["n"])
        row["trained box AP"] = _fmt_cell(box["mean"], box["ci95"], box["n"])
        mask_ap, box_ap = mask["mean"], box["mean"]
        ratio = mask_ap / oracle if oracle > 0 and not math.isnan(mask_ap) else math.nan
        row["trained / oracle"] = DASH + MISSING if math.isnan(ratio) else f"{100 * ratio:.0f}%"
        rows[label] = row
        numbers.append({"codec": label, "type": ctype, "dim": dim, "val_iou": val_iou, "oracle_segm_AP": oracle,
                        "train_iou": float(train_iou.mean()) if len(train_iou) else math.nan,
                        **{f"segm_AP_{k}": v for k, v in mask.items()}, **{f"bbox_AP_{k}": v for k, v in box.items()},
                        "trained_over_oracle": ratio})  # fmt: skip
        means[label] = {"recon IoU (val)": val_iou, "oracle mask AP": oracle, "trained mask AP": mask_ap,
                        "trained box AP": box_ap}  # fmt: skip
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "codec"
    used = "".join(table.to_numpy().ravel().astype(str))
    table.attrs = {
        "axis": "codec_upper_bound",
        "default_arm": f"{default_key[0]}-{default_key[1]}" if default_key else "",
        "note": "Codec reconstruction upper bound (istr codec-report, val split) beside the trained mask AP.",
        "best": _best_labels(means, ["recon IoU (val)", "oracle mask AP", "trained mask AP", "trained box AP"]),
        "footnotes": {m: t for m, t in FOOTNOTES.items() if m in used},
        "notes": [
            "recon IoU: mean mask IoU of decode(encode(m)) vs m on 28x28 box crops; oracle mask AP: COCOeval of "
            "GT boxes with codec-reconstructed GT masks (what a perfect regressor reaches with this codec).",
            "trained: mean ± 95% CI half-width (t-distribution, n−1 df); bold = best per column.",
            seeds_only if draws is None else codec_val_note(draws),
            code_note(sub),
        ],
        "numbers": numbers,
    }
    return table


def write_tables(
    df: pd.DataFrame,
    out: Path,
    codec_report: pd.DataFrame | None = None,
    defaults: Mapping[str, str] | None = None,
    seed_rule: Mapping[str, Any] | None = None,
    mde_target: float | None = None,
) -> dict[str, pd.DataFrame]:
    """Write `<axis>.md/.tex/.csv` into `out` for every axis in `df` (+ `codec_upper_bound.*` when the
    embedding axes have codec columns); returns {name: table}. `defaults`, `seed_rule`, `mde_target`: as in
    `axis_table`.
    The val-image draws of every cell are computed once, here (`val_noise.image_draws`)."""
    out.mkdir(parents=True, exist_ok=True)
    draws = image_draws(df)
    tables = {axis: axis_table(df, axis, defaults, seed_rule, draws, mde_target)
              for axis in sorted(df["axis"].dropna().unique())}  # fmt: skip
    codecs = codec_table(df, codec_report, defaults, draws)
    if codecs is not None:
        tables["codec_upper_bound"] = codecs
    for name, table in tables.items():
        write_table(table, out, name)
    return tables


def format_tables(tables: Mapping[str, pd.DataFrame]) -> str:
    """Every table as a `## name` section: its note, then its Markdown."""
    return "\n".join(f"## {name}\n\n{table.attrs['note']}\n\n{to_markdown(table)}" for name, table in tables.items())


def main(argv: list[str] | None = None) -> int:
    args, df = results_from_cli("python -m analysis.tables", __doc__.splitlines()[0], Path("results"), argv)
    if df is None:
        return 2
    tables = write_tables(df, args.out, load_codec_report(args.codec_report), args.defaults, args.seed_rule)
    print(format_tables(tables))
    print(f"tables written to {args.out}/ ({', '.join(f'{n}.md/.tex/.csv' for n in tables)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
