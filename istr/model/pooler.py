"""RoI feature pooling: each query box reads an SxS feature grid from its FPN level (docs/method.md#architecture).

Interchangeable implementations (``model.pooler``):
- ``roi_align``: torchvision's ``roi_align`` per level (the reference; its CPU kernels are single-threaded).
- ``grid_sample``: the same bilinear RoIAlign sampling (aligned=True, fixed sampling ratio, FPN level
  rule of Eq. 1 in the FPN paper) done with one ``F.grid_sample`` per level, whose CPU forward and
  backward run multi-threaded. Interior samples match RoIAlign exactly; samples that fall outside
  the feature map read the border value.
- ``sparse``: grid_sample's sampling (border included) as one sparse matrix product over all levels;
  the fastest on CPU (CPU only).
- ``auto``: ``sparse`` on the CPU, ``grid_sample`` on other devices.

A pooler is called as ``pooler(pooler.prepare(features), boxes)``; ``prepare`` runs once per forward
and its result is shared by every stage.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from istr.model.backbone import LEVEL_NAMES

STRIDES = (4, 8, 16, 32)


def assign_levels(boxes: Tensor, canonical_scale: float = 224.0, canonical_level: int = 4) -> Tensor:
    """FPN level index (0 = P2 ... 3 = P5) per box: floor(4 + log2(sqrt(area) / 224)), clamped."""
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale + 1e-8))
    return (level.clamp(2, 5) - 2).long()


def connect_unused_levels(pooled: Tensor, features: dict[str, Tensor], used: list[int]) -> Tensor:
    """Add 0 x every FPN level no box was assigned to, so its parameters still get a (zero) grad.

    Small images put every box on P2; without this DDP fails on unused FPN parameters.
    """
    for level, name in enumerate(LEVEL_NAMES):
        if level not in used:
            pooled = pooled + 0.0 * features[name].sum()
    return pooled


class Pooler(nn.Module):
    """Base of the poolers: S x S bins of ``sampling_ratio`` x ``sampling_ratio`` samples each."""

    adaptive_ratio = False  # True: sampling_ratio 0 means roi_align's adaptive count; else it is at least 1

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__()
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio if self.adaptive_ratio else max(1, sampling_ratio)

    def prepare(self, features: dict[str, Tensor]) -> Any:
        """The pooler's view of the FPN features, computed once per forward (here: the features as given)."""
        return features


class GridSamplePooler(Pooler):
    def sample_grid(self, boxes: Tensor, stride: int, height: int, width: int) -> Tensor:
        """Normalised grid_sample coordinates [..., S*S, r*r, 2] of the RoIAlign sampling points.

        Bins in row-major order, then the r x r samples of each bin (row-major), so one bin's samples
        are adjacent in ``grid_sample``'s output and average over its contiguous last dim.
        """
        s, r = self.output_size, self.sampling_ratio
        steps = (torch.arange(s * r, device=boxes.device, dtype=boxes.dtype) + 0.5) / (s * r)
        x0, y0, x1, y1 = (boxes / stride).unbind(-1)
        xs = (x0 - 0.5)[..., None] + (x1 - x0)[..., None] * steps  # feature-pixel coordinates (aligned=True)
        ys = (y0 - 0.5)[..., None] + (y1 - y0)[..., None] * steps
        gx = ((2 * xs + 1) / width - 1).unflatten(-1, (s, r))  # align_corners=False convention; [..., S, r]
        gy = ((2 * ys + 1) / height - 1).unflatten(-1, (s, r))
        # [..., S_y, S_x, r_y, r_x, 2]
        gx = gx[..., None, :, None, :].expand(*gx.shape[:-2], s, s, r, r)
        gy = gy[..., :, None, :, None].expand(*gy.shape[:-2], s, s, r, r)
        return torch.stack((gx, gy), dim=-1).flatten(-5, -4).flatten(-3, -2)

    def pool_level(self, feature: Tensor, boxes: Tensor, stride: int) -> Tensor:
        """feature [B,C,H,W], boxes [B,m,4] on this level -> [B, m, S*S, C]."""
        batch, m = boxes.shape[:2]
        grid = self.sample_grid(boxes, stride, feature.shape[-2], feature.shape[-1])  # [B,m,S*S,r*r,2]
        sampled = F.grid_sample(feature, grid.flatten(1, 2), align_corners=False, padding_mode="border")
        # [B, C, m*S*S]: mean of each bin's r x r samples; sum then scale, so the backward's division
        # runs on this r*r times smaller tensor
        pooled = sampled.sum(-1) / self.sampling_ratio**2
        return pooled.transpose(1, 2).unflatten(1, (m, self.output_size**2))

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """features P2-P5 [B,C,H,W], boxes [B,k,4] -> RoI tokens [B*k, S*S, C]."""
        batch, k = boxes.shape[:2]
        levels = assign_levels(boxes)
        used = levels.unique().tolist()
        if len(used) == 1:  # common case (one object scale): no packing needed
            pooled = self.pool_level(features[LEVEL_NAMES[used[0]]], boxes, STRIDES[used[0]])
            return connect_unused_levels(pooled.flatten(0, 1), features, used)
        out: Tensor | None = None
        for level in used:
            selected = levels == level
            # Pack each image's boxes of this level into the first slots of a [B, m, 4] tensor.
            rank = selected.long().cumsum(1) - 1
            b_idx, q_idx = selected.nonzero(as_tuple=True)
            slots = rank[b_idx, q_idx]
            packed = boxes.new_zeros((batch, int(selected.sum(1).max()), 4))
            packed[b_idx, slots] = boxes[b_idx, q_idx]
            pooled = self.pool_level(features[LEVEL_NAMES[level]], packed, STRIDES[level])
            if out is None:  # pooled's dtype, not the features': autocast runs grid_sample in float32
                out = pooled.new_empty((batch, k, *pooled.shape[2:]))
            out[b_idx, q_idx] = pooled[b_idx, slots]
        return connect_unused_levels(out.flatten(0, 1), features, used)


