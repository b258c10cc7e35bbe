"""Load a finished run; predict on image files -> overlays and a COCO results json (``istr predict``).

Inference is :func:`istr.engine.evaluate.predict_batch`, the path ``istr eval`` takes, so a results
json written here scores exactly as ``istr eval`` does on the same images (docs/own-data.md).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from istr.codecs import MaskCodec, load_codec
from istr.config import Config, load_config
from istr.data.build import build_dataset
from istr.data.coco import DatasetError
from istr.data.collate import collate_batch
from istr.data.transforms import build_transforms
from istr.engine.checkpoint import load_checkpoint
from istr.engine.dist import resolve_device
from istr.engine.evaluate import predict_batch, to_coco_results
from istr.engine.precision import use_amp
from istr.io import atomic_write_bytes, atomic_write_json
from istr.model import ISTR, build_model
from istr.results import CHECKPOINT_FILE, CODEC_FILE, CONFIG_FILE

log = logging.getLogger(__name__)

JPEG_SUFFIXES = (".jpg", ".jpeg")


@dataclass
class LoadedRun:
    cfg: Config
    model: ISTR
    codec: MaskCodec
    category_ids: list[int]
    category_names: list[str]
    device: torch.device
    val_image_ids: dict[str, int]  # val-json file name (base name) -> image id


def load_run(run_dir: Path, device: str = "auto") -> LoadedRun:
    """Rebuild model + codec of ``run_dir`` from config.yaml, codec.pt and checkpoints/last.pt."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / CONFIG_FILE)
    torch_device = resolve_device(device)
    val_set = build_dataset(cfg.data, "val", train=False)
    codec = load_codec(run_dir / CODEC_FILE).to(torch_device)
    model = build_model(cfg.model, val_set.num_classes, codec.dim)
    model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_FILE)["model"])
    model.to(torch_device).eval()
    val_ids = {Path(info["file_name"]).name: image_id for image_id, info in val_set.coco.imgs.items()}
    return LoadedRun(cfg, model, codec, val_set.category_ids, val_set.category_names, torch_device, val_ids)


