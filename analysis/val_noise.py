"""Val-image noise of every cell: its mask AP on the same bootstrap redraws of the val images.

The tables generalize to the population of images, not only to the val set, when their CIs and tests count the
variance the val images add (`analysis.stats.paired_vs_default`). Each cell's run dir keeps COCOeval's per-image
segm records (`eval_images.npz`, `istr.eval_images`); from them the AP of a redrawn val set is one weighted sum, so
every cell is scored on the same `IMAGE_DRAWS` redraws (weight = how many times an image is drawn), and the
paired arm − default differences on a redraw see the same images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from istr.eval_images import load_records, weighted_ap
from istr.results import EVAL_IMAGES_FILE

IMAGE_DRAWS = 100  # bootstrap redraws of the val images: their variance is known to ±14% (1 SD, √(2/99))
DRAW_SEED = 0  # fixed: the same draws for every cell and every run of the tables


class ImageDraws(dict[str, np.ndarray]):
    """{cell_id: mask AP on each redraw of the val images}; `n_images`: how many val images were redrawn (0: none),
    which the tables' footnote states."""

    n_images: int = 0


def image_weights(n_images: int, draws: int = IMAGE_DRAWS, seed: int = DRAW_SEED) -> np.ndarray:
    """[draws, n_images] bootstrap weights: how many times each val image is drawn when n_images are drawn with
    replacement; fixed by `seed`, so every cell is scored on the same redraws."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n_images, n_images), minlength=n_images) for _ in range(draws)])


def image_draws(df: pd.DataFrame, draws: int = IMAGE_DRAWS, seed: int = DRAW_SEED) -> ImageDraws:
    """{cell_id: mask AP (percent) on each of the `draws` redraws of the val images [draws]} for the cells of `df`
    whose run dir holds readable per-image records; the others are left out (their tables cover seeds only).

    Each file is read and scored once (cells deduplicated by cell_id). ValueError naming two run dirs when their
    cells were evaluated on different val images: their redraws could not be the same.
    """
    out = ImageDraws()
    reference: tuple[str, np.ndarray] | None = None
    weights = np.zeros((0, 0))
    cells = df.dropna(subset=["cell_id", "run_dir"]).drop_duplicates("cell_id").sort_values("cell_id", kind="stable")
    for cell_id, run_dir in zip(cells["cell_id"], cells["run_dir"]):
        path = Path(str(run_dir)) / EVAL_IMAGES_FILE
        if not path.is_file():
            continue
        try:
            records = load_records(path)
        except ValueError:
            continue
        ids = records["image_ids"]
        if reference is None:
            reference, weights = (str(run_dir), ids), image_weights(len(ids), draws, seed)
            out.n_images = len(ids)
        elif not np.array_equal(ids, reference[1]):
            raise ValueError(f"cells evaluated on different val images (image_ids): {reference[0]} and {run_dir}; "
                             "their val-image noise cannot share redraws")  # fmt: skip
        out[str(cell_id)] = weighted_ap(records, weights)
    return out
