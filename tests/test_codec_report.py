"""Codec reconstruction report (docs/method.md#ablations): IoU + oracle segm AP per (codec type, dim).

Runs on conftest's tiny generated dataset: 16 train images with 30 masks (so PCA supports at most
dim 29: it needs more samples than components), 6 val images with 11 masks, all COCO-"small".
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from istr.data.build import split_paths
from istr.reports.codec import COLUMNS, SIZE_RANGES, codec_report, format_markdown, write_report


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One codec cache for this module: a PCA fit (float64 eigh) is slow on a busy 2-core machine."""
    return tmp_path_factory.mktemp("codec_cache")


def val_annotations(cfg) -> list[dict]:
    data = json.loads(split_paths(cfg.data, "val")[0].read_text())
    return [a for a in data["annotations"] if not a.get("iscrowd", 0)]


def row(df: pd.DataFrame, codec_type: str, dim: int) -> pd.Series:
    hits = df[(df["type"] == codec_type) & (df["dim"] == dim)]
    assert len(hits) == 1
    return hits.iloc[0]


def test_report_rows_bounds_and_files(tiny_cfg, shared_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    cfg = replace(tiny_cfg, cache_dir=str(shared_cache))
    df = codec_report(cfg, ["pca", "dct"], [4, 29, 784], out_dir=out)
    assert list(df.columns) == COLUMNS
    assert sorted(zip(df["type"], df["dim"])) == sorted((t, d) for t in ("pca", "dct") for d in (4, 29, 784))

    anns = val_annotations(tiny_cfg)
    assert (df["n_val_masks"] == len(anns)).all()
    ok = df[df["note"] == ""]
    assert len(ok) == 5  # pca 784 cannot be fitted on 30 masks
    assert ok["mask_iou"].between(0, 1).all()
    for size, (low, high) in SIZE_RANGES.items():
        present = any(low <= a["area"] < high for a in anns)
        column = ok[f"mask_iou_{size}"]
        assert column.notna().all() if present else column.isna().all(), size
        assert column.dropna().between(0, 1).all()
    assert ok["oracle_segm_AP"].between(0, 100).all()
    assert (ok["fit_seconds"] >= 0).all()

    # DCT with every coefficient is lossless on the crops; only 28x28 resampling limits the oracle
    # (measured: IoU 1.000, oracle AP 100.0).
    dct = row(df, "dct", 784)
    assert dct["mask_iou"] > 0.999
    assert dct["oracle_segm_AP"] >= 90.0
    assert dct["oracle_segm_AP50"] >= dct["oracle_segm_AP"]

    pca784 = row(df, "pca", 784)
    assert "needs more than 784 samples" in pca784["note"]
    assert math.isnan(pca784["mask_iou"]) and math.isnan(pca784["oracle_segm_AP"])

    csv_path, md_path = out / "codec_report.csv", out / "codec_report.md"
    assert csv_path.is_file() and md_path.is_file()
    back = pd.read_csv(csv_path, keep_default_na=False, na_values=[""])
    assert len(back) == len(df) and list(back.columns) == COLUMNS
    assert np.allclose(back["mask_iou"], df["mask_iou"], equal_nan=True)
    table = [line for line in md_path.read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(df)  # header, separator, one row per combination
    assert table[0].split("|")[1].strip() == "type"


def test_pca_oracle_ap_grows_with_dim(tiny_cfg, shared_cache: Path) -> None:
    # Measured: oracle AP 50.3 / 69.7 / 73.0, IoU 0.735 / 0.817 / 0.836 at dim 4 / 16 / 29
    # (29 is the largest PCA dim 30 training masks allow).
    df = codec_report(replace(tiny_cfg, cache_dir=str(shared_cache)), ["pca"], [4, 16, 29])
    assert (df["note"] == "").all()
    ap, iou = df["oracle_segm_AP"].tolist(), df["mask_iou"].tolist()
    assert all(b >= a - 2.0 for a, b in zip(ap, ap[1:])), ap
    assert all(b >= a - 0.01 for a, b in zip(iou, iou[1:])), iou
    assert ap[-1] > ap[0] + 5.0


def test_impossible_arms_give_notes_not_exceptions(tiny_cfg) -> None:
    df = codec_report(tiny_cfg, ["dct", "sparse", "nope"], [5000])
    assert len(df) == 3
    assert "dim must be in [1, 784]" in row(df, "dct", 5000)["note"]
    assert "dim must be in [1, 784]" in row(df, "sparse", 5000)["note"]
    assert "codec.type='nope' is not a known arm; valid: pca" in row(df, "nope", 5000)["note"]
    assert df["mask_iou"].isna().all() and df["oracle_segm_AP"].isna().all()


def test_max_val_images_restricts_gt(tiny_cfg) -> None:
    anns = val_annotations(tiny_cfg)
    first_two = sorted({a["image_id"] for a in anns})[:2]
    df = codec_report(tiny_cfg, ["dct"], [784], max_val_images=2)
    expected = sum(a["image_id"] in first_two for a in anns)
    assert int(df["n_val_masks"].iloc[0]) == expected
    # GT of the other images is not evaluated: the lossless codec still reaches the full oracle AP.
    assert df["oracle_segm_AP"].iloc[0] >= 90.0


def test_params_filtered_per_type_and_cache_reused(tiny_cfg_factory) -> None:
    # ``epochs`` belongs to the AE only: DCT must not receive it.
    cfg = tiny_cfg_factory("codec.params.epochs=1")
    first = codec_report(cfg, ["dct", "ae"], [8])
    assert (first["note"] == "").all(), first["note"].tolist()
    again = codec_report(cfg, ["dct", "ae"], [8])  # loaded from the cache: same numbers, fit time kept
    assert np.allclose(again["mask_iou"], first["mask_iou"])
    assert np.allclose(again["fit_seconds"], first["fit_seconds"])


def test_format_markdown_decimals_nan_and_pipes(tmp_path: Path) -> None:
    df = pd.DataFrame(
        [
            {
                "type": "pca",
                "dim": 60,
                "mask_iou": 0.12345,
                "mask_iou_small": float("nan"),
                "oracle_segm_AP": 45.67,
                "n_val_masks": 7,
                "note": "a|b",
            },
        ]
    )
    text = format_markdown(df)
    lines = text.strip().splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].strip("|").split(" | ")]
    assert cells == ["pca", "60", "0.123", "n/a", "45.7", "7", "a\\|b"]
    csv_path, md_path = write_report(df, tmp_path)
    assert md_path.read_text() == text
    assert pd.read_csv(csv_path)["dim"].tolist() == [60]


@pytest.mark.parametrize("size,area", [("small", 100.0), ("medium", 32.0**2), ("large", 96.0**2)])
def test_size_ranges_follow_coco(size: str, area: float) -> None:
    low, high = SIZE_RANGES[size]
    assert low <= area < high
