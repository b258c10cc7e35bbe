"""Batch samplers: the deterministic, resumable training order and the evaluation batches.

Training (docs/architecture.md#determinism): each step's batch is a pure function of (seed, step,
rank), and each sample carries its own augmentation seed, so a run resumed at step k sees exactly the
batches an uninterrupted run would, whatever the number of loader workers.

Evaluation (docs/method.md#evaluation): batches hold images of one padded shape, so every image is
padded as it would be alone and its detections do not depend on ``eval.batch_size``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from istr.data.coco import CocoInstances
from istr.data.collate import padded_size
from istr.data.transforms import resized_shape

_PRIME = 1_000_003


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Infinite stream of per-rank batches of (dataset index, sample seed), starting at ``start_step``.

    Epoch e is a permutation seeded by (seed, e); each global batch of ``batch_size * world_size``
    samples is split across ranks (like DistributedSampler, drop-last).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_step: int = 0
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.global_batch = batch_size * world_size
        self.steps_per_epoch = max(1, num_samples // self.global_batch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * _PRIME + epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        if len(order) < self.global_batch:  # tiny datasets: cycle the permutation
            order = order.repeat(self.global_batch // len(order) + 1)
        return order

    def batch_at(self, step: int) -> list[tuple[int, int]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch + self.rank * self.batch_size
        indices = self.epoch_order(epoch)[start : start + self.batch_size].tolist()
        return [(i, (self.seed * _PRIME + step) * _PRIME + i) for i in indices]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1


class SeededSamples(Dataset):
    """Wraps a dataset so ``ds[(index, seed)]`` runs its random transforms under ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % 2**63)
            return self.dataset[index]


def eval_padded_shapes(
    dataset: CocoInstances, short_edge: int, max_size: int, size_divisibility: int
) -> list[tuple[int, int]]:
    """(H, W) of each dataset index's image after the test resize and collation's padding.

    From the json's width/height (which ``CocoInstances`` checks against the decoded file), so no
    image is decoded; the resize and padding rules are the ones the test transform and
    ``collate_batch`` run (docs/method.md#evaluation).
    """
    shapes = []
    for image_id in dataset.image_ids:
        record = dataset.coco.imgs[image_id]
        resized = resized_shape(int(record["height"]), int(record["width"]), short_edge, max_size)
        shapes.append(padded_size(*resized, size_divisibility))
    return shapes


class ShapeGroupedBatchSampler(Sampler[list[int]]):
    """Batches of at most ``batch_size`` dataset indices that share a key (e.g. the padded shape).

    ``keys[i]`` is index i's key. Groups come in the order of their first index, and each group's
    indices in dataset order, so the batches are a deterministic function of the keys. With the
    padded eval shapes as keys (:func:`eval_padded_shapes`), collation pads no image beyond its own
    padded size and a model sees the same tensor per image at any batch size (docs/method.md#evaluation).
    """

    def __init__(self, keys: Sequence[Hashable], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        groups: dict[Hashable, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)
        self.batches = [
            members[start : start + batch_size]
            for members in groups.values()
            for start in range(0, len(members), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(batch) for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)
