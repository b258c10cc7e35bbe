"""Load a finished run and draw prediction overlays (``istr predict``, ``istr eval``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from istr.codecs import MaskCodec, load_codec
from istr.config import Config, load_config
from istr.data.build import build_dataset
from istr.data.collate import collate_batch
from istr.data.transforms import build_transforms
from istr.engine.checkpoint import load_checkpoint
from istr.engine.dist import resolve_device
from istr.model import ISTR, build_model
from istr.model.inference import postprocess


@dataclass
class LoadedRun:
    cfg: Config
    model: ISTR
    codec: MaskCodec
    category_ids: list[int]
    category_names: list[str]
    device: torch.device


def load_run(run_dir: Path, device: str = "auto") -> LoadedRun:
    """Rebuild model + codec of ``run_dir`` from config.yaml, codec.pt and checkpoints/last.pt."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    torch_device = resolve_device(device)
    val_set = build_dataset(cfg.data, "val", train=False)
    codec = load_codec(run_dir / "codec.pt").to(torch_device)
    model = build_model(cfg.model, val_set.num_classes, codec.dim)
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"])
    model.to(torch_device).eval()
    return LoadedRun(cfg, model, codec, val_set.category_ids, val_set.category_names, torch_device)


def _colour(index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(index * 7919 + 17)
    return tuple(int(v) for v in rng.integers(40, 255, size=3))  # type: ignore[return-value]


def draw_overlay(image: Image.Image, prediction: dict, names: list[str], score_threshold: float) -> Image.Image:
    """Masks (translucent), boxes, class names and scores of detections above ``score_threshold``.

    Small images are enlarged (nearest neighbour) so the labels stay readable.
    """
    zoom = max(1, 384 // max(image.size))
    canvas = image.convert("RGBA").resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    keep = (prediction["scores"] >= score_threshold).nonzero().flatten().tolist()
    for rank, i in enumerate(keep):
        colour = _colour(rank)
        mask = Image.fromarray((prediction["masks"][i].cpu().numpy() * 255).astype(np.uint8))
        tint = Image.new("RGBA", canvas.size, (*colour, 110))
        layer.paste(tint, (0, 0), mask.resize(canvas.size, Image.NEAREST))
        x0, y0, x1, y1 = (v * zoom for v in prediction["boxes"][i].tolist())
        draw.rectangle([x0, y0, x1, y1], outline=(*colour, 255), width=1)
        label = f"{names[int(prediction['labels'][i])]} {float(prediction['scores'][i]):.2f}"
        draw.text((x0 + 2, y0 + 1), label, fill=(255, 255, 255, 255))
    return Image.alpha_composite(canvas, layer).convert("RGB")


@torch.no_grad()
def overlay_images(run: LoadedRun, image_paths: list[Path], score_threshold: float = 0.3) -> list[Image.Image]:
    """Run the model on image files; one prediction overlay (``draw_overlay``) per image."""
    transforms = build_transforms(False, [run.cfg.data.test_short_size], run.cfg.data.test_max_size)
    overlays = []
    for path in image_paths:
        image = Image.open(path).convert("RGB")
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        empty = {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros((0, *tensor.shape[1:]), dtype=torch.uint8),
            "size": tuple(tensor.shape[1:]),
        }
        resized, target = transforms(tensor, empty)
        batch = collate_batch([(resized, target)], run.cfg.data.size_divisibility)
        sizes = batch["image_sizes"].to(run.device)
        outputs = run.model(batch["images"].to(run.device), sizes)
        orig = torch.tensor([[image.height, image.width]])
        prediction = postprocess(
            outputs, run.codec, sizes, orig, run.cfg.eval.max_detections, run.cfg.eval.mask_threshold
        )[0]
        overlays.append(draw_overlay(image, prediction, run.category_names, score_threshold))
    return overlays


def predict_images(run: LoadedRun, image_paths: list[Path], out_dir: Path, score_threshold: float = 0.3) -> list[Path]:
    """Run the model on image files and write ``<name>_pred.png`` overlays into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path, overlay in zip(image_paths, overlay_images(run, image_paths, score_threshold)):
        target_path = out_dir / f"{Path(path).stem}_pred.png"
        overlay.save(target_path)
        written.append(target_path)
    return written
