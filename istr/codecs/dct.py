"""DCT mask codec: low-frequency 2-D DCT coefficients in zig-zag order (docs/method.md#mask-embedding, 2022 version)."""

from __future__ import annotations

import numpy as np
import scipy.fft
import torch
from torch import Tensor

from istr.codecs.base import MASK_SIZE, MaskCodec, masks_to_logits


def zigzag_indices(size: int) -> list[tuple[int, int]]:
    """JPEG zig-zag order of a ``size x size`` grid as ``(row, col)`` pairs.

    ``row`` is the vertical and ``col`` the horizontal frequency. Anti-diagonals
    ``row + col = s`` are visited in increasing ``s``; odd ``s`` runs top-right
    to bottom-left (row increasing), even ``s`` bottom-left to top-right, giving
    (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), (0,3), (1,2), ...
    """
    order = []
    for s in range(2 * size - 1):
        rows = range(max(0, s - size + 1), min(s, size - 1) + 1)
        order.extend((r, s - r) for r in (rows if s % 2 else reversed(rows)))
    return order


class DCTCodec(MaskCodec):
    """First ``dim`` orthonormal 2-D DCT-II coefficients of the mask logits (docs/method.md#mask-embedding).

    The 784x784 orthonormal basis is built once with ``scipy.fft.dct`` at
    construction and its first ``dim`` rows in zig-zag order are kept as a
    buffer, so encode/decode are plain matmuls and decode is differentiable.
    Like PCA we transform the inverse sigmoid of the mask (+-4.6 for binary
    masks) so that ``decode`` returns logits; with ``dim = 784`` the round trip
    is exact. The raw coefficients differ in scale (the DC term of a full mask is
    about 28 * 4.6), so ``fit`` standardises each to zero mean and unit variance on
    the fitting masks (``MaskCodec.standardize_codes``) and reports
    ``energy_ratio``: the share of logit energy in the kept coefficients. Before
    ``fit`` the codec is usable with raw coefficients.
    """

    standardize_codes = True

    def __init__(self, dim: int = 60) -> None:
        super().__init__(dim)
        size = MASK_SIZE
        dct_1d = scipy.fft.dct(np.eye(size), norm="ortho", axis=0)  # [freq, pixel]
        # Row u*size+v of kron(C, C) is the basis image of frequency (u, v).
        basis = np.kron(dct_1d, dct_1d)
        keep = [r * size + c for r, c in zigzag_indices(size)[:dim]]
        self.register_buffer("basis", torch.from_numpy(basis[keep]).float())
        self._fitted = True

    def _fit(self, masks: Tensor) -> dict[str, float]:
        logits = masks_to_logits(masks)
        kept = (self._encode(masks) ** 2).sum()
        return {"energy_ratio": float(kept / (logits**2).sum())}

    def _encode(self, masks: Tensor) -> Tensor:
        return masks_to_logits(masks) @ self.basis.T

    def _decode(self, codes: Tensor) -> Tensor:
        return codes @ self.basis
