"""Per-arm summaries over seeds (t-distribution CI), paired comparisons to the default arm, and the power of those
comparisons: the minimum detectable effect (MDE) at the n used, and the n needed to detect a stated Δ.

Given each cell's metric on the same redraws of the val images (`analysis.val_noise`), the CI, the paired test and
the MDE also cover the val images (variance components: seed variance / n + the variance over the redraws)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import optimize, stats

ALPHA = 0.05  # two-sided significance level of every paired test here
POWER = 0.8  # power at which the MDE and the needed n are stated


def arm_sort_key(arm: str) -> tuple[int, float, str]:
    """Numeric arms (codec dims) in numeric order, then the others alphabetically."""
    try:
        return 0, float(arm), ""
    except ValueError:
        return 1, 0.0, arm


def arm_order(df: pd.DataFrame, axis: str, defaults: Mapping[str, str] | None = None) -> list[str]:
    """The arms of `axis`: its default arm first, then `arm_sort_key` order."""
    base, _ = default_arm(df, axis, defaults)
    return [base] + sorted((a for a in df.loc[df["axis"] == axis, "arm"].dropna().unique() if a != base),
                           key=arm_sort_key)  # fmt: skip


def default_arm(df: pd.DataFrame, axis: str, defaults: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The default arm for `axis` and a note on how it was chosen.

    `defaults` maps an axis to its default arm: the base preset's own value of the axis key
    (`analysis.load.read_axes`, or the caller's). If that arm (e.g. `pca`) is absent but exactly one arm is
    `<default>-...` (`pca-60`), that arm is used; otherwise the first arm in `arm_sort_key` order.
    """
    arms = sorted((str(a) for a in df.loc[df["axis"] == axis, "arm"].dropna().unique()), key=arm_sort_key)
    if not arms:
        raise ValueError(f"axis {axis!r} has no rows")
    mapped = (defaults or {}).get(axis)
    if mapped is not None:
        if mapped in arms:
            return mapped, f"default arm of {axis!r} is {mapped!r} (the base preset's value)"
        prefixed = [a for a in arms if a.startswith(mapped + "-")]
        if len(prefixed) == 1:
            return prefixed[0], f"default arm of {axis!r} is {prefixed[0]!r} (the base preset's {mapped!r})"
    note = "no known default arm present; using the first arm (numbers ascending, then alphabetically)"
    return arms[0], f"axis {axis!r}: {note}, {arms[0]!r}"


def ci_halfwidth(values: np.ndarray | pd.Series, confidence: float = 0.95, var_val: float = 0.0) -> float:
    """Half-width of the two-sided t CI of the mean, t_{n-1} · √(sd²/n + var_val); NaN when n < 2.

    `var_val`: the val-image variance of the mean (`seed_mean_draws`), so the CI covers a redrawn val set too.
    """
    x = np.asarray(pd.Series(values).dropna(), dtype=float)
    n = len(x)
    if n < 2:
        return math.nan
    sd = float(np.std(x, ddof=1))
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * math.sqrt(sd**2 / n + var_val))


def describe(values: pd.Series, var_val: float = 0.0) -> dict[str, float]:
    """n (values defined), mean, sd (ddof=1) and 95% CI half-width (t-distribution, with the val-image variance
    `var_val` of the mean added to the seed variance sd²/n); NaN where undefined."""
    x = values.dropna().astype(float)
    n = len(x)
    return {
        "n": n,
        "mean": float(x.mean()) if n else math.nan,
        "sd": float(x.std(ddof=1)) if n > 1 else math.nan,
        "ci95": ci_halfwidth(x, var_val=var_val),
    }


