"""Power of the paired t-test: the MDE and the needed n against published values and hand computations."""

from __future__ import annotations

import math

import pytest
from scipy import optimize, stats

from analysis.stats import ALPHA, POWER, mde, mde_effect_size, needed_n, paired_power


def test_power_at_zero_effect_is_alpha() -> None:
    assert paired_power(0.0, 10) == pytest.approx(ALPHA)
    assert paired_power(-1.0, 10) == pytest.approx(paired_power(1.0, 10))  # two-sided


def test_power_matches_published_tables() -> None:
    # statsmodels TTestPower().power(effect_size=1, nobs=10, alpha=0.05) = 0.8031 (G*Power, one-sample/paired,
    # two-tailed: 0.8030969); a Monte Carlo of 200 000 paired samples here gave 0.8034.
    assert paired_power(1.0, 10) == pytest.approx(0.8031, abs=1e-4)
    assert paired_power(1.0, 9) < POWER < paired_power(1.0, 10)


@pytest.mark.parametrize(
    ("d", "continuous_n", "n"),
    [
        # statsmodels TTestPower().solve_power(effect_size=d, alpha=0.05, power=0.8): 9.94 and 33.37;
        # Cohen (1988) Table 2.4.1 / G*Power "Means: difference from constant", two-tailed: 10, 34 and 199.
        (1.0, 9.94, 10),
        (0.5, 33.37, 34),
        (0.2, 198.15, 199),
    ],
)
def test_needed_n_against_published_values(d: float, continuous_n: float, n: int) -> None:
    solved = optimize.brentq(lambda x: paired_power(d, x) - POWER, 2, 1000)
    assert solved == pytest.approx(continuous_n, abs=0.01)
    assert needed_n(delta=d, sd=1.0) == n
    assert needed_n(delta=2 * d, sd=2.0) == n  # only Δ/SD matters


def test_needed_n_edges() -> None:
    assert needed_n(1.0, 0.0) == 2  # identical differences: the least that can be tested
    assert needed_n(1.0, 1000.0, n_max=50) == 50
    with pytest.raises(ValueError, match="delta"):
        needed_n(0.0, 1.0)
    with pytest.raises(ValueError, match="sd"):
        needed_n(1.0, math.nan)


def test_mde_inverts_the_power_and_approaches_the_normal_formula() -> None:
    for n in (2, 3, 5, 10, 34):
        assert paired_power(mde_effect_size(n), n) == pytest.approx(POWER, abs=1e-8)
    assert mde_effect_size(9) > 1.0 > mde_effect_size(10)  # n = 10 detects d = 1 (power 0.803), n = 9 does not
    # large n: d = (z_0.975 + z_0.8) / sqrt(n) = (1.95996 + 0.84162) / sqrt(1000) = 0.08859
    assert mde_effect_size(1000) == pytest.approx(0.08859, rel=0.01)
    assert mde(10, 2.5) == pytest.approx(2.5 * mde_effect_size(10))
    assert math.isnan(mde(1, 2.0)) and math.isnan(mde(5, math.nan)) and math.isnan(mde_effect_size(1))


def test_mde_shrinks_with_n() -> None:
    ds = [mde_effect_size(n) for n in (2, 3, 5, 10, 20)]
    assert ds == sorted(ds, reverse=True)
    assert stats.t.ppf(0.975, 1) < ds[0] * math.sqrt(2)  # n = 2: beyond the critical t (12.7) at nc = d·√2
