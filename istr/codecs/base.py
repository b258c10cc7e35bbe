"""Mask codec interface shared by every mask embedding (docs/method.md#mask-embedding).

A codec maps class-agnostic 28x28 instance masks to a ``dim``-d embedding and
back to 28x28 mask *logits*: ``encode: mask28 -> R^dim``, ``decode: R^dim ->
mask28 logits``. It is fitted once on training masks and then frozen: all
learned state lives in buffers (or in parameters with ``requires_grad=False``)
so ``.to(device)`` moves it and the ISTR optimizer never trains it.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from istr.io import atomic_torch_save
from istr.mask_size import MASK_SIZE

# Clip value for the inverse sigmoid of binary masks (docs/method.md#mask-embedding). The
# reference code jitters background/foreground to [0.01, 0.05] / [0.95, 0.99];
# we clip deterministically at its outer edge so binary masks map to logits of
# exactly +-log(0.99 / 0.01) = +-4.595 (soft masks land in between).
MASK_EPS = 0.01

# Class name -> class for every MaskCodec subclass, filled by __init_subclass__,
# so load_codec can rebuild a saved codec without an if-chain.
_CODEC_CLASSES: dict[str, type[MaskCodec]] = {}

_SAVE_FORMAT = 1


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """Per-mask IoU of boolean masks ``[n, H, W]`` -> ``[n]``.

    Codec reconstruction quality of docs/method.md#ablations; two empty masks count as a
    perfect match (IoU 1) instead of 0/0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"mask_iou: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred = pred.flatten(1).bool()
    target = target.flatten(1).bool()
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def masks_to_logits(masks: Tensor, eps: float = MASK_EPS) -> Tensor:
    """Inverse sigmoid of masks clipped to ``[eps, 1-eps]``, flattened to ``[n, H*W]``.

    docs/method.md#mask-embedding: the reference PCA is fitted on the inverse sigmoid of the
    (lightly jittered) binary mask, so linear decoders produce logits directly.
    """
    return torch.logit(masks.clamp(eps, 1.0 - eps)).flatten(1)


class WhitenedPCA(nn.Module):
    """Closed-form PCA ``R^in -> R^out`` with optional whitening (docs/method.md#mask-embedding).

    ``project(x) = (x - mean) @ components.T / scale`` and ``unproject`` is its
    linear inverse on the kept subspace. With ``whiten=True`` the scale is the
    square root of each component's explained variance, so projections of the
    fitting data have unit variance per dimension (sklearn's ``whiten=True``,
    as in the reference code). Shared by the PCA codec (on mask logits) and
    the sparse codec (on its sparse codes).
    """

    def __init__(self, in_features: int, out_features: int, whiten: bool = True) -> None:
        super().__init__()
        if not 1 <= out_features <= in_features:
            raise ValueError(f"PCA needs 1 <= out_features <= {in_features}, got {out_features}")
        self.whiten = whiten
        self.register_buffer("mean", torch.zeros(in_features))
        self.register_buffer("components", torch.zeros(out_features, in_features))
        self.register_buffer("scale", torch.ones(out_features))

    @torch.no_grad()
    def fit(self, x: Tensor) -> dict[str, float]:
        """Fit on ``x [n, in]`` in float64; return ``explained_variance_ratio`` of the kept components."""
        k = self.components.shape[0]
        if x.shape[0] <= k:
            raise ValueError(f"PCA with {k} components needs more than {k} samples, got {x.shape[0]}")
        x = x.double()
        mean = x.mean(0)
        centred = x - mean
        # Eigen-decomposition of the in x in covariance: memory and time are
        # linear in n, so this scales to COCO-sized mask sets.
        cov = centred.T @ centred / (x.shape[0] - 1)
        var, vecs = torch.linalg.eigh(cov)
        var, vecs = var.flip(0).clamp_min(0.0), vecs.flip(1)
        comps = vecs[:, :k].T
        # Eigenvector signs are arbitrary; fix them (largest |loading| positive)
        # so a refit on another device/BLAS gives the same codes.
        pivot = comps.abs().argmax(1, keepdim=True)
        comps = comps * torch.sign(comps.gather(1, pivot))
        kept = var[:k]
        if self.whiten:
            # Floor relative to the top variance: rank-deficient data would
            # otherwise divide by zero.
            scale = kept.clamp_min(kept[0] * 1e-12 + 1e-30).sqrt()
        else:
            scale = torch.ones_like(kept)
        self.mean.copy_(mean)
        self.components.copy_(comps)
        self.scale.copy_(scale)
        total = var.sum()
        ratio = float(kept.sum() / total) if total > 0 else 1.0
        return {"explained_variance_ratio": ratio}

    def project(self, x: Tensor) -> Tensor:
        """``[n, in] -> [n, out]`` (whitened codes when ``whiten``)."""
        return (x - self.mean) @ self.components.T / self.scale

    def unproject(self, codes: Tensor) -> Tensor:
        """``[n, out] -> [n, in]``, linear in ``codes`` (differentiable)."""
        return (codes * self.scale) @ self.components + self.mean


