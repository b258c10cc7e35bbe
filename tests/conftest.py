"""Shared fixtures: a tiny generated dataset and a tiny config built in code (no copied YAML); and the helpers that
more than one test module uses (random masks, targets and head outputs, a tiny model), so that no test module
imports another."""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from istr.config import Config, load_config
from istr.data.synth import generate_synthetic_coco
from istr.model import ISTR, build_model
from istr.targets import BatchTargets, prepare_targets

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3  # of the made-up targets and head outputs below, and of make_model
CODE_DIM = 16  # make_model's mask embedding: codec.dim of the tiny config

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


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server (initdb + pg_ctl on a free loopback port), stopped at teardown."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; install the 'postgresql' package")
    base = Path(tempfile.mkdtemp(prefix="istr-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        shutil.chown(base, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8"],
                   check=True, capture_output=True)
    opts = f"-k {base} -p {port} -c listen_addresses=127.0.0.1"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # bare URL: SQLAlchemy picks psycopg 3
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------- helpers shared by test modules


def rect_masks(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Random filled rectangles: a training set any codec can fit in well under a second."""
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros((n, size, size))
    for mask in masks:
        x, y = torch.randint(0, size // 2, (2,), generator=gen).tolist()
        w, h = torch.randint(4, size // 2 + 1, (2,), generator=gen).tolist()
        mask[y : y + h, x : x + w] = 1
    return masks


def synthetic_targets(image_hw: tuple[int, int], seed: int, counts: list[int]) -> list[dict]:
    """Data-loader targets: per instance a random box holding an inscribed filled ellipse."""
    gen = torch.Generator().manual_seed(seed)
    h, w = image_hw
    ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    targets = []
    for n in counts:
        boxes, masks = [], []
        for _ in range(n):
            x1, y1 = (torch.rand(2, generator=gen) * torch.tensor([w / 2, h / 2])).tolist()
            bw, bh = (torch.rand(2, generator=gen) * torch.tensor([w / 3, h / 3]) + 12).tolist()
            cx, cy = x1 + bw / 2, y1 + bh / 2
            masks.append((((xs - cx) / (bw / 2)) ** 2 + ((ys - cy) / (bh / 2)) ** 2 <= 1).to(torch.uint8))
            boxes.append([x1, y1, x1 + bw, y1 + bh])
        targets.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
                "masks": torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.uint8),
            }
        )
    return targets


def batch_targets(codec, counts: list[int], image_hw: tuple[int, int] = (64, 64), seed: int = 0) -> BatchTargets:
    """:func:`synthetic_targets` of ``len(counts)`` images, prepared (``codec``-encoded) as the criterion takes them."""
    sizes = torch.tensor([image_hw] * len(counts))
    return prepare_targets(synthetic_targets(image_hw, seed, counts), sizes, codec, torch.device("cpu"))


def random_stage(batch: int, k: int, dim: int, gen: torch.Generator) -> dict:
    """One stage of head outputs: random logits, valid xyxy boxes inside a 64x64 image, random codes."""
    xy = torch.rand((batch, k, 2), generator=gen) * 40
    wh = torch.rand((batch, k, 2), generator=gen) * 20 + 4
    return {
        "logits": torch.randn((batch, k, NUM_CLASSES), generator=gen),
        "boxes": torch.cat([xy, xy + wh], dim=-1),
        "codes": torch.randn((batch, k, dim), generator=gen),
    }


def make_model(cfg, **model_overrides) -> ISTR:
    """The model of ``cfg`` (with ``model.*`` overrides), seeded: NUM_CLASSES classes, CODE_DIM-long codes."""
    torch.manual_seed(0)
    return build_model(dataclasses.replace(cfg.model, **model_overrides), NUM_CLASSES, CODE_DIM)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def box_evaluation(gt_seed: int, det_seed: int, n_images: int = 40, noise: float = 3.0, categories: int = 3,
                   crowd_rate: float = 0.0, found_rate: float = 0.85, false_rate: float = 0.5) -> Any:
    """A pycocotools COCOeval (bbox) after ``evaluate()``: 1-3 boxes per image drawn with ``gt_seed`` (a share of
    them crowd), each found with jitter ``noise`` at rate ``found_rate``, plus a false positive at ``false_rate``,
    drawn with ``det_seed``; for the per-image records (istr/eval_images.py) without training a model."""
    import contextlib
    import io

    import numpy as np
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_rng, rng = np.random.default_rng(gt_seed), np.random.default_rng(det_seed)
    images, annotations, detections = [], [], []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": 100, "height": 100})
        for _ in range(gt_rng.integers(1, 4)):
            x, y, w, h = gt_rng.uniform(0, 60, 2).tolist() + gt_rng.uniform(10, 40, 2).tolist()
            category = int(gt_rng.integers(1, categories + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h,
                                "iscrowd": int(gt_rng.random() < crowd_rate)})  # fmt: skip
            if rng.random() < found_rate:
                j = rng.normal(0, noise, 4)
                detections.append({"image_id": image_id, "category_id": category, "score": float(rng.random()),
                                   "bbox": [x + j[0], y + j[1], abs(w + j[2]), abs(h + j[3])]})  # fmt: skip
        if rng.random() < false_rate:
            detections.append({"image_id": image_id, "category_id": int(rng.integers(1, categories + 1)),
                               "score": float(rng.random()), "bbox": rng.uniform(0, 60, 4).tolist()})  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": c, "name": str(c)} for c in range(1, categories + 1)]}  # fmt: skip
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
    return evaluator
