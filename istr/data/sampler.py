"""Deterministic, resumable training order (docs/architecture.md#determinism).

Each step's batch is a pure function of (seed, step, rank), and each sample carries its own
augmentation seed, so a run resumed at step k sees exactly the batches an uninterrupted run would,
whatever the number of loader workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

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
