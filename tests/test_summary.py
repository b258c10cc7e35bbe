"""The ablation summary (analysis/summary.py): a verdict per axis on the paper's claim that its default is best."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.summary import ABLATION_SUMMARY_FILE, axis_summary, verdict, write_summary

NAN = math.nan


def numbers(*others: tuple[str, float, float, float], n: int = 5) -> pd.DataFrame:
    """The default arm and `others` as (arm, Δ mask AP, p, MDE): the columns a table's CSV holds."""
    rows = [{"arm": "base (default)", "is_default": True, "segm_AP_n": n, "segm_AP_mean": 26.5, "segm_AP_ci95": 2.9,
             "delta_segm_AP": NAN, "p": NAN, "mde_segm_AP": 3.9, "cpu_gpu_hours": 0.5}]  # fmt: skip
    rows += [{"arm": arm, "is_default": False, "segm_AP_n": n, "segm_AP_mean": 26.5 + delta, "segm_AP_ci95": 2.5,
              "delta_segm_AP": delta, "p": p, "mde_segm_AP": mde, "cpu_gpu_hours": 0.3}
             for arm, delta, p, mde in others]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("others", "expected"),
    [
        ([("a", -1.0, 0.3, 3.2), ("b", 1.1, 0.5, 5.3)], "**not separable at n = 5, MDE = 3.2–5.3 AP**"),
        ([("a", -4.0, 0.01, 3.0), ("b", -9.0, 0.0001, 2.0)],
         "**reproduced**: a below the default by 4.0 AP (p 0.010); b below the default by 9.0 AP (p <0.001)"),
        ([("a", -4.0, 0.01, 3.0), ("b", 0.5, 0.6, 4.4)],
         "**partly reproduced**: a below the default by 4.0 AP (p 0.010); b not separable at n = 5 (MDE ≤ 4.4 AP)"),
        ([("a", -4.0, 0.01, 3.0), ("b", 3.5, 0.02, 3.1)],
         "**reversed**: a below the default by 4.0 AP (p 0.010); b above the default by 3.5 AP (p 0.020)"),
    ],
)
def test_verdict_against_the_paper(others, expected: str) -> None:
    table = numbers(*others)
    assert verdict(table, cells=15, expected=15) == expected


def test_an_unfinished_axis_gets_no_verdict() -> None:
    table = numbers(("a", -9.0, 0.0001, 2.0))
    assert verdict(table, cells=9, expected=10) == "not run in full yet: 9 of 10 cells, shown as they are"


def test_axis_summary_rows(tmp_path) -> None:
    table = numbers(("dct", -22.3, 0.0002, 3.9), ("ae", NAN, NAN, NAN))
    table.loc[2, "segm_AP_n"] = 0
    text = axis_summary("embedding", table, expected=15)
    assert text.startswith("**Mask embedding (type, l = 60)** (`embedding`). Verdict: not run in full yet: 10 of 15")
    assert "1.1 CPU/GPU-hours" in text
    assert "| base (default) | 26.5 ± 2.9 |  |  | 3.9 | 5 |" in text
    assert "| dct | 4.2 ± 2.5 | -22.3 | <0.001 | 3.9 | 5 |" in text
    assert "| ae | — | — |  | — | 0 |" in text
    tables = {"embedding": pd.DataFrame(), "loss": pd.DataFrame()}
    tables["embedding"].attrs["numbers"] = table.to_dict("list")
    tables["loss"].attrs["numbers"] = numbers(("l2", -1.0, 0.3, 2.0)).to_dict("list")
    path = write_summary(tables, {"loss": 10, "embedding": 15, "attention": 15}, tmp_path)
    assert path == tmp_path / ABLATION_SUMMARY_FILE
    blocks = path.read_text().split("\n\n**")
    assert [b.split("`")[1] for b in blocks] == ["loss", "embedding"]  # the order asked for; no table, no block