def _colour(index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(index * 7919 + 17)
    return tuple(int(v) for v in rng.integers(40, 255, size=3))  # type: ignore[return-value]


def detection_summary(prediction: dict, score_threshold: float) -> str:
    """'N detections above T (max score S)': says why an overlay is blank when it is."""
    scores = prediction["scores"]
    kept = int((scores >= score_threshold).sum())
    best = f"{float(scores.max()):.3f}" if scores.numel() else "none"
    return f"{kept} detection{'' if kept == 1 else 's'} above {score_threshold:g} (max score {best})"


def draw_overlay(
    image: Image.Image, prediction: dict, names: list[str], score_threshold: float, min_shown: int = 0
) -> Image.Image:
    """Masks (translucent), boxes, class names and scores of detections above ``score_threshold``, or of the
    ``min_shown`` best when fewer pass (a weakly trained model then still shows what it finds).

    Small images are enlarged (nearest neighbour) so the labels stay readable; line width and font
    size grow with the image, so they stay readable on large photos too.
    """
    zoom = max(1, 384 // max(image.size))
    canvas = image.convert("RGBA").resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    side = max(canvas.size)
    line_width = max(1, round(side / 400))
    font = ImageFont.load_default(size=max(10, side // 45))
    layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    scores = prediction["scores"]
    keep = (scores >= score_threshold).nonzero().flatten().tolist()
    if len(keep) < min_shown:
        keep = scores.argsort(descending=True)[:min_shown].tolist()
    for rank, i in enumerate(keep):
        colour = _colour(rank)
        mask = Image.fromarray((prediction["masks"][i].cpu().numpy() * 255).astype(np.uint8))
        tint = Image.new("RGBA", canvas.size, (*colour, 110))
        layer.paste(tint, (0, 0), mask.resize(canvas.size, Image.NEAREST))
        x0, y0, x1, y1 = (v * zoom for v in prediction["boxes"][i].tolist())
        draw.rectangle([x0, y0, x1, y1], outline=(*colour, 255), width=line_width)
        label = f"{names[int(prediction['labels'][i])]} {float(prediction['scores'][i]):.2f}"
        anchor = (x0 + line_width + 1, y0 + line_width)
        draw.rectangle(draw.textbbox(anchor, label, font=font), fill=(0, 0, 0, 160))
        draw.text(anchor, label, fill=(255, 255, 255, 255), font=font)
    return Image.alpha_composite(canvas, layer).convert("RGB")


def _read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files
        raise DatasetError(f"cannot read image {path}: {e}") from e


@torch.no_grad()
def predict_files(run: LoadedRun, image_paths: list[Path]) -> Iterator[tuple[Image.Image, dict]]:
    """(image, prediction in original image coordinates) per file, one image per batch."""
    transforms = build_transforms(False, [run.cfg.data.test_short_size], run.cfg.data.test_max_size)
    run.model.eval()
    for path in image_paths:
        image = _read_rgb(path)
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        empty = {
            "boxes": torch.zeros((0, 4)),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros((0, *tensor.shape[1:]), dtype=torch.uint8),
            "orig_size": tuple(tensor.shape[1:]),
            "size": tuple(tensor.shape[1:]),
        }
        # Padded by eval's collate function to the same size_divisibility: the tensor eval's grouped batches
        # hold for this image, so its detections are eval's.
        batch = collate_batch([transforms(tensor, empty)], run.cfg.data.size_divisibility)
        cfg, amp = run.cfg.eval, use_amp(run.device, run.cfg.train.amp)
        yield image, predict_batch(run.model, run.codec, batch, run.device, cfg.max_detections, cfg.mask_threshold,
                                   amp)[0]


def overlay_images(
    run: LoadedRun, image_paths: list[Path], score_threshold: float = 0.3, min_shown: int = 0
) -> list[Image.Image]:
    """Run the model on image files; one prediction overlay (``draw_overlay``) per image."""
    return [
        draw_overlay(image, prediction, run.category_names, score_threshold, min_shown)
        for image, prediction in predict_files(run, image_paths)
    ]


def results_image_ids(run: LoadedRun, image_paths: list[Path]) -> tuple[list[int], str]:
    """Image ids for a results json and where they come from: the val json's ids when every file is
    a val image (by file name), else the files' positions 1..N (other images have no id to keep)."""
    names = [Path(p).name for p in image_paths]
    if all(name in run.val_image_ids for name in names):
        return [run.val_image_ids[name] for name in names], "the val json's image ids"
    return list(range(1, len(names) + 1)), "argument positions 1..N (not every image is in the val json)"


def predict_images(
    run: LoadedRun,
    image_paths: list[Path],
    out_dir: Path,
    score_threshold: float = 0.3,
    json_path: Path | None = None,
    report: Callable[[str], None] = log.info,
) -> list[Path]:
    """Write ``<name>_pred.png`` (``.jpg`` for JPEG inputs) overlays into ``out_dir``; ``report`` gets
    one line per image (:func:`detection_summary`). With ``json_path``, also every detection (all
    scores, as ``istr eval`` keeps them) as a COCO results json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    image_ids, id_source = results_image_ids(run, image_paths)
    written, results = [], []
    for path, image_id, (image, prediction) in zip(image_paths, image_ids, predict_files(run, image_paths)):
        jpeg = Path(path).suffix.lower() in JPEG_SUFFIXES  # a PNG of a large photo is several MB
        target_path = out_dir / f"{Path(path).stem}_pred{'.jpg' if jpeg else '.png'}"
        overlay = draw_overlay(image, prediction, run.category_names, score_threshold)
        encoded = io.BytesIO()  # encoded in memory, then written atomically: a kill leaves no half image
        overlay.save(encoded, **({"format": "JPEG", "quality": 90} if jpeg else {"format": "PNG"}))
        atomic_write_bytes(target_path, encoded.getvalue())
        report(f"{path}: {detection_summary(prediction, score_threshold)} -> {target_path}")
        written.append(target_path)
        results.extend(to_coco_results(prediction, image_id, run.category_ids))
    if json_path is not None:
        atomic_write_json(json_path, results)
        report(f"{len(results)} detections written to {json_path} (COCO results json; image_id = {id_source})")
    return written
