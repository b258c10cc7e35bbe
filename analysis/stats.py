"""Per-arm summaries over seeds (t-distribution CI) and paired comparisons to the default arm."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

# The paper's default arm of each ablation axis. An axis not listed falls back to its first arm
# (`arm_sort_key` order).
DEFAULT_ARMS: dict[str, str] = {
    "embedding": "pca",
    "embedding_dim": "60",
    "mask_cost": "cosine",
    "loss": "l2+dice",
    "attention": "self+dynamic",
}


def arm_sort_key(arm: str) -> tuple[int, float, str]:
    """Numeric arms (codec dims) in numeric order, then the others alphabetically."""
    try:
        return 0, float(arm), ""
    except ValueError:
        return 1, 0.0, arm


def arm_order(df: pd.DataFrame, axis: str) -> list[str]:
    """The arms of `axis`: its default arm first, then `arm_sort_key` order."""
    base, _ = default_arm(df, axis)
    return [base] + sorted((a for a in df.loc[df["axis"] == axis, "arm"].dropna().unique() if a != base),
                           key=arm_sort_key)  # fmt: skip


def default_arm(df: pd.DataFrame, axis: str) -> tuple[str, str]:
    """The default arm for `axis` and a note on how it was chosen.

    If the mapped default (e.g. `pca`) is absent but exactly one arm is `<default>-...` (`pca-60`), that arm is used.
    """
    arms = sorted((str(a) for a in df.loc[df["axis"] == axis, "arm"].dropna().unique()), key=arm_sort_key)
    if not arms:
        raise ValueError(f"axis {axis!r} has no rows")
    mapped = DEFAULT_ARMS.get(axis)
    if mapped is not None:
        if mapped in arms:
            return mapped, f"default arm of {axis!r} is {mapped!r} (DEFAULT_ARMS)"
        prefixed = [a for a in arms if a.startswith(mapped + "-")]
        if len(prefixed) == 1:
            return prefixed[0], f"default arm of {axis!r} is {prefixed[0]!r} (DEFAULT_ARMS {mapped!r})"
    note = "no known default arm present; using the first arm (numbers ascending, then alphabetically)"
    return arms[0], f"axis {axis!r}: {note}, {arms[0]!r}"


def ci_halfwidth(values: np.ndarray | pd.Series, confidence: float = 0.95) -> float:
    """Half-width of the two-sided t-distribution CI of the mean; NaN when n < 2."""
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    if n < 2:
        return math.nan
    sd = float(np.std(x, ddof=1))
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def summarize(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (axis, arm): n (seeds with a defined value), mean, sd and 95% CI half-width (t-distribution)."""
    rows = []
    for (axis, arm), g in df.groupby(["axis", "arm"], sort=True):
        x = g[metric].dropna().astype(float)
        n = len(x)
        rows.append(
            {
                "axis": axis,
                "arm": arm,
                "n": n,
                "mean": float(x.mean()) if n else math.nan,
                "sd": float(x.std(ddof=1)) if n > 1 else math.nan,
                "ci95": ci_halfwidth(x),
            }
        )
    return pd.DataFrame(rows, columns=["axis", "arm", "n", "mean", "sd", "ci95"])


def paired_vs_default(df: pd.DataFrame, metric: str, default_arm: str) -> pd.DataFrame:
    """Per arm: mean of (arm - default) over seeds where both have a value, and the paired t-test p-value.

    `df` should hold one axis. Test: `scipy.stats.ttest_rel` (two-sided); p is NaN with fewer than 2 pairs.
    """
    per_seed = df.pivot_table(index="seed", columns="arm", values=metric, aggfunc="mean")
    rows = []
    for arm in sorted(df["arm"].dropna().unique()):
        if default_arm not in per_seed.columns or arm not in per_seed.columns:
            rows.append({"arm": arm, "n_pairs": 0, "delta": math.nan, "p": math.nan})
            continue
        pair = per_seed[[arm, default_arm]].dropna() if arm != default_arm else per_seed[[arm]].dropna()
        if arm == default_arm:
            n = len(pair)
            rows.append({"arm": arm, "n_pairs": n, "delta": 0.0 if n else math.nan, "p": math.nan})
            continue
        n = len(pair)
        diff = pair[arm] - pair[default_arm]
        p = math.nan
        if n >= 2:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p = float(stats.ttest_rel(pair[arm], pair[default_arm]).pvalue)
        rows.append({"arm": arm, "n_pairs": n, "delta": float(diff.mean()) if n else math.nan, "p": p})
    return pd.DataFrame(rows, columns=["arm", "n_pairs", "delta", "p"])
