"""Per-axis figures: mask AP per arm with its 95% CI (t-distribution over seeds), as PNG + PDF.

CLI: `python -m analysis.plots --runs runs/sweeps [--studies a,b] --out results/figures/`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.load import results_from_cli  # noqa: E402
from analysis.stats import ci_halfwidth, default_arm  # noqa: E402


def _t_ci(x: pd.Series) -> tuple[float, float]:
    """seaborn errorbar callable: mean ± t-distribution 95% CI half-width (no bar when n == 1)."""
    m, h = float(x.mean()), ci_halfwidth(x)
    return (m, m) if h != h else (m - h, m + h)


def axis_pointplot(df: pd.DataFrame, axis: str, metric: str = "segm_AP") -> plt.Figure:
    """Point plot of `metric` per arm of `axis` (default arm first), error bars = 95% t CI over seeds."""
    sub = df[(df["axis"] == axis) & df[metric].notna()]
    base, _ = default_arm(df, axis)
    order = [base] + sorted(a for a in sub["arm"].unique() if a != base)
    fig, ax = plt.subplots(figsize=(1.2 + 1.0 * len(order), 3.2))
    sns.pointplot(data=sub, x="arm", y=metric, order=order, errorbar=_t_ci, linestyle="none", capsize=0.2, ax=ax)
    ax.set_xticks(range(len(order)), [a + "\n(default)" if a == base else a for a in order])
    ax.set_xlabel(axis)
    ax.set_ylabel("mask AP (%)" if metric == "segm_AP" else metric)
    ax.set_title(f"{axis}: mean ± 95% CI over seeds")
    fig.tight_layout()
    return fig


def write_figures(df: pd.DataFrame, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for axis in sorted(df["axis"].dropna().unique()):
        fig = axis_pointplot(df, axis)
        for ext in ("png", "pdf"):
            path = out / f"{axis}_mask_ap.{ext}"
            fig.savefig(path, dpi=150)
            written.append(path)
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    args, df = results_from_cli("python -m analysis.plots", __doc__.splitlines()[0], Path("results/figures"), argv)
    if df is None:
        return 2
    paths = write_figures(df, args.out)
    print(f"figures written to {args.out}/: {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
