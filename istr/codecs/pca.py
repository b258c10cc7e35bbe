"""PCA mask codec: ISTR's default closed-form mask embedding (docs/method.md#mask-embedding)."""

from __future__ import annotations

from torch import Tensor

from istr.codecs.base import MASK_SIZE, MaskCodec, WhitenedPCA, masks_to_logits


class PCACodec(MaskCodec):
    """Top-``dim`` principal components of mask logits (docs/method.md#mask-embedding, default l = 60).

    With linear encoder/decoder, maximising mask/reconstruction mutual
    information reduces to PCA, so the fit is closed form (float64 eigh of the
    784x784 covariance). Following the reference code, PCA runs on the inverse
    sigmoid of the mask (clipped to [0.01, 0.99], i.e. logits of +-4.6; no
    random jitter, so fitting is deterministic), mean-centred, and with
    ``whiten=True`` codes are divided by the square root of each component's
    explained variance: every embedding dimension has unit variance on the
    fitting masks. ``decode(e) = (e * sqrt(var)) @ components + mean`` gives
    logits directly.

    Fit stats: ``explained_variance_ratio`` (share of logit variance kept).
    """

    def __init__(self, dim: int = 60, whiten: bool = True) -> None:
        super().__init__(dim, whiten=whiten)
        self.pca = WhitenedPCA(MASK_SIZE**2, dim, whiten=whiten)

    def _fit(self, masks: Tensor) -> dict[str, float]:
        return self.pca.fit(masks_to_logits(masks))

    def _encode(self, masks: Tensor) -> Tensor:
        return self.pca.project(masks_to_logits(masks))

    def _decode(self, codes: Tensor) -> Tensor:
        return self.pca.unproject(codes)