class RoIAlignPooler(Pooler):
    """torchvision ``roi_align`` (aligned=True, i.e. detectron2's ROIAlignV2 used by ISTR) per FPN level."""

    adaptive_ratio = True

    def forward(self, features: dict[str, Tensor], boxes: Tensor) -> Tensor:
        """features P2-P5 [B,C,H,W], boxes [B,k,4] -> RoI tokens [B*k, S*S, C]."""
        batch, k = boxes.shape[:2]
        flat_boxes = boxes.flatten(0, 1)
        image_idx = torch.arange(batch, device=boxes.device).repeat_interleave(k)
        levels = assign_levels(flat_boxes)
        first = features[LEVEL_NAMES[0]]
        out = first.new_zeros((batch * k, first.shape[1], self.output_size, self.output_size))
        used = levels.unique().tolist()
        for level in used:
            idx = (levels == level).nonzero().flatten()
            rois = torch.cat([image_idx[idx, None].to(boxes.dtype), flat_boxes[idx]], dim=1)
            out[idx] = roi_align(features[LEVEL_NAMES[level]], rois, self.output_size, 1.0 / STRIDES[level],
                                 self.sampling_ratio, aligned=True)
        return connect_unused_levels(out.flatten(2).transpose(1, 2), features, used)


class _SparseProduct(torch.autograd.Function):
    """``matrix @ dense`` for a constant sparse CSR ``matrix``; the backward is the transposed product."""

    @staticmethod
    def forward(ctx, matrix: Tensor, dense: Tensor) -> Tensor:
        ctx.matrix = matrix
        return torch.sparse.mm(matrix, dense, "sum")

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, torch.sparse.mm(transpose_csr(ctx.matrix), grad.contiguous(), "sum")


def transpose_csr(matrix: Tensor) -> Tensor:
    """The CSR transpose of a CSR matrix: entries sorted by column (duplicate entries stay; products sum them).

    Indices keep the matrix's index dtype; int32 indices sort in about half the time of int64 ones.
    """
    index_dtype = matrix.col_indices().dtype
    rows = torch.arange(matrix.shape[0], device=matrix.device, dtype=index_dtype)
    rows = rows.repeat_interleave(matrix.crow_indices().diff())
    cols = matrix.col_indices()
    order = torch.argsort(cols)
    crow = torch.zeros(matrix.shape[1] + 1, dtype=index_dtype, device=matrix.device)
    crow[1:] = torch.bincount(cols, minlength=matrix.shape[1]).cumsum(0)
    # index_select, not rows[order]: about 8x faster for these 1-D gathers on the CPU
    return _csr(crow, rows.index_select(0, order), matrix.values().index_select(0, order),
                (matrix.shape[1], matrix.shape[0]))  # fmt: skip