class MaskCodec(nn.Module):
    """Base class of the mask codecs of docs/method.md#mask-embedding.

    Subclasses implement ``_fit``, ``_encode`` and ``_decode`` and pass their
    constructor arguments to ``__init__`` so ``save``/``load_codec`` can rebuild
    them. Public methods validate shapes, move inputs to the codec's
    device/dtype, and enforce fit-before-use.

    * ``encode(masks [n,28,28] in [0,1]) -> [n, dim]`` (no grad: codes are targets).
    * ``decode(codes [n, dim]) -> [n, 28, 28]`` logits, differentiable w.r.t.
      ``codes`` (used inside the Dice term of docs/method.md#loss); ``logit > 0`` is
      the mask (probability > 0.5).

    A codec with ``standardize_codes`` learns, in ``fit``, each code dimension's mean and SD on
    the fitting masks, and its codes are standardised by them: zero mean and unit variance, as
    PCA's whitened codes are. The L2 mask loss and the L2 matching cost (docs/method.md#loss)
    then weigh every codec's codes alike; raw DCT coefficients (SD up to 38) or AE latents (SD
    about 5) would outweigh the box terms many times over.
    """

    standardize_codes: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CODEC_CLASSES[cls.__name__] = cls

    def __init__(self, dim: int, **params: Any) -> None:
        super().__init__()
        num_pixels = MASK_SIZE**2
        if not 1 <= dim <= num_pixels:
            raise ValueError(f"{type(self).__name__}: dim must be in [1, {num_pixels}], got {dim}")
        self.dim = dim
        self.params: dict[str, Any] = {"dim": dim, **params}
        self._fitted = False
        if self.standardize_codes:
            # Identity until fit, so an unfitted DCT codec gives raw coefficients.
            self.register_buffer("code_mean", torch.zeros(dim))
            self.register_buffer("code_scale", torch.ones(dim))

    @property
    def fitted(self) -> bool:
        """Whether ``fit`` ran (or a fitted codec was loaded)."""
        return self._fitted

    def _reference_tensor(self) -> Tensor:
        # Any floating buffer/parameter tells the device/dtype the codec was moved to.
        for t in (*self.buffers(), *self.parameters()):
            if t.is_floating_point():
                return t
        raise RuntimeError(f"{type(self).__name__} has no floating-point state")

    def _check_masks(self, masks: Tensor) -> Tensor:
        s = MASK_SIZE
        if masks.dim() != 3 or masks.shape[1:] != (s, s):
            raise ValueError(f"{type(self).__name__}: masks must be [n, {s}, {s}], got {tuple(masks.shape)}")
        ref = self._reference_tensor()
        return masks.to(device=ref.device, dtype=ref.dtype)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(masks) or load_codec(path) first")

    def _freeze(self) -> None:
        # Frozen after fit (docs/method.md#mask-embedding): the ISTR optimizer only takes
        # parameters with requires_grad, so this keeps the codec out of it.
        self.requires_grad_(False)
        self.eval()

    def fit(self, masks: Tensor) -> dict[str, float]:
        """Fit on training masks ``[n, 28, 28]`` in {0, 1}, freeze, and return stats.

        Stats always contain ``n_masks`` and ``mask_iou``: the mean IoU of
        ``decode(encode(m)) > 0`` against ``m`` on the fitting masks (the
        codec's upper bound on mask quality, docs/method.md#ablations).
        """
        masks = self._check_masks(masks)
        if masks.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.fit: got no masks")
        if bool((masks < 0).any() | (masks > 1).any()):
            raise ValueError(f"{type(self).__name__}.fit: mask values must lie in [0, 1]")
        stats = self._fit(masks)
        if self.standardize_codes:
            self._fit_code_standardization(masks)
        self._fitted = True
        self._freeze()
        return {
            "n_masks": float(masks.shape[0]),
            **stats,
            "mask_iou": self.reconstruction_iou(masks),
        }

    @torch.no_grad()
    def _fit_code_standardization(self, masks: Tensor, batch_size: int = 4096) -> None:
        raw = torch.cat([self._encode(chunk) for chunk in masks.split(batch_size)]).double()
        sd = raw.std(0)
        # A constant dimension keeps scale 1 instead of dividing by zero.
        self.code_mean.copy_(raw.mean(0))
        self.code_scale.copy_(torch.where(sd > 1e-6, sd, torch.ones_like(sd)))

    @torch.no_grad()
    def reconstruction_iou(self, masks: Tensor, batch_size: int = 4096) -> float:
        """Mean IoU of ``decode(encode(m)) > 0`` vs ``m > 0.5`` (docs/method.md#ablations)."""
        masks = self._check_masks(masks)
        if masks.shape[0] == 0:
            raise ValueError("reconstruction_iou: got no masks")
        total = 0.0
        for chunk in masks.split(batch_size):
            pred = self.decode(self.encode(chunk)) > 0
            total += float(mask_iou(pred, chunk > 0.5).sum())
        return total / masks.shape[0]

    @torch.no_grad()
    def encode(self, masks: Tensor) -> Tensor:
        """Masks ``[n, 28, 28]`` in [0, 1] -> embeddings ``[n, dim]`` (docs/method.md#mask-embedding)."""
        self._check_fitted()
        codes = self._encode(self._check_masks(masks))
        if self.standardize_codes:
            codes = (codes - self.code_mean) / self.code_scale
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """Embeddings ``[n, dim]`` -> mask logits ``[n, 28, 28]``, differentiable in ``codes``."""
        self._check_fitted()
        if codes.dim() != 2 or codes.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__}: codes must be [n, {self.dim}], got {tuple(codes.shape)}")
        ref = self._reference_tensor()
        codes = codes.to(device=ref.device, dtype=ref.dtype)
        if self.standardize_codes:
            codes = codes * self.code_scale + self.code_mean
        logits = self._decode(codes)
        return logits.reshape(codes.shape[0], MASK_SIZE, MASK_SIZE)

    def _fit(self, masks: Tensor) -> dict[str, float]:
        """Learn the codec state from checked masks; return codec-specific stats."""
        raise NotImplementedError

    def _encode(self, masks: Tensor) -> Tensor:
        """Checked masks ``[n, 28, 28]`` -> ``[n, dim]``."""
        raise NotImplementedError

    def _decode(self, codes: Tensor) -> Tensor:
        """Checked codes ``[n, dim]`` -> logits ``[n, 784]`` or ``[n, 28, 28]``."""
        raise NotImplementedError

    def get_extra_state(self) -> dict[str, Any]:
        """Carry ``fitted`` through ``state_dict`` without a device tensor (no GPU sync on checks)."""
        return {"fitted": self._fitted}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore ``fitted`` and freeze a loaded, fitted codec."""
        self._fitted = bool(state["fitted"])
        if self._fitted:
            self._freeze()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Atomically write type name, constructor params and state to ``path`` (a crash keeps the old file)."""
        state = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in self.state_dict().items()}
        payload = {
            "format": _SAVE_FORMAT,
            "type": type(self).__name__,
            "params": dict(self.params),
            "state": state,
        }
        atomic_torch_save(path, payload)


def load_codec(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> MaskCodec:
    """Rebuild a codec written by ``MaskCodec.save`` (right class, params and state)."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _SAVE_FORMAT:
        raise ValueError(f"{path}: not a mask codec file (expected format {_SAVE_FORMAT}); re-save it with codec.save")
    cls = _CODEC_CLASSES.get(payload["type"])
    if cls is None:
        raise ValueError(f"{path}: unknown codec type {payload['type']!r}; known: {sorted(_CODEC_CLASSES)}")
    codec = cls(**payload["params"])
    # A file saved before its codec standardised codes has no code_mean/code_scale: the run that
    # wrote it trained on raw codes, so it keeps the identity standardisation it was built with.
    keys = codec.load_state_dict(payload["state"], strict=False)
    if keys.unexpected_keys or set(keys.missing_keys) - {"code_mean", "code_scale"}:
        raise ValueError(
            f"{path}: codec state does not fit {payload['type']}: "
            f"missing {keys.missing_keys}, unexpected {keys.unexpected_keys}"
        )
    return codec
