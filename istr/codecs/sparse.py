"""Sparse-coding mask codec over a learned dictionary ("SMT"-like, docs/method.md#mask-embedding, 2022 version)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from istr.codecs.base import MASK_SIZE, MaskCodec, WhitenedPCA, mask_iou, masks_to_logits


def soft_threshold(x: Tensor, threshold: Tensor | float) -> Tensor:
    """Proximal operator of ``threshold * ||x||_1``."""
    return torch.sign(x) * (x.abs() - threshold).clamp_min(0.0)


def fista(
    x: Tensor,
    dictionary: Tensor,
    sparsity: float,
    steps: int,
    step_size: Tensor | float,
    init: Tensor | None = None,
) -> Tensor:
    """FISTA for ``min_a 0.5 * ||x - a @ D||^2 + sparsity * ||a||_1`` row-wise.

    ``x [n, d]``, ``D [k, d]`` -> ``a [n, k]``; ``step_size`` must be at most
    ``1 / ||D||_2^2``. Works through the ``k x k`` Gram matrix so each step
    costs ``n*k*k`` instead of ``n*k*d``.
    """
    gram = dictionary @ dictionary.T
    target = x @ dictionary.T
    codes = torch.zeros_like(target) if init is None else init.clone()
    momentum_point, t = codes, 1.0
    for _ in range(steps):
        grad = momentum_point @ gram - target
        new = soft_threshold(momentum_point - step_size * grad, sparsity * step_size)
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum_point = new + ((t - 1.0) / t_new) * (new - codes)
        codes, t = new, t_new
    return codes


class SparseCodec(MaskCodec):
    """Sparse codes over a learned dictionary, compressed to ``dim`` (docs/method.md#mask-embedding).

    Fit (in mask-logit space, +-4.6 as for PCA, mean-centred): ``num_atoms``
    unit-norm atoms ``D`` (over-complete w.r.t. the embedding: ``num_atoms >=
    dim``, though 256 < 784 pixels) are learned by alternating FISTA sparse coding of all
    training masks (L1 weight ``sparsity``, in logit units) with a ridge
    least-squares dictionary update (MOD), re-seeding unused atoms from the
    worst-reconstructed masks, for ``iterations`` rounds.

    Meaning of ``dim`` (so the ISTR head predicts as many numbers as for PCA):
    the sparse code ``a = FISTA(logit(m) - mean)`` has length ``num_atoms``;
    the embedding is its whitened PCA projection to ``dim`` components,
    fitted on the training masks' codes:
    ``encode(m) = P(a)`` and ``decode(e) = P^+(e) @ D + mean`` (``P^+`` the
    PCA reconstruction). The decoder is thus linear of rank ``dim``; the
    sparse prior shapes the subspace through the codes, and the encoder is
    non-linear. With ``dim == num_atoms`` the projection is an invertible
    rotation, i.e. the embedding is the full (rotated, whitened) sparse code.
    Fit stats also report ``sparse_mask_iou`` (IoU from the full
    ``num_atoms`` code, before projection) and ``active_atoms`` (mean nonzeros).
    """

    def __init__(
        self,
        dim: int = 60,
        num_atoms: int = 256,
        sparsity: float = 1.0,
        iterations: int = 8,
        coding_steps: int = 40,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dim,
            num_atoms=num_atoms,
            sparsity=sparsity,
            iterations=iterations,
            coding_steps=coding_steps,
            seed=seed,
        )
        if num_atoms < dim:
            raise ValueError(f"SparseCodec: num_atoms ({num_atoms}) must be >= dim ({dim})")
        self.num_atoms, self.sparsity, self.iterations = num_atoms, sparsity, iterations
        self.coding_steps, self.seed = coding_steps, seed
        pixels = MASK_SIZE**2
        self.register_buffer("mean", torch.zeros(pixels))
        self.register_buffer("dictionary", torch.zeros(num_atoms, pixels))
        self.register_buffer("step_size", torch.ones(()))
        self.code_pca = WhitenedPCA(num_atoms, dim)

    def _sparse_code(self, centred: Tensor, init: Tensor | None = None) -> Tensor:
        return fista(centred, self.dictionary, self.sparsity, self.coding_steps, self.step_size, init)

    def _set_dictionary(self, dictionary: Tensor) -> None:
        self.dictionary.copy_(dictionary / dictionary.norm(dim=1, keepdim=True).clamp_min(1e-12))
        # Lipschitz constant of the smooth part is ||D||_2^2.
        self.step_size.fill_(1.0 / float(torch.linalg.matrix_norm(self.dictionary, ord=2)) ** 2)

    def _update_dictionary(self, centred: Tensor, codes: Tensor) -> Tensor:
        """Ridge least squares ``argmin_D ||X - A D||^2`` (MOD), re-seeding unused atoms."""
        a = codes.double()
        gram = a.T @ a
        ridge = 1e-6 * float(gram.diagonal().mean()) + 1e-12
        eye = torch.eye(self.num_atoms, dtype=a.dtype, device=a.device)
        new = torch.linalg.solve(gram + ridge * eye, a.T @ centred.double()).to(centred.dtype)
        unused = (codes != 0).sum(0) == 0
        if bool(unused.any()):
            residual = centred - codes @ new
            worst = residual.norm(dim=1).argsort(descending=True)
            picks = worst[torch.arange(int(unused.sum()), device=worst.device) % worst.numel()]
            new[unused] = residual[picks]
        return new

    def _fit(self, masks: Tensor) -> dict[str, float]:
        logits = masks_to_logits(masks)
        self.mean.copy_(logits.mean(0))
        centred = logits - self.mean
        # Seeded init from random training masks (plus noise to split duplicates).
        gen = torch.Generator().manual_seed(self.seed)
        picks = torch.randint(centred.shape[0], (self.num_atoms,), generator=gen).to(centred.device)
        noise = torch.randn(self.num_atoms, centred.shape[1], generator=gen).to(centred)
        self._set_dictionary(centred[picks] + 0.1 * noise)
        codes = None
        for _ in range(self.iterations):
            # Warm start: the previous codes are close to optimal for the updated D.
            codes = self._sparse_code(centred, init=codes)
            self._set_dictionary(self._update_dictionary(centred, codes))
        # Cold-start codes, exactly as encode() computes them.
        codes = self._sparse_code(centred)
        stats = self.code_pca.fit(codes)
        sparse_pred = (codes @ self.dictionary + self.mean).view_as(masks) > 0
        return {
            "code_explained_variance_ratio": stats["explained_variance_ratio"],
            "sparse_mask_iou": float(mask_iou(sparse_pred, masks > 0.5).mean()),
            "active_atoms": float((codes != 0).sum(1).float().mean()),
        }

    def _encode(self, masks: Tensor) -> Tensor:
        return self.code_pca.project(self._sparse_code(masks_to_logits(masks) - self.mean))

    def _decode(self, codes: Tensor) -> Tensor:
        return self.code_pca.unproject(codes) @ self.dictionary + self.mean