def _csr(crow: Tensor, cols: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """A CSR tensor from indices built here (valid by construction, so torch's invariant check is skipped)."""
    with warnings.catch_warnings():  # torch's once-per-process "sparse CSR is in beta" notice
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class LevelPixels:
    """Channels-last pixels [sum of B*H*W, C] of a set of FPN levels, made once per set in one forward."""

    def __init__(self, features: dict[str, Tensor]) -> None:
        self.levels = [features[name] for name in LEVEL_NAMES]
        self.shapes = [tuple(f.shape[-2:]) for f in self.levels]
        self._pixels: dict[tuple[int, ...], Tensor] = {}

    def __getitem__(self, used: tuple[int, ...]) -> Tensor:
        if used not in self._pixels:
            flat = [self.levels[level].permute(0, 2, 3, 1).reshape(-1, self.levels[level].shape[1]) for level in used]
            self._pixels[used] = flat[0] if len(flat) == 1 else torch.cat(flat)
        return self._pixels[used]


class SparsePooler(Pooler):
    """The grid_sample pooler's sampling (same points, border clamping) as ONE sparse matrix product.

    The FPN levels the boxes use, flattened channels-last (:class:`LevelPixels`), are the columns of one
    [pixels, C] matrix; each RoI bin is a sparse row holding the bilinear weights of its r x r samples
    (4 r^2 entries, 1/r^2 averaging folded in). Forward and backward are each one CSR x dense product,
    reading whole C-vectors per pixel, where ``grid_sample`` on NCHW strides through channels; levels
    no box uses cost nothing (ISTR's image feature gives every level a gradient). For CPU fp32.
    """

    def prepare(self, features: dict[str, Tensor]) -> LevelPixels:
        """The levels' channels-last pixels, flattened on first use and shared by every stage of this forward."""
        return LevelPixels(features)

    @torch.no_grad()
    def sampling_matrix(self, boxes: Tensor, levels: Tensor, used: list[int], shapes: list[tuple[int, int]]) -> Tensor:
        """CSR [B*k*S*S, pixels of the ``used`` levels]: row (roi, bin) holds its 4 r^2 bilinear corners."""
        s, r = self.output_size, self.sampling_ratio
        batch, flat = boxes.shape[0], boxes.flatten(0, 1)
        sizes = torch.tensor(shapes, device=boxes.device)  # [L, 2] (H, W)
        level_pixels = batch * sizes.prod(1)
        base = torch.zeros_like(level_pixels)
        base[used] = level_pixels[used].cumsum(0) - level_pixels[used]  # column offset of each used level
        image = torch.arange(batch, device=boxes.device).repeat_interleave(boxes.shape[1])
        height, width = sizes[levels].unbind(1)  # [R]
        start = base[levels] + image * height * width
        stride = torch.tensor(STRIDES, device=boxes.device, dtype=boxes.dtype)[levels][:, None]
        steps = (torch.arange(s * r, device=boxes.device, dtype=boxes.dtype) + 0.5) / (s * r)
        x0, y0, x1, y1 = (flat / stride).unbind(-1)

        def corners(lo: Tensor, hi: Tensor, size: Tensor) -> tuple[Tensor, Tensor]:
            # aligned=True sample coordinates, clamped to the border as grid_sample's padding_mode="border"
            pos = ((lo - 0.5)[:, None] + (hi - lo)[:, None] * steps).clamp(min=0)
            pos = torch.minimum(pos, (size - 1)[:, None].to(pos.dtype))
            low = pos.floor()
            frac = pos - low
            index = torch.stack((low, torch.minimum(low + 1, (size - 1)[:, None].to(pos.dtype))), -1).long()
            weight = torch.stack((1 - frac, frac), -1)
            return index.view(-1, s, 2 * r), weight.view(-1, s, 2 * r)  # [R, S, r*2]

        ix, wx = corners(x0, x1, width)
        iy, wy = corners(y0, y1, height)
        # [R, S_y, S_x, 2r (y), 2r (x)]: every (y corner, x corner) pair of the bin's samples
        row_start = start[:, None, None] + iy * width[:, None, None]  # [R, S_y, 2r]
        cols = row_start[:, :, None, :, None] + ix[:, None, :, None, :]
        vals = (wy[:, :, None, :, None] * wx[:, None, :, None, :]) / r**2
        per_row = 4 * r * r
        num_pixels = int(level_pixels[used].sum())
        # int32 indices where they fit: the backward's transpose sorts them (transpose_csr)
        index_dtype = torch.int32 if max(cols.numel(), num_pixels) < 2**31 else torch.int64
        crow = torch.arange(0, cols.numel() + 1, per_row, device=boxes.device, dtype=index_dtype)
        return _csr(crow, cols.flatten().to(index_dtype), vals.flatten(), (cols.numel() // per_row, num_pixels))

    def forward(self, prepared: LevelPixels, boxes: Tensor) -> Tensor:
        """(:meth:`prepare` output, boxes [B,k,4]) -> RoI tokens [B*k, S*S, C]."""
        levels = assign_levels(boxes.flatten(0, 1))
        used = levels.unique().tolist()
        pixels = prepared[tuple(used)]
        matrix = self.sampling_matrix(boxes, levels, used, prepared.shapes)
        pooled = _SparseProduct.apply(matrix.to(pixels.dtype), pixels)
        return pooled.view(boxes.shape[0] * boxes.shape[1], self.output_size**2, pixels.shape[1])


class AutoPooler(Pooler):
    """``sparse`` where the features are on the CPU, ``grid_sample`` elsewhere (CUDA; its sparse product is
    CPU-only): the same sampling on every device, so a preset runs unchanged on a laptop and on a GPU."""

    def __init__(self, output_size: int, sampling_ratio: int) -> None:
        super().__init__(output_size, sampling_ratio)
        self.cpu_pooler = SparsePooler(output_size, sampling_ratio)
        self.device_pooler = GridSamplePooler(output_size, sampling_ratio)

    def prepare(self, features: dict[str, Tensor]) -> tuple[Pooler, Any]:
        on_cpu = features[LEVEL_NAMES[0]].device.type == "cpu"
        pooler = self.cpu_pooler if on_cpu else self.device_pooler
        return pooler, pooler.prepare(features)

    def forward(self, prepared: tuple[Pooler, Any], boxes: Tensor) -> Tensor:
        pooler, features = prepared
        return pooler(features, boxes)


POOLERS: dict[str, type[Pooler]] = {
    "roi_align": RoIAlignPooler,
    "grid_sample": GridSamplePooler,
    "sparse": SparsePooler,
    "auto": AutoPooler,
}
