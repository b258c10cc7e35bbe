"""Joint image/target transforms: ``(image uint8 [3,H,W], target) -> (image, target)``.

Each transform keeps the image, ``target["boxes"]`` (x1,y1,x2,y2 absolute) and
``target["masks"]`` ([n,H,W] uint8) aligned and updates ``target["size"]``. Randomness comes from
torch's global RNG, so ``torch.manual_seed`` and DataLoader worker seeding make it reproducible.
Training augmentation follows the reference ISTR / detectron2 recipe (multi-scale
ResizeShortestEdge + horizontal flip); the reference's random crop is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.transforms.v2.functional import InterpolationMode, resize


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"


def _resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge.get_output_shape: short = short_edge, long <= max_size."""
    scale = short_edge / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        cap = max_size / max(new_h, new_w)
        new_h, new_w = new_h * cap, new_w * cap
    return int(new_h + 0.5), int(new_w + 0.5)


class ResizeShortestEdge:
    """Resize so the short side is a sampled length and the long side at most ``max_size``.

    As detectron2's ``ResizeShortestEdge``: ``sample="choice"`` picks one of
    ``short_edge_lengths``; ``"range"`` draws an integer in ``[min, max]`` of a two-element list.
    Images use antialiased bilinear, masks nearest (``nearest-exact``, pixel-centre aligned like
    the image), boxes are scaled per axis.
    """

    def __init__(self, short_edge_lengths: Sequence[int], max_size: int, sample: str = "choice") -> None:
        if sample not in ("choice", "range"):
            raise ValueError(f"sample must be 'choice' or 'range', got {sample!r}")
        if not short_edge_lengths or (sample == "range" and len(short_edge_lengths) != 2):
            raise ValueError(f"bad short_edge_lengths {list(short_edge_lengths)} for sample={sample!r}")
        self.short_edge_lengths = [int(s) for s in short_edge_lengths]
        self.max_size = int(max_size)
        self.sample = sample

    def _sample_short_edge(self) -> int:
        if self.sample == "range":
            low, high = self.short_edge_lengths
            return int(torch.randint(low, high + 1, ()).item())
        return self.short_edge_lengths[int(torch.randint(len(self.short_edge_lengths), ()).item())]

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        height, width = image.shape[-2:]
        new_h, new_w = _resized_shape(height, width, self._sample_short_edge(), self.max_size)
        image = resize(image, [new_h, new_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        target = dict(target)
        if "boxes" in target:
            factor = torch.tensor([new_w / width, new_h / height] * 2, dtype=target["boxes"].dtype)
            target["boxes"] = target["boxes"] * factor
        if "masks" in target:
            masks = target["masks"]
            if masks.shape[0]:
                masks = interpolate(masks[None].float(), size=(new_h, new_w), mode="nearest-exact")[0]
                target["masks"] = masks.to(torch.uint8)
            else:  # interpolate rejects empty batches
                target["masks"] = masks.new_zeros((0, new_h, new_w))
        target["size"] = (new_h, new_w)
        return image, target

    def __repr__(self) -> str:
        return f"ResizeShortestEdge({self.short_edge_lengths}, max_size={self.max_size}, sample={self.sample!r})"


class RandomHorizontalFlip:
    """Flip image, masks and boxes left-right with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(()).item() >= self.prob:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        if "boxes" in target:
            x1, y1, x2, y2 = target["boxes"].unbind(-1)
            target["boxes"] = torch.stack([width - x2, y1, width - x1, y2], dim=-1)
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        target["size"] = tuple(image.shape[-2:])
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(prob={self.prob})"


def build_transforms(train: bool, short_edge_lengths: Sequence[int], max_size: int, flip_prob: float = 0.5) -> Compose:
    """Train: multi-scale resize (choice) + flip. Test: resize to the one given length, no flip."""
    if train:
        return Compose(
            [
                ResizeShortestEdge(short_edge_lengths, max_size, "choice"),
                RandomHorizontalFlip(flip_prob),
            ]
        )
    if len(short_edge_lengths) != 1:
        raise ValueError(
            f"test transforms need exactly one short edge length, got {list(short_edge_lengths)}; pass [test_size]"
        )
    return Compose([ResizeShortestEdge(short_edge_lengths, max_size)])
