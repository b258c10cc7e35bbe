"""Mask codecs behind one interface (docs/method.md#mask-embedding).

``CODECS`` maps the config name ``codec.type`` to its class; adding a codec is
one ``MaskCodec`` subclass plus one line here.
"""

from __future__ import annotations

from typing import Any

from istr.codecs.ae import AECodec
from istr.codecs.base import MASK_SIZE, MaskCodec, load_codec, mask_iou
from istr.codecs.dct import DCTCodec
from istr.codecs.pca import PCACodec
from istr.codecs.sparse import SparseCodec
from istr.registry import pick

CODECS: dict[str, type[MaskCodec]] = {
    "pca": PCACodec,
    "dct": DCTCodec,
    "sparse": SparseCodec,
    "ae": AECodec,
}


def build_codec(type: str, dim: int, **params: Any) -> MaskCodec:
    """Build an unfitted codec ``CODECS[type](dim=dim, **params)``; unknown ``type`` -> UnknownArmError."""
    return pick(CODECS, type, "codec.type")(dim=dim, **params)


__all__ = [
    "CODECS",
    "MASK_SIZE",
    "AECodec",
    "DCTCodec",
    "MaskCodec",
    "PCACodec",
    "SparseCodec",
    "build_codec",
    "load_codec",
    "mask_iou",
]
