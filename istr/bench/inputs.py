"""The inputs of ``istr bench``: one seeded synthetic batch both models see, and a codec to encode its masks.

Seeded and generated here, so every run and both models time the same work and nothing is downloaded.
"""

from __future__ import annotations

import torch

from istr.codecs import MASK_SIZE, MaskCodec, build_codec


def synthetic_batch(
    batch: int, height: int, width: int, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, list[dict]]:
    """Seeded uint8 images [B,3,H,W] and per-image targets (3-6 boxes, rectangle/ellipse masks)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    extent = torch.tensor([float(width), float(height)])  # (x, y)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 7, (1,), generator=g))
        wh = (0.15 + 0.5 * torch.rand(n, 2, generator=g)) * extent
        x0y0 = torch.rand(n, 2, generator=g) * (extent - wh)
        boxes = torch.minimum(torch.cat([x0y0, x0y0 + wh], 1).floor().clamp(min=0), extent.repeat(2))
        masks = torch.zeros(n, height, width, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            inside = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
            if i % 2:  # ellipse inscribed in the box
                cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
                inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1
            masks[i] = inside.to(torch.uint8)
        labels = torch.randint(0, num_classes, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def fit_bench_codec(dim: int, seed: int = 0) -> MaskCodec:
    """A PCA codec fitted on 512 random 28x28 rectangles/ellipses (weights never matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.arange(MASK_SIZE) + 0.5
    ys, xs = torch.meshgrid(c, c, indexing="ij")
    lo = torch.rand(512, 2, generator=g) * 8
    hi = MASK_SIZE - torch.rand(512, 2, generator=g) * 8
    x0, y0, x1, y1 = (t[:, None, None] for t in (lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]))
    rect = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    ell = (((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2) <= 1
    masks = torch.where(torch.arange(512)[:, None, None] % 2 == 0, rect, ell).float()
    codec = build_codec("pca", dim)
    codec.fit(masks)
    return codec
