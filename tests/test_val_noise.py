"""Val-image noise in the tables: every cell scored on the same redraws of the val images, the paired test and the
MDE widened by the variance of those redraws, and the footnotes saying which method a table used."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.load import normalize
from analysis.notes import code_note
from analysis.render import to_csv, to_latex
from analysis.stats import describe, effective_sd, mde, paired_vs_default
from analysis.tables import P_COL, P_VAL_COL, VAL_SD_COL, axis_table, write_tables
from analysis.val_noise import DRAW_SEED, IMAGE_DRAWS, image_draws, image_weights
from istr.eval_images import compact_records, load_records, save_records, weighted_ap
from istr.results import COLUMNS, EVAL_IMAGES_FILE, METRICS, SUMMARY_FILE
from tests.conftest import box_evaluation

AXIS = "novel"
DEFAULTS = {AXIS: "base"}
NOISE = {"base": 2.0, "better": 1.0, "worse": 5.0}  # box jitter (pixels) of each arm's detections
SEEDS = (0, 1, 2)
N_IMAGES = 40
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _records(noise: float, seed: int, n_images: int = N_IMAGES) -> dict[str, np.ndarray]:
    """Per-image records of COCOeval (bbox) on one fixed ground truth, detections jittered by `noise`."""
    return compact_records(box_evaluation(123, 1000 + seed + int(10 * noise), n_images, noise, categories=2))


def _cell(root: Path, arm: str, seed: int, records: dict[str, np.ndarray], commit: str | None = COMMIT) -> dict:
    """A results row for one cell whose run dir holds `records` (and a train_summary.json naming `commit`)."""
    run_dir = root / f"{arm}-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_records(run_dir / EVAL_IMAGES_FILE, records)
    if commit:
        summary = {"steps": 1, "code_version": {"commit": commit, "dirty": False}}
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))
    ap = float(weighted_ap(records, np.ones((1, len(records["image_ids"]))))[0])
    row = {c: None for c in COLUMNS}
    row.update(study="s", axis=AXIS, arm=arm, cell_id=f"{arm}-{seed}", seed=seed, preset="tiny", status="complete",
               wall_s=60.0, img_per_s=5.0, steps=1, run_dir=str(run_dir))  # fmt: skip
    row.update({m: ap + 0.1 * i for i, m in enumerate(METRICS)})
    return row


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("cells")
    return normalize(pd.DataFrame([_cell(root, arm, s, _records(noise, s)) for arm, noise in NOISE.items()
                                   for s in SEEDS]))  # fmt: skip


@pytest.fixture(scope="module")
def draws(cells: pd.DataFrame):
    return image_draws(cells)


def test_weights_are_fixed_bootstrap_counts() -> None:
    rng = np.random.default_rng(DRAW_SEED)
    expected = np.stack([np.bincount(rng.integers(0, 7, 7), minlength=7) for _ in range(IMAGE_DRAWS)])
    assert np.array_equal(image_weights(7), expected)
    assert (image_weights(7).sum(1) == 7).all()


def test_draws_are_each_cells_ap_on_the_same_redraws(cells: pd.DataFrame, draws) -> None:
    assert sorted(draws) == sorted(cells["cell_id"]) and draws.n_images == N_IMAGES
    weights = image_weights(N_IMAGES)
    for row in cells.iloc[[0, 4]].itertuples():
        expected = weighted_ap(load_records(Path(row.run_dir) / EVAL_IMAGES_FILE), weights)
        assert draws[row.cell_id].shape == (IMAGE_DRAWS,)
        assert np.array_equal(draws[row.cell_id], expected)
    assert np.ptp(draws[cells["cell_id"].iloc[0]]) > 0.5  # the redraws differ


def test_cells_without_records_are_left_out(cells: pd.DataFrame, tmp_path: Path) -> None:
    df = cells.copy()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / EVAL_IMAGES_FILE).write_text("not a zip")
    df.loc[0, "run_dir"] = str(tmp_path / "broken")
    df.loc[1, "run_dir"] = str(tmp_path / "nowhere")
    df.loc[2, "run_dir"] = pd.NA
    out = image_draws(pd.concat([df, df.iloc[[3]]]))  # a duplicated cell is scored once
    assert sorted(out) == sorted(df["cell_id"].iloc[3:])


def test_different_val_images_name_the_run_dirs(cells: pd.DataFrame, tmp_path: Path) -> None:
    other = normalize(pd.DataFrame([_cell(tmp_path, "odd", 0, _records(2.0, 0, n_images=30))]))
    with pytest.raises(ValueError, match=r"different val images.*odd-0"):
        image_draws(pd.concat([cells, other]))


def test_paired_test_covers_the_val_images(cells: pd.DataFrame, draws) -> None:
    seed_only = paired_vs_default(cells, "segm_AP", "base").set_index("arm")
    both = paired_vs_default(cells, "segm_AP", "base", draws).set_index("arm")
    assert seed_only["sd_val"].isna().all()
    for arm in ("better", "worse"):
        s, b = seed_only.loc[arm], both.loc[arm]
        n = int(b["n_pairs"])
        assert n == 3 and b["delta"] == pytest.approx(s["delta"]) and b["sd_diff"] == pytest.approx(s["sd_diff"])
        assert s["se"] == pytest.approx(s["sd_diff"] / math.sqrt(n))
        diff = np.mean([draws[f"{arm}-{k}"] - draws[f"base-{k}"] for k in SEEDS], axis=0)
        assert b["sd_val"] == pytest.approx(np.std(diff, ddof=1)) and b["sd_val"] > 0
        assert b["se"] == pytest.approx(math.sqrt(b["sd_diff"] ** 2 / n + b["sd_val"] ** 2))
        assert b["se"] >= b["sd_diff"] / math.sqrt(n)
        assert b["p"] == pytest.approx(2 * stats.t.sf(abs(b["delta"]) / b["se"], n - 1))
        assert b["p"] >= s["p"]
    base_mean = np.mean([draws[f"base-{k}"] for k in SEEDS], axis=0)
    assert both.loc["base", "sd_val"] == pytest.approx(np.std(base_mean, ddof=1))
    assert math.isnan(both.loc["base", "se"]) and math.isnan(both.loc["base", "p"])


def test_a_cell_without_draws_falls_back_to_the_seed_test(cells: pd.DataFrame, draws) -> None:
    partial = {k: v for k, v in draws.items() if k != "worse-1"}
    out = paired_vs_default(cells, "segm_AP", "base", partial).set_index("arm")
    seed_only = paired_vs_default(cells, "segm_AP", "base").set_index("arm")
    assert math.isnan(out.loc["worse", "sd_val"]) and out.loc["worse", "p"] == seed_only.loc["worse", "p"]
    assert out.loc["better", "sd_val"] > 0


def test_identical_ap_across_seeds_still_has_a_finite_se(cells: pd.DataFrame, draws) -> None:
    same = cells[cells["seed"] == 0]
    df = normalize(pd.concat([same.assign(seed=s, cell_id=same["arm"] + f"-same{s}") for s in SEEDS]))
    copies = {f"{arm}-same{s}": draws[f"{arm}-0"] for arm in NOISE for s in SEEDS}
    row = paired_vs_default(df, "segm_AP", "base", copies).set_index("arm").loc["worse"]
    assert row["sd_diff"] == 0 and row["sd_val"] > 0
    assert row["se"] == pytest.approx(row["sd_val"]) and 0 < row["p"] < 1


def test_describe_and_mde_add_the_val_variance() -> None:
    x = pd.Series([30.0, 31.5, 29.0])
    plain, wide = describe(x), describe(x, var_val=0.25)
    assert wide["sd"] == plain["sd"] and wide["mean"] == plain["mean"]
    assert wide["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) * math.sqrt(plain["sd"] ** 2 / 3 + 0.25))
    assert describe(x, 0.0)["ci95"] == plain["ci95"]
    assert effective_sd(3, 1.2, 0.25) == pytest.approx(math.sqrt(1.44 + 0.75))
    assert effective_sd(3, 1.2, math.nan) == 1.2


def test_table_with_draws_says_seeds_and_val_images(cells: pd.DataFrame, draws) -> None:
    t = axis_table(cells, AXIS, DEFAULTS, val_draws=draws)
    cols = list(t.columns)
    assert P_VAL_COL in cols and P_COL not in cols
    assert cols[cols.index("seed SD") + 1] == VAL_SD_COL
    paired = paired_vs_default(cells, "segm_AP", "base", draws).set_index("arm")
    assert t.loc["worse", VAL_SD_COL] == f"{paired.loc['worse', 'sd_val']:.2f}"
    assert t.loc["base (default)", VAL_SD_COL] == f"{paired.loc['base', 'sd_val']:.2f}"
    assert t.loc["worse", P_VAL_COL] == f"{paired.loc['worse', 'p']:.3f}" or paired.loc["worse", "p"] < 0.001
    notes = "\n".join(t.attrs["notes"])
    assert (
        f"Uncertainty covers seeds and val images: SE² = s²/n + σ²_img, σ²_img = variance of the seed-averaged Δ "
        f"over {IMAGE_DRAWS} bootstrap redraws of the {N_IMAGES} val images (the same draws for every cell)" in notes
    )
    assert f"Code: every cell trained at commit {COMMIT[:12]}." in notes
    csv = pd.read_csv(io.StringIO(to_csv(t))).set_index("arm")
    pr = paired.loc["worse"]
    assert csv.loc["worse", "sd_val"] == pytest.approx(pr["sd_val"])
    assert csv.loc["worse", "se"] == pytest.approx(pr["se"])
    assert csv.loc["worse", "mde_segm_AP"] == pytest.approx(mde(3, effective_sd(3, pr["sd_diff"], pr["sd_val"] ** 2)))
    seeds_ci = describe(cells.loc[cells["arm"] == "worse", "segm_AP"])["ci95"]
    assert csv.loc["worse", "segm_AP_ci95"] > seeds_ci  # the mask AP CI widens; the other columns do not
    assert csv.loc["worse", "segm_AP50_ci95"] == pytest.approx(describe(cells.loc[cells["arm"] == "worse",
                                                                                  "segm_AP50"])["ci95"])  # fmt: skip
    tex = to_latex(t)
    assert r"$\sigma$" in tex and tex.count("{") == tex.count("}")


def test_table_without_records_says_seeds_only(cells: pd.DataFrame) -> None:
    t = axis_table(cells.assign(run_dir=pd.NA), AXIS, DEFAULTS)
    assert P_COL in t.columns and (t[VAL_SD_COL] == "—¶").all()
    notes = "\n".join(t.attrs["notes"])
    assert "Uncertainty covers seeds only: these results carry no per-image records." in notes
    assert "Code version: not recorded." in notes and "¶" in t.attrs["footnotes"]
    p = paired_vs_default(cells, "segm_AP", "base").set_index("arm")
    assert t.loc["worse", P_COL] == f"{p.loc['worse', 'p']:.3f}" or p.loc["worse", "p"] < 0.001


def test_a_table_with_some_records_missing_uses_seeds_only(cells: pd.DataFrame, draws) -> None:
    partial = type(draws)({k: v for k, v in draws.items() if k != "worse-1"})
    t = axis_table(cells, AXIS, DEFAULTS, val_draws=partial)
    assert P_COL in t.columns
    assert "Uncertainty covers seeds only: 1 of 9 cells carry no per-image records" in "\n".join(t.attrs["notes"])


def test_code_note_names_every_commit(tmp_path: Path) -> None:
    rows = []
    for i, version in enumerate([{"commit": "a" * 40, "dirty": True}, {"commit": "b" * 40, "dirty": False}, None]):
        run_dir = tmp_path / f"c{i}"
        run_dir.mkdir()
        (run_dir / SUMMARY_FILE).write_text(json.dumps({"code_version": version} if version else {}))
        rows.append({"cell_id": f"c{i}", "run_dir": str(run_dir), "arm": ["x", "y", "z"][i]})
    df = pd.DataFrame(rows)
    assert code_note(df) == (f"Code: cells from 2 commits: {'a' * 12} (with local changes) (x); {'b' * 12} (y), and 1 "
                             "cell with no recorded version. Arms compare fairly only where these commits train them "
                             "alike.")  # fmt: skip
    assert code_note(df.iloc[[0, 2]]) == (f"Code: cells from 1 commit: {'a' * 12} (with local changes), and 1 cell "
                                          "with no recorded version. Arms compare fairly only where these commits "
                                          "train them alike.")  # fmt: skip
    assert code_note(df.iloc[[0]]) == f"Code: every cell trained at commit {'a' * 12} (with local changes)."
    assert code_note(df.iloc[[2]]) == "Code version: not recorded."


def test_written_tables_are_byte_identical(cells: pd.DataFrame, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    df = cells[(cells["arm"] != "better") & (cells["seed"] < 2)]  # fewer cells: each write computes the draws
    tables = write_tables(df, first, defaults=DEFAULTS)
    write_tables(df, second, defaults=DEFAULTS)
    assert P_VAL_COL in tables[AXIS].columns
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir()) and f"{AXIS}.md" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
