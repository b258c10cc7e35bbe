"""Shared fixtures: a tiny generated dataset and a tiny config built in code (no copied YAML)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from istr.config import Config, load_config
from istr.data.synth import generate_synthetic_coco

REPO = Path(__file__).resolve().parents[1]
COCO_MINI = REPO.parent / "shared" / "data" / "coco_mini"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(
        root, num_train=16, num_val=6, seed=3, image_size=64, max_instances=3, min_object_frac=0.25, max_object_frac=0.6
    )
    return root


def tiny_overrides(root: Path, cache_dir: Path) -> list[str]:
    """A model small enough for a CPU test step in well under a second."""
    return [
        f"data.root={root}",
        "data.train_json=annotations/instances_train.json",
        "data.train_images=images/train",
        "data.val_json=annotations/instances_val.json",
        "data.val_images=images/val",
        "data.train_short_sizes=[64]",
        "data.train_max_size=64",
        "data.test_short_size=64",
        "data.test_max_size=64",
        "data.num_workers=0",
        f"cache_dir={cache_dir}",
        "codec.dim=16",
        "model.backbone=resnet18",
        "model.norm=bn",
        "model.hidden_dim=32",
        "model.num_queries=8",
        "model.num_stages=2",
        "model.num_heads=2",
        "model.ffn_dim=64",
        "model.dynamic_dim=8",
        "train.max_steps=4",
        "train.batch_size=4",
        "train.lr=1e-4",
        "train.warmup_steps=2",
        "train.lr_steps=[3]",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "eval.batch_size=4",
        "logging.wandb=false",
        "logging.progress=false",
    ]


@pytest.fixture
def tiny_cfg_factory(synth_root: Path, tmp_path: Path):
    """Build a tiny :class:`Config`, with extra ``key=value`` overrides."""

    def make(*extra: str) -> Config:
        return load_config(None, [*tiny_overrides(synth_root, tmp_path / "cache"), *extra])

    return make


@pytest.fixture
def tiny_cfg(tiny_cfg_factory) -> Config:
    return tiny_cfg_factory()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for DDP rendezvous, a test PostgreSQL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
