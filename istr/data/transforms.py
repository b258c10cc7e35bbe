"""Joint image/target transforms: ``(image uint8 [3,H,W], target) -> (image, target)``.

Each transform keeps the image, ``target["boxes"]`` (x1,y1,x2,y2 absolute) and
``target["masks"]`` ([n,H,W] uint8) aligned and updates ``target["size"]``. Randomness comes from
torch's global RNG, so ``torch.manual_seed`` and DataLoader worker seeding make it reproducible.
Training augmentation follows the reference ISTR / detectron2 recipe: with probability
``crop_prob`` a resize to one of ``pre_crop_sizes`` and a random crop, then the multi-scale
ResizeShortestEdge and a horizontal flip (docs/method.md#training).
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


def resized_shape(height: int, width: int, short_edge: int, max_size: int) -> tuple[int, int]:
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
        new_h, new_w = resized_shape(height, width, self._sample_short_edge(), self.max_size)
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


class RandomCrop:
    """detectron2's ``RandomCrop``: ``relative_range`` crops ``[size + U(0, 1 - size)]`` of each side,
    ``absolute_range`` an integer side in ``[size[0], size[1]]`` (capped by the image), at a random offset.

    Boxes are shifted and clipped to the crop; an instance whose mask leaves the crop is dropped.
    """

    TYPES = ("relative_range", "absolute_range")

    def __init__(self, crop_type: str, size: Sequence[float]) -> None:
        if crop_type not in self.TYPES:
            raise ValueError(f"crop type must be one of {self.TYPES}, got {crop_type!r}")
        if len(size) != 2:
            raise ValueError(f"crop size needs two numbers, got {list(size)}")
        self.crop_type, self.size = crop_type, [float(v) for v in size]

    def _crop_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.crop_type == "relative_range":
            fh, fw = (s + torch.rand(()).item() * (1 - s) for s in self.size)
            return int(height * fh + 0.5), int(width * fw + 0.5)
        low, high = int(self.size[0]), int(self.size[1])
        ch = int(torch.randint(min(height, low), min(height, high) + 1, ()).item())
        cw = int(torch.randint(min(width, low), min(width, high) + 1, ()).item())
        return ch, cw

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        height, width = image.shape[-2:]
        ch, cw = self._crop_shape(height, width)
        y0 = int(torch.randint(height - ch + 1, ()).item())
        x0 = int(torch.randint(width - cw + 1, ()).item())
        image = image[:, y0 : y0 + ch, x0 : x0 + cw]
        target = dict(target)
        boxes = target["boxes"] - torch.tensor([x0, y0, x0, y0], dtype=target["boxes"].dtype)
        xs, ys = boxes[:, 0::2].clamp(0, cw), boxes[:, 1::2].clamp(0, ch)
        boxes = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
        masks = target["masks"][:, y0 : y0 + ch, x0 : x0 + cw]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & masks.flatten(1).any(1).bool()
        target.update(boxes=boxes[keep], labels=target["labels"][keep], masks=masks[keep], size=(ch, cw))
        return image, target

    def __repr__(self) -> str:
        return f"RandomCrop({self.crop_type!r}, {self.size})"


class RandomApply:
    """Apply ``transforms`` (as one Compose) with probability ``prob``, else pass through."""

    def __init__(self, transforms: Sequence, prob: float) -> None:
        self.compose, self.prob = Compose(transforms), prob

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        if torch.rand(()).item() >= self.prob:
            return image, target
        return self.compose(image, target)

    def __repr__(self) -> str:
        return f"RandomApply({self.compose}, prob={self.prob})"


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


def build_transforms(
    train: bool,
    short_edge_lengths: Sequence[int],
    max_size: int,
    flip_prob: float = 0.5,
    crop: RandomCrop | None = None,
    crop_prob: float = 0.5,
    pre_crop_sizes: Sequence[int] = (400, 500, 600),
) -> Compose:
    """Train: [p=crop_prob: resize to one of pre_crop_sizes + crop] + multi-scale resize (choice) + flip.

    Test: resize to the one given length, no flip, no crop.
    """
    if train:
        steps: list = []
        if crop is not None:
            steps.append(RandomApply([ResizeShortestEdge(pre_crop_sizes, max_size, "choice"), crop], crop_prob))
        steps += [ResizeShortestEdge(short_edge_lengths, max_size, "choice"), RandomHorizontalFlip(flip_prob)]
        return Compose(steps)
    if len(short_edge_lengths) != 1:
        raise ValueError(
            f"test transforms need exactly one short edge length, got {list(short_edge_lengths)}; pass [test_size]"
        )
    return Compose([ResizeShortestEdge(short_edge_lengths, max_size)])
