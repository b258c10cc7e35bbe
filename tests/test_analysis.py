"""Analysis package: stats equal scipy's, tables render honestly (— for missing, n=1 without CI), the CSV holds
numbers, default arms come from the presets, CLI writes files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.load import COLUMNS, NoResultsError, load_results, normalize, read_axes
from analysis.notes import DASH
from analysis.render import to_csv, to_latex, to_markdown
from analysis.stats import default_arm, mde, needed_n, paired_vs_default, summarize
from analysis.tables import axis_table, main
from istr.config import load_config
from istr.results import METRICS
from tests.conftest import REPO

DEFAULTS = read_axes(REPO / "sweeps")[1]  # the tiny preset's own values of the axis keys
BASE_VALUES = {0: 30.0, 1: 31.5, 2: 29.0}
OTHER_VALUES = {0: 32.0, 1: 32.1, 2: 30.5}


def _rows(axis: str, arm: str, values: dict[int, float], study: str = "s", **extra) -> list[dict]:
    out = []
    for seed, v in values.items():
        r = {c: None for c in COLUMNS}
        r.update(study=study, axis=axis, arm=arm, cell_id=f"{arm}-{seed}", seed=seed, preset="tiny", status="complete")
        r.update({m: v + i * 0.1 for i, m in enumerate(METRICS)})
        r.update(wall_s=3600.0, img_per_s=10.0, steps=100)
        r.update(extra)
        out.append(r)
    return out


def _frame(*groups: list[dict]) -> pd.DataFrame:
    return normalize(pd.DataFrame([r for g in groups for r in g]))


@pytest.fixture
def emb() -> pd.DataFrame:
    # "dct" sorts before "pca": the default must still come first and be the comparison base.
    return _frame(_rows("embedding", "pca", BASE_VALUES), _rows("embedding", "dct", OTHER_VALUES))


def test_summarize_ci_equals_scipy(emb: pd.DataFrame) -> None:
    s = summarize(emb, "segm_AP").set_index("arm")
    x = np.array(list(OTHER_VALUES.values()))
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert s.loc["dct", "n"] == 3
    assert s.loc["dct", "mean"] == pytest.approx(x.mean())
    assert s.loc["dct", "ci95"] == pytest.approx((hi - lo) / 2)
    assert s.loc["dct", "ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3))


def test_summarize_n1_has_no_ci() -> None:
    s = summarize(_frame(_rows("loss", "l2", {0: 20.0})), "segm_AP")
    assert s.loc[0, "n"] == 1 and math.isnan(s.loc[0, "ci95"])


def test_paired_vs_default_equals_scipy(emb: pd.DataFrame) -> None:
    p = paired_vs_default(emb, "segm_AP", "pca").set_index("arm")
    a, b = np.array(list(OTHER_VALUES.values())), np.array(list(BASE_VALUES.values()))
    assert p.loc["dct", "delta"] == pytest.approx((a - b).mean())
    assert p.loc["dct", "p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert p.loc["dct", "n_pairs"] == 3
    assert p.loc["pca", "delta"] == 0.0


def test_paired_only_matching_seeds_and_nan_below_two_pairs() -> None:
    df = _frame(_rows("loss", "l2+dice", BASE_VALUES), _rows("loss", "l2", {1: 40.0, 5: 50.0}))
    p = paired_vs_default(df, "segm_AP", "l2+dice").set_index("arm")
    assert p.loc["l2", "n_pairs"] == 1
    assert p.loc["l2", "delta"] == pytest.approx(40.0 - BASE_VALUES[1])
    assert math.isnan(p.loc["l2", "p"])


def test_default_arms_are_the_presets_values_and_fallback(tmp_path: Path) -> None:
    keys, defaults = read_axes(REPO / "sweeps")
    assert keys["loss"] == ["loss.mask"] and keys["embedding_dim"] == ["codec.dim"]
    expected = {"embedding": "pca", "embedding_dim": "60", "mask_cost": "cosine", "loss": "l2+dice",
                "attention": "self+dynamic"}  # fmt: skip
    assert {axis: defaults[axis] for axis in expected} == expected
    lr = load_config(REPO / "experiments" / "tiny.yaml").train.lr
    assert defaults["hparams"].startswith(f"train.lr={lr},train.weight_decay=")  # several keys: k=v,k=v
    preset = tmp_path / "base.yaml"
    preset.write_text("codec:\n  dim: 16\nmodel:\n  attention: self\n")
    _, other = read_axes(REPO / "sweeps", preset)
    assert other["embedding_dim"] == "16" and other["attention"] == "self" and other["loss"] == "l2+dice"
    df = _frame(_rows("embedding", "pca-60", {0: 1.0}), _rows("embedding", "dct-60", {0: 1.0}))
    assert default_arm(df, "embedding", DEFAULTS)[0] == "pca-60"
    df = _frame(_rows("novel", "zeta", {0: 1.0}), _rows("novel", "alpha", {0: 1.0}))
    arm, note = default_arm(df, "novel", DEFAULTS)
    assert arm == "alpha" and "alphabetically" in note


def test_read_axes_names_a_bad_spec(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("parameters: [unclosed\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        read_axes(tmp_path)
    (tmp_path / "broken.yaml").write_text("parameters:\n  loss.mask: {values: [l2]}\ncommand: [istr, train]\n")
    with pytest.raises(ValueError, match="broken.yaml.*--config"):
        read_axes(tmp_path)


def test_axis_table_default_first_and_base(emb: pd.DataFrame) -> None:
    t = axis_table(emb, "embedding", DEFAULTS)
    assert list(t.index) == ["pca (default)", "dct"]
    assert t.loc["pca (default)", "Δ mask AP vs default"] == "(base)"
    a, b = np.array(list(OTHER_VALUES.values())), np.array(list(BASE_VALUES.values()))
    assert t.loc["dct", "Δ mask AP vs default"].startswith(f"{(a - b).mean():+.1f}")
    assert t.loc["dct", "p (paired t-test)"] == f"{stats.ttest_rel(a, b).pvalue:.3f}"
    ci = stats.t.ppf(0.975, 2) * a.std(ddof=1) / math.sqrt(3)
    assert t.loc["dct", "mask AP"] == f"{a.mean():.1f} ± {ci:.1f} (n=3)"
    assert t.loc["dct", "CPU/GPU-hours"] == "3.00" and t.loc["dct", "img/s"] == "10.0"
    assert t.attrs["best"]["mask AP"] == ["dct"]


def test_missing_cells_render_dash_never_zero() -> None:
    base = _rows("mask_cost", "cosine", BASE_VALUES)
    other = _rows("mask_cost", "dice", {0: 25.0}, segm_AP=None, segm_APs=None, wall_s=None, img_per_s=None)
    t = axis_table(_frame(base, other), "mask_cost", DEFAULTS)
    row = t.loc["dice"]
    for col in ("mask AP", "APs", "Δ mask AP vs default", "p (paired t-test)", "CPU/GPU-hours", "img/s"):
        assert row[col].startswith(DASH), (col, row[col])
    cells = t.to_numpy().ravel()
    assert not any(re.fullmatch(r"0(\.0+)?", c) or c.startswith("0.0 ") for c in cells)
    md = to_markdown(t)
    assert "†" in md and "missing" in md
    assert r"\dag" in to_latex(t)


def test_arm_without_row_for_a_seed() -> None:
    df = _frame(_rows("attention", "self+dynamic", BASE_VALUES), _rows("attention", "self", {2: 28.0}))
    t = axis_table(df, "attention", DEFAULTS)
    assert t.loc["self", "mask AP"] == "28.0 (n=1)"  # n=1: no CI, says n=1
    assert "±" not in t.loc["self", "mask AP"]
    assert t.loc["self", "p (paired t-test)"].startswith(DASH)
    assert t.loc["self", "Δ mask AP vs default"] == "-1.0 (n=1)"


def test_markdown_structure_and_bold(emb: pd.DataFrame) -> None:
    md = to_markdown(axis_table(emb, "embedding", DEFAULTS))
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 2
    assert lines[0].startswith("| arm | mask AP |")
    assert re.fullmatch(r"\|(:?-{3,}:?\|)+", lines[1])
    assert all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert lines[2].startswith("| pca (default) |") and lines[3].startswith("| dct |")
    assert "**" in lines[3]


def test_latex_structure(emb: pd.DataFrame) -> None:
    tex = to_latex(axis_table(emb, "embedding", DEFAULTS))
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert tex.count(rule) == 1
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    rows = [ln for ln in body.strip().splitlines() if ln.strip()]
    assert len(rows) == 2 and all(ln.endswith(r"\\") for ln in rows)
    assert rows[0].startswith("pca (default)")
    assert r"\textbf{" in tex and tex.count("{") == tex.count("}")


def _write_study(root: Path, study: str, df: pd.DataFrame) -> None:
    (root / study).mkdir(parents=True)
    df.to_csv(root / study / "results.csv", index=False)


def test_load_results_filters_and_errors(tmp_path: Path) -> None:
    with pytest.raises(NoResultsError):
        load_results(tmp_path)
    df = _frame(_rows("loss", "l2", {0: 1.0}), _rows("loss", "dice", {0: 2.0}, status="failed"))
    _write_study(tmp_path, "a", df)
    out = load_results(tmp_path)
    assert list(out.columns) == COLUMNS and list(out["arm"]) == ["l2"]
    with pytest.raises(NoResultsError):
        load_results(tmp_path, ["nope"])


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "results"
    _write_study(runs, "emb", _frame(_rows("embedding", "pca", {0: 30.0, 1: 31.0}, study="emb"),
                                     _rows("embedding", "dct", {0: 29.0, 1: 29.5}, study="emb")))
    _write_study(runs, "loss", _frame(_rows("loss", "l2+dice", {0: 30.0, 1: 31.0}, study="loss"),
                                      _rows("loss", "l2", {0: 28.0, 1: 27.5}, study="loss")))
    assert main(["--runs", str(runs), "--studies", "emb,loss", "--out", str(out)]) == 0
    for axis, arms in {"embedding": ("pca", "dct"), "loss": ("l2+dice", "l2")}.items():
        for ext in ("md", "tex", "csv"):
            text = (out / f"{axis}.{ext}").read_text(encoding="utf-8")
            assert all(a in text for a in arms), (axis, ext)
    printed = capsys.readouterr().out
    assert "## embedding" in printed and "## loss" in printed and "| l2 |" in printed
    assert main(["--runs", str(tmp_path / "empty"), "--out", str(out)]) == 2


def test_plots_cli_writes_png_and_pdf(tmp_path: Path) -> None:
    from analysis import plots

    runs = tmp_path / "runs"
    _write_study(runs, "emb", _frame(_rows("embedding", "pca", {0: 30.0, 1: 31.0}, study="emb"),
                                     _rows("embedding", "dct", {0: 29.0}, study="emb")))
    assert plots.main(["--runs", str(runs), "--out", str(tmp_path / "fig")]) == 0
    for ext in ("png", "pdf"):
        assert (tmp_path / "fig" / f"embedding_mask_ap.{ext}").stat().st_size > 0


def _codec_frame() -> pd.DataFrame:
    """embedding_dim arms 60 (default, 2 seeds) and 40; embedding arm dct-60; the default cell in both axes."""
    default = _rows("embedding_dim", "60", {0: 20.0, 1: 22.0}, codec_type="pca", codec_dim=60, codec_iou=0.95)
    shared = [{**r, "axis": "embedding", "arm": "pca"} for r in default]  # same cell ids: counted once
    return _frame(
        shared,  # before the embedding_dim rows: the default must not depend on which copy comes first
        default,
        _rows("embedding_dim", "40", {0: 10.0}, codec_type="pca", codec_dim=40, codec_iou=0.93),
        _rows("embedding", "dct", {0: 12.0, 1: 14.0}, codec_type="dct", codec_dim=60, codec_iou=0.94),
    )


def test_codec_table_upper_bound_beside_trained_ap() -> None:
    from analysis.tables import codec_table

    report = pd.DataFrame(
        {"type": ["pca", "pca", "dct"], "dim": [40, 60, 60], "mask_iou": [0.9, 0.95, 0.94],
         "oracle_segm_AP": [80.0, 84.0, 90.0]}
    )  # fmt: skip
    table = codec_table(_codec_frame(), report, DEFAULTS)
    assert list(table.index) == ["pca-60 (default)", "pca-40", "dct-60"]
    default = table.loc["pca-60 (default)"]
    mean = (20.0 + 22.0) / 2
    half = stats.t.ppf(0.975, 1) * np.std([20, 22], ddof=1) / math.sqrt(2)
    assert default["trained mask AP"] == f"{mean:.1f} ± {half:.1f} (n=2)"
    assert default["oracle mask AP"] == "84.0" and default["recon IoU (val)"] == "0.950"
    assert default["trained / oracle"] == f"{100 * mean / 84.0:.0f}%"
    assert table.loc["pca-40", "trained mask AP"] == "10.0 (n=1)"
    assert table.attrs["best"]["oracle mask AP"] == ["dct-60"]
    no_report = codec_table(_codec_frame(), None, DEFAULTS)
    assert no_report.loc["dct-60", "oracle mask AP"].startswith(DASH)  # never a made-up bound
    assert "codec" in to_markdown(no_report).splitlines()[0]


def test_tables_cli_writes_codec_table_from_report(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "emb").mkdir(parents=True)
    _codec_frame().to_csv(runs / "emb" / "results.csv", index=False)
    report = tmp_path / "codec_report.csv"
    bound = pd.DataFrame({"type": ["pca"], "dim": [60], "mask_iou": [0.95], "oracle_segm_AP": [84.0]})
    bound.to_csv(report, index=False)
    assert main(["--runs", str(runs), "--codec-report", str(report), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "codec_upper_bound.md").read_text()
    assert "| pca-60 (default) | **0.950** | **84.0** |" in text
    assert (tmp_path / "out" / "embedding_dim.md").is_file()


@pytest.mark.parametrize("extra", [[], ["--entity", "e"]], ids=["nothing", "no-project"])
def test_source_wandb_needs_entity_and_project(extra, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "wandb", *extra])
    assert exit_info.value.code == 2  # argparse's usage error, before any W&B call
    assert "--entity and --project" in capsys.readouterr().err


def test_numeric_arms_sort_numerically_after_the_default() -> None:
    df = _frame(*(_rows("embedding_dim", str(d), {0: 1.0}) for d in (100, 40, 60, 80)))
    assert list(axis_table(df, "embedding_dim", DEFAULTS).index) == ["60 (default)", "40", "80", "100"]
    df = _frame(*(_rows("new_axis", str(d), {0: 1.0}) for d in (100, 40)))
    assert list(axis_table(df, "new_axis", DEFAULTS).index) == ["40 (default)", "100"]  # no known default: smallest


def test_sd_and_mde_columns(emb: pd.DataFrame) -> None:
    t = axis_table(emb, "embedding", DEFAULTS)
    a, b = np.array(list(OTHER_VALUES.values())), np.array(list(BASE_VALUES.values()))
    assert t.loc["dct", "seed SD"] == f"{a.std(ddof=1):.2f}"
    assert t.loc["dct", "MDE"] == f"{mde(3, (a - b).std(ddof=1)):.1f}"  # paired: SD of the differences
    assert t.loc["pca (default)", "MDE"] == f"{mde(3, b.std(ddof=1)):.1f}§"  # no pairs: its own seed SD
    md = to_markdown(t)
    assert "| seed SD | val SD | MDE |" in md and "§ MDE from the arm's own seed SD" in md
    assert "power 0.8" in md and "no seed rule recorded" in md
    assert r"\S" in to_latex(t)


def test_csv_holds_numbers(emb: pd.DataFrame) -> None:
    import io

    csv = pd.read_csv(io.StringIO(to_csv(axis_table(emb, "embedding", DEFAULTS))))
    row = csv.set_index("arm").loc["dct"]
    a, b = np.array(list(OTHER_VALUES.values())), np.array(list(BASE_VALUES.values()))
    assert row["segm_AP_mean"] == pytest.approx(a.mean()) and row["segm_AP_n"] == 3
    assert row["segm_AP_sd"] == pytest.approx(a.std(ddof=1))
    assert row["segm_AP_ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * a.std(ddof=1) / math.sqrt(3))
    assert row["delta_segm_AP"] == pytest.approx((a - b).mean()) and row["p"] == pytest.approx(
        stats.ttest_rel(a, b).pvalue
    )
    assert row["mde_segm_AP"] == pytest.approx(mde(3, (a - b).std(ddof=1))) and row["mde_sd_basis"] == "paired"
    assert row["cpu_gpu_hours"] == pytest.approx(3.0)
    numeric = csv.drop(columns=["arm", "is_default", "mde_sd_basis"])
    assert all(pd.api.types.is_numeric_dtype(numeric[c]) for c in numeric.columns)
    assert bool(csv.set_index("arm").loc["pca (default)", "is_default"])


def test_missing_values_are_empty_in_the_csv_never_zero() -> None:
    import io

    base = _rows("mask_cost", "cosine", BASE_VALUES)
    other = _rows("mask_cost", "dice", {0: 25.0}, segm_AP=None)
    csv = pd.read_csv(io.StringIO(to_csv(axis_table(_frame(base, other), "mask_cost", DEFAULTS))))
    row = csv.set_index("arm").loc["dice"]
    assert row["segm_AP_n"] == 0 and math.isnan(row["segm_AP_mean"]) and math.isnan(row["mde_segm_AP"])


def test_seed_rule_footnote_states_rule_and_n_reached(emb: pd.DataFrame) -> None:
    rule = {"rule": "pilot of 3 seeds per arm, then n for Δ = 1 AP.", "n_reached": {"embedding": 3}}
    md = to_markdown(axis_table(emb, "embedding", DEFAULTS, rule))
    assert "Seeds, rule declared before the run: pilot of 3 seeds per arm, then n for Δ = 1 AP. n reached: 3." in md


def test_cli_prints_sd_and_mde_and_reads_seed_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "results"
    _write_study(runs, "loss", _frame(_rows("loss", "l2", {0: 28.0, 1: 27.5}, study="loss"),
                                      _rows("loss", "l2+dice", {0: 30.0, 1: 31.0}, study="loss")))  # fmt: skip
    rule = tmp_path / "seed_rule.json"
    rule.write_text('{"rule": "fixed: seeds 0..1 for every arm.", "n_reached": {"loss": 2}}')
    assert main(["--runs", str(runs), "--out", str(out), "--seed-rule", str(rule)]) == 0
    printed = capsys.readouterr().out
    header = next(ln for ln in printed.splitlines() if ln.startswith("| arm |"))
    assert "| seed SD |" in header and "| MDE |" in header
    assert "| l2+dice (default) |" in printed  # from the tiny preset, not the first arm alphabetically
    assert "fixed: seeds 0..1 for every arm. n reached: 2." in printed
    rule.write_text("[]")
    assert main(["--runs", str(runs), "--out", str(out), "--seed-rule", str(rule)]) == 2
    assert "seed_rule.json" in capsys.readouterr().err


def test_mde_target_note_names_the_arms_above_it_and_the_seeds_they_need() -> None:
    from analysis.notes import mde_target_note

    numbers = [{"arm": "a (default)", "mde_segm_AP": 1.2, "mde_sd": 0.5},
               {"arm": "b", "mde_segm_AP": 4.0, "mde_sd": 2.4}, {"arm": "c", "mde_segm_AP": math.nan, "mde_sd": 1.0}]
    note = mde_target_note(numbers, 1.5)
    assert "b 4.0 AP" in note and "a (default)" not in note and "c " not in note
    assert f"about {needed_n(1.5, 2.4)} seeds" in note
    assert "every arm" in mde_target_note(numbers[:1], 1.5)
    assert "no arm has an MDE" in mde_target_note(numbers[2:], 1.5)  # one seed per arm, as in `make demo`
