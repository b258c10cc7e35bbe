"""The per-image records reproduce COCOeval's AP: on the val set itself and on a resample of its images."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from analysis.bootstrap import resampled_ap
from istr.eval_images import compact_records, load_records, save_records, weighted_ap
from tests.conftest import box_evaluation


def _evaluated(seed: int = 0, n_images: int = 40) -> COCOeval:
    """COCOeval (bbox) after evaluate() of jittered ground truth plus false positives, with a few crowd boxes."""
    return box_evaluation(seed, seed + 1, n_images, categories=3, crowd_rate=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_records_give_cocoevals_ap_on_the_whole_val_set(seed):
    evaluator = _evaluated(seed)
    records = compact_records(evaluator)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
        evaluator.summarize()
    ones = np.ones((1, len(records["image_ids"])))
    assert weighted_ap(records, ones)[0] == pytest.approx(100 * evaluator.stats[0], abs=1e-9)


def test_records_give_cocoevals_ap_on_resampled_images(tmp_path):
    evaluator = _evaluated(3)
    save_records(tmp_path / "r.npz", compact_records(evaluator))
    records = load_records(tmp_path / "r.npz")
    rng = np.random.default_rng(0)
    n = len(records["image_ids"])
    draws = [rng.integers(0, n, n) for _ in range(5)]
    weights = np.stack([np.bincount(draw, minlength=n) for draw in draws])
    ours = weighted_ap(records, weights)
    theirs = [resampled_ap(evaluator, draw) for draw in draws]
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert np.ptp(ours) > 0.5  # the resamples differ: the weights are used


def test_unreadable_records_name_the_file(tmp_path):
    bad = tmp_path / "eval_images.npz"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="eval_images.npz"):
        load_records(bad)
