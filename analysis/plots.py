"""The paper's ablation figures as PNG + PDF: per axis mask AP per arm (95% t-CI over seeds), learning curves
per arm, mask AP and reconstruction IoU vs codec dimension. Only result files are read; the prediction
overlays, which run models, are drawn by `istr.reports.overlays` (called by `istr ablate`).

CLI: `python -m analysis.plots --runs runs/sweeps [--studies a,b] [--codec-report CSV] --out results/figures/`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.load import load_codec_report, results_from_cli  # noqa: E402
from analysis.stats import arm_order, ci_halfwidth, default_arm  # noqa: E402
from istr.results import METRICS_FILE  # noqa: E402


def _t_ci(x: pd.Series) -> tuple[float, float]:
    """seaborn errorbar callable: mean ± t-distribution 95% CI half-width (no bar when n == 1)."""
    m, h = float(x.mean()), ci_halfwidth(x)
    return (m, m) if h != h else (m - h, m + h)


def axis_pointplot(
    df: pd.DataFrame, axis: str, metric: str = "segm_AP", defaults: Mapping[str, str] | None = None
) -> plt.Figure:
    """Point plot of `metric` per arm of `axis` (default arm first), error bars = 95% t CI over seeds."""
    sub = df[(df["axis"] == axis) & df[metric].notna()]
    base, _ = default_arm(df, axis, defaults)
    order = [a for a in arm_order(df, axis, defaults) if a in set(sub["arm"])]
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(order), 3.2))
    sns.pointplot(data=sub, x="arm", y=metric, order=order, errorbar=_t_ci, linestyle="none", capsize=0.2, ax=ax)
    ax.set_xticks(range(len(order)), [a + "\n(default)" if a == base else a for a in order])
    ax.set_xlabel(axis)
    ax.set_ylabel("mask AP (%)" if metric == "segm_AP" else metric)
    ax.set_title(f"{axis}: mean ± 95% CI over seeds")
    fig.tight_layout()
    return fig


def read_curves(df: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Per-step `loss` (and `eval/segm_AP` where logged) of every trial of `axis`, from its run's metrics.jsonl."""
    frames = []
    for row in df[df["axis"] == axis].itertuples():
        path = Path(str(row.run_dir)) / METRICS_FILE
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        curve = pd.DataFrame(records)
        if "step" not in curve or "loss" not in curve:
            continue
        # eval and train metrics of one step are separate lines, and a resumed run re-logs steps: merge per step
        curve = curve.groupby("step", as_index=False).last()
        curve["arm"], curve["seed"] = row.arm, row.seed
        frames.append(curve)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def learning_curves(df: pd.DataFrame, axis: str, defaults: Mapping[str, str] | None = None) -> plt.Figure | None:
    """Training loss vs step per arm (mean over seeds, band = 95% t-CI); mask AP vs step too when it was logged."""
    curves = read_curves(df, axis)
    if curves.empty:
        return None
    has_ap = "eval/segm_AP" in curves and curves["eval/segm_AP"].notna().any()
    fig, axes = plt.subplots(1, 2 if has_ap else 1, figsize=(9.5 if has_ap else 5.0, 3.4), squeeze=False)
    smooth = max(1, int(curves["step"].max()) // 50)  # per-step losses are noisy: rolling mean over ~2% of steps
    curves["loss (smoothed)"] = curves.groupby(["arm", "seed"])["loss"].transform(
        lambda x: x.rolling(smooth, min_periods=1).mean()
    )
    order = arm_order(df, axis, defaults)
    sns.lineplot(data=curves, x="step", y="loss (smoothed)", hue="arm", hue_order=order, errorbar=_t_ci, ax=axes[0, 0])
    if has_ap:
        ap = curves.dropna(subset=["eval/segm_AP"])
        sns.lineplot(data=ap, x="step", y="eval/segm_AP", hue="arm", hue_order=order, errorbar=_t_ci, marker="o",
                     ax=axes[0, 1])  # fmt: skip
        axes[0, 1].set_ylabel("mask AP (%)")
    fig.suptitle(f"{axis}: learning curves (mean over seeds)")
    fig.tight_layout()
    return fig


def codec_dim_figure(df: pd.DataFrame, report: pd.DataFrame | None) -> plt.Figure | None:
    """Trained mask AP vs codec dim (the `embedding_dim` axis) beside reconstruction IoU vs dim
    (docs/method.md#ablations).

    IoU comes from `istr codec-report` (val split, every codec type in it) or, without a report, from the
    trials' own codec fit (train split). None when neither has two or more dims.
    """
    trained = df[(df["axis"] == "embedding_dim") & df["segm_AP"].notna() & df["codec_dim"].notna()]
    if report is not None and report["dim"].nunique() > 1:
        iou, iou_label = report.dropna(subset=["mask_iou"]).rename(columns={"type": "codec"}), "val (codec-report)"
    else:
        iou = df[df["codec_dim"].notna() & df["codec_iou"].notna()].drop_duplicates("cell_id")
        iou = iou.rename(columns={"codec_type": "codec", "codec_dim": "dim", "codec_iou": "mask_iou"})
        iou_label = "train (trial codec fit)"
    if trained["codec_dim"].nunique() < 2 and iou["dim"].nunique() < 2:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 3.4))
    if len(trained):
        sns.pointplot(data=trained.astype({"codec_dim": int}), x="codec_dim", y="segm_AP", errorbar=_t_ci,
                      capsize=0.2, ax=left)  # fmt: skip
    left.set_xlabel("codec dim l")
    left.set_ylabel("trained mask AP (%)")
    left.set_title("mask AP vs dim (mean ± 95% CI)")
    sns.lineplot(data=iou, x="dim", y="mask_iou", hue="codec", marker="o", errorbar=None, ax=right)
    right.set_xlabel("codec dim l")
    right.set_ylabel("reconstruction mask IoU")
    right.set_title(f"reconstruction IoU vs dim, {iou_label}")
    fig.tight_layout()
    return fig


def save_figure(fig: plt.Figure, out: Path, stem: str) -> list[Path]:
    """``fig`` as ``out/<stem>.png`` and ``.pdf`` (closed afterwards), without a creation date: the same results
    give the same bytes."""
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:
        fig.savefig(path, dpi=150, metadata={"CreationDate": None} if path.suffix == ".pdf" else None)
    plt.close(fig)
    return paths


def write_figures(
    df: pd.DataFrame, out: Path, codec_report: pd.DataFrame | None = None, defaults: Mapping[str, str] | None = None
) -> list[Path]:
    """Every figure the results frame supports (the prediction overlays run models: `istr.reports.overlays`).

    `defaults`: {axis: default arm} (`analysis.stats.default_arm`)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for axis in sorted(df["axis"].dropna().unique()):
        written += save_figure(axis_pointplot(df, axis, defaults=defaults), out, f"{axis}_mask_ap")
        curves = learning_curves(df, axis, defaults)
        if curves is not None:
            written += save_figure(curves, out, f"{axis}_learning_curves")
    dims = codec_dim_figure(df, codec_report)
    if dims is not None:
        written += save_figure(dims, out, "codec_dim")
    return written


def main(argv: list[str] | None = None) -> int:
    args, df = results_from_cli("python -m analysis.plots", __doc__.splitlines()[0], Path("results/figures"), argv)
    if df is None:
        return 2
    paths = write_figures(df, args.out, load_codec_report(args.codec_report), defaults=args.defaults)
    print(f"figures written to {args.out}/: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