def summarize(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (axis, arm): `describe` of `metric` over the seeds."""
    rows = [{"axis": axis, "arm": arm, **describe(g[metric])} for (axis, arm), g in df.groupby(["axis", "arm"])]
    return pd.DataFrame(rows, columns=["axis", "arm", "n", "mean", "sd", "ci95"])


def seed_mean_draws(
    df: pd.DataFrame, metric: str, val_draws: Mapping[str, np.ndarray] | None, seeds: list | None = None
) -> np.ndarray | None:
    """[draws] the seed mean of `metric` on each val-image redraw, over the rows of `df` (one arm) with a defined
    `metric` (only `seeds`, if given; a seed's several cells averaged first, as `paired_vs_default` does); None
    when there are no draws or a cell has none (then only the seed noise is known)."""
    rows = df.dropna(subset=[metric])
    if seeds is not None:
        rows = rows[rows["seed"].isin(seeds)]
    if not val_draws or rows.empty or not all(str(c) in val_draws for c in rows["cell_id"]):
        return None
    per_seed = [np.mean([val_draws[str(c)] for c in g["cell_id"]], axis=0) for _, g in rows.groupby("seed")]
    return np.mean(per_seed, axis=0)


def val_variance(draws: np.ndarray | None) -> float:
    """The variance (ddof=1) over the redraws of the val images; NaN without draws."""
    return float(np.var(draws, ddof=1)) if draws is not None and len(draws) > 1 else math.nan


def paired_vs_default(
    df: pd.DataFrame, metric: str, default_arm: str, val_draws: Mapping[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """Per arm: mean and SD of (arm - default) over seeds where both have a value, its standard error and p-value.

    `df` should hold one axis. Seed noise only (no `val_draws`, or a paired cell without draws): the paired t-test
    (`scipy.stats.ttest_rel`, two-sided), se = sd_diff/√n, sd_val NaN. With `val_draws` ({cell_id: `metric` on the
    same redraws of the val images}, `analysis.val_noise.image_draws`) the verdict also covers the val images, by
    variance components: var_val = Var_b(mean_s(arm[s, b] - default[s, b])) over the redraws b of the paired seeds'
    seed-averaged difference, se = √(sd_diff²/n + var_val), p two-sided from t with n - 1 df on Δ/se. That is
    conservative: sd_diff already holds the seed × image interaction that var_val counts again.
    p, SD and se are NaN with fewer than 2 pairs. The default arm's own row has n_pairs = its seed count, NaN SD
    and se (nothing to pair with) and sd_val = the SD over redraws of its seed mean.
    """
    per_seed = df.pivot_table(index="seed", columns="arm", values=metric, aggfunc="mean")
    columns = ["arm", "n_pairs", "delta", "sd_diff", "sd_val", "se", "p"]
    nan = math.nan
    rows = []
    for arm in sorted(df["arm"].dropna().unique()):
        if default_arm not in per_seed.columns or arm not in per_seed.columns:
            rows.append({"arm": arm, "n_pairs": 0, "delta": nan, "sd_diff": nan, "sd_val": nan, "se": nan, "p": nan})
            continue
        if arm == default_arm:
            n = len(per_seed[arm].dropna())
            sd_val = math.sqrt(val_variance(seed_mean_draws(df[df["arm"] == arm], metric, val_draws)))
            rows.append({"arm": arm, "n_pairs": n, "delta": 0.0 if n else nan, "sd_diff": nan, "sd_val": sd_val,
                         "se": nan, "p": nan})  # fmt: skip
            continue
        pair = per_seed[[arm, default_arm]].dropna()
        n = len(pair)
        diff = pair[arm] - pair[default_arm]
        sd_diff = float(diff.std(ddof=1)) if n >= 2 else nan
        seeds = list(pair.index)
        draws_arm = seed_mean_draws(df[df["arm"] == arm], metric, val_draws, seeds)
        draws_base = seed_mean_draws(df[df["arm"] == default_arm], metric, val_draws, seeds)
        var_val = val_variance(None if draws_arm is None or draws_base is None else draws_arm - draws_base)
        p = nan
        if math.isnan(var_val):
            se = sd_diff / math.sqrt(n) if n >= 2 else nan
            if n >= 2:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    p = float(stats.ttest_rel(pair[arm], pair[default_arm]).pvalue)
        else:
            se = math.sqrt(sd_diff**2 / n + var_val) if n >= 2 else nan
            if se > 0:
                p = float(2 * stats.t.sf(abs(float(diff.mean())) / se, n - 1))
        rows.append({"arm": arm, "n_pairs": n, "delta": float(diff.mean()) if n else nan, "sd_diff": sd_diff,
                     "sd_val": math.sqrt(var_val), "se": se, "p": p})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def effective_sd(n: int, sd: float, var_val: float) -> float:
    """The SD whose `mde(n, ·)` covers seeds and val images: √(sd² + n·var_val), as se² = (sd² + n·var_val)/n;
    `sd` itself when `var_val` is NaN (no draws)."""
    return sd if math.isnan(var_val) else math.sqrt(sd**2 + n * var_val)


def paired_power(d: float, n: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with `n` pairs when the true effect is `d` SDs of the paired differences.

    The test statistic follows a noncentral t with n - 1 degrees of freedom and noncentrality d·√n; power is its
    mass beyond ±t_crit (`scipy.stats.nct`). `n` may be fractional (the continuous solution of the needed n).
    The lower tail P(T ≤ -t_crit | nc) is taken as P(T ≥ t_crit | -nc): scipy's `nct.cdf` returns NaN there for
    some large nc, its `sf` does not.
    """
    dof = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, dof))
    nc = abs(d) * math.sqrt(n)
    return float(stats.nct.sf(crit, dof, nc) + stats.nct.sf(crit, dof, -nc))


def mde_effect_size(n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The standardized effect d (Δ / SD of the paired differences) that a two-sided paired t-test with `n` pairs
    detects with probability `power`; NaN when n < 2 (no test)."""
    if n < 2:
        return math.nan
    hi = 1.0
    while paired_power(hi, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: paired_power(d, n, alpha) - power, 0.0, hi, xtol=1e-10))


def mde(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect in the metric's units: `mde_effect_size(n)` × `sd` (NaN when either is undefined)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return mde_effect_size(n, alpha, power) * sd


def needed_n(delta: float, sd: float, alpha: float = ALPHA, power: float = POWER, n_max: int = 10_000) -> int:
    """The smallest number of pairs (≥ 2) whose two-sided paired t-test detects a true difference `delta` with
    probability `power`, given the SD `sd` of the paired differences (e.g. a pilot's); at most `n_max`.

    sd == 0 means every pair differs by the same amount: 2 pairs are the least that can be tested.
    """
    if delta <= 0 or not math.isfinite(sd) or sd < 0:
        raise ValueError(f"needed_n: delta must be > 0 and sd finite and >= 0 (got delta={delta}, sd={sd})")
    if sd == 0:
        return 2
    d = delta / sd
    lo, hi = 2, 2
    while paired_power(d, hi, alpha) < power:  # doubling, then bisection: power rises with n
        if hi >= n_max:
            return n_max
        lo, hi = hi, min(2 * hi, n_max)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if paired_power(d, mid, alpha) < power else (lo, mid)
    return hi
