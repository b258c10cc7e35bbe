"""An image's detections do not depend on what it is batched with (docs/method.md#architecture, #evaluation).

Collation pads a batch to its largest image. Two things then reach the model: the image feature
(each FPN level's average), which ``valid_region_mean`` takes over the unpadded cells only, and the
convolutions near the bottom/right border, which see the batch's padding. The second cannot be
undone in a CNN, so evaluation batches images of one padded shape (``ShapeGroupedBatchSampler``):
each image is then the same padded tensor at any ``eval.batch_size``.

Tolerances (float32 on one CPU thread):
- with a padding-invariant backbone, image A alone vs A batched with a larger image: initial
  queries and final logits/codes agree to 2e-5 (measured <= 2e-6), boxes to 1e-3 px (measured
  <= 5e-5); with the ResNet backbone they do not (border convolutions), which is why eval groups;
- eval at batch 1 vs 8 with the grouping sampler (random-weight tiny model, 12 images of 5 padded
  shapes): scores to 1e-5 (measured <= 2.2e-7), COCO xywh boxes to 2e-3 px (measured <= 5.2e-4),
  COCO AP to 0.1; the same images through a plain batch-8 loader differ by 0.02 in score (with
  scores ~0.01) and in the ranking of the classes.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.utils.data import DataLoader

from istr.codecs import DCTCodec
from istr.config import Config, load_config
from istr.data.build import build_dataset, build_eval_loader
from istr.data.coco import CocoInstances
from istr.data.collate import collate_batch
from istr.data.sampler import ShapeGroupedBatchSampler, eval_padded_shapes
from istr.engine.evaluate import coco_evaluate, predict_dataset, to_coco_results
from istr.engine.precision import use_amp
from istr.engine.predict import LoadedRun, predict_files
from istr.model import ISTR, build_model
from istr.model.backbone import LEVEL_NAMES
from istr.model.istr import valid_region_mean

from .conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDES = (4, 8, 16, 32)
# (h, w) of the generated val images: at test size 64 / max 128 / divisibility 32 they fall into the
# padded shapes 64x64, 64x96, 96x64, 64x128 and 128x64, interleaved so a plain loader mixes them.
MIXED_SIZES = [(64, 64), (48, 80), (80, 48), (64, 96), (40, 100), (72, 72),
               (100, 60), (56, 120), (64, 64), (50, 75), (96, 64), (61, 93)]  # fmt: skip
SCORE_ATOL, BOX_ATOL, AP_ATOL = 1e-5, 2e-3, 0.1  # eval at batch 1 vs 8; box in pixels


# ---------------------------------------------------------------------------- masked image feature


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_valid_region_mean_without_padding_is_the_plain_mean(dtype):
    """Unpadded batches (the tiny preset's 96x96 images) keep the old image feature bit for bit."""
    features = torch.randn(3, 8, 24, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    sizes = torch.tensor([[96, 64]] * 3)
    assert torch.equal(valid_region_mean(features, sizes, (96, 64)), features.mean(dim=(2, 3)))


@pytest.mark.parametrize("stride", STRIDES)
def test_valid_region_mean_averages_the_cells_covering_the_image(stride):
    """Per level: the first ceil(h / stride) x ceil(w / stride) cells, whatever the padding holds."""
    padded, sizes = (96, 128), torch.tensor([[40, 72], [96, 128], [33, 1]])
    generator = torch.Generator().manual_seed(stride)
    features = torch.randn(3, 5, padded[0] // stride, padded[1] // stride, generator=generator)
    expected = []
    for feature, (h, w) in zip(features, sizes.tolist()):
        rows, cols = -(-h // stride), -(-w // stride)
        expected.append(feature[:, :rows, :cols].mean(dim=(1, 2)))
        feature[:, rows:] = 1e4  # padding: must not count
        feature[:, :, cols:] = -1e4
    torch.testing.assert_close(valid_region_mean(features, sizes, padded), torch.stack(expected))


class PatchBackbone(nn.Module):
    """A padding-invariant stand-in for BackboneFPN: each level averages non-overlapping stride x stride
    patches and projects them (1x1 conv), so a cell inside the image never sees the padding."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.proj = nn.ModuleList(nn.Conv2d(3, out_channels, 1) for _ in STRIDES)

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        levels = zip(LEVEL_NAMES, self.proj, STRIDES)
        return OrderedDict((name, proj(F.avg_pool2d(images, stride))) for name, proj, stride in levels)


def _outputs_and_queries(model: ISTR, batch: dict) -> tuple[dict, Tensor]:
    """The model's outputs and the initial query features its first stage gets."""
    seen: list[Tensor] = []
    hook = model.stages[0].register_forward_pre_hook(lambda _stage, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            outputs = model(batch["images"], batch["image_sizes"])
    finally:
        hook.remove()
    return outputs, seen[0]


@pytest.mark.parametrize("pooler", ["roi_align", "grid_sample", "sparse"])
def test_image_alone_or_batched_with_a_larger_one_gives_the_same_outputs(tiny_cfg, pooler):
    """Image A (48x40, padded to 64x64 alone) vs A batched with a 96x128 image B.

    The backbone is padding-invariant here, so what is left is the model's own use of the padding: the
    image feature (masked mean) and RoI pooling. A needs padding of its own, so RoIs that cross its
    border read padding in both cases. (An A that is already a multiple of 32 reads the border value
    alone but padding in a batch; with ResNet convolutions A's features change near the border too:
    evaluation avoids both by batching one padded shape, tested end to end below.)
    """
    model_cfg = tiny_cfg.model
    torch.manual_seed(0)
    model = ISTR(PatchBackbone(model_cfg.hidden_dim), num_classes=3, code_dim=16,
                 num_queries=model_cfg.num_queries, num_stages=model_cfg.num_stages, num_heads=model_cfg.num_heads,
                 ffn_dim=model_cfg.ffn_dim, dynamic_dim=model_cfg.dynamic_dim, pooler=pooler)  # fmt: skip
    for stage in model.stages:  # box_deltas start at zero: make the boxes move (a little: they must stay
        nn.init.normal_(stage.box_deltas.weight, std=0.02)  # inside A's own padded 64x64), so pooling is exercised
    model.eval()
    generator = torch.Generator().manual_seed(0)
    image_a = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8, generator=generator)
    image_b = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8, generator=generator)
    alone, alone_queries = _outputs_and_queries(model, collate_batch([(image_a, {})]))
    batched, batched_queries = _outputs_and_queries(model, collate_batch([(image_a, {}), (image_b, {})]))
    torch.testing.assert_close(batched_queries[0], alone_queries[0], atol=2e-5, rtol=0)
    for stage_alone, stage_batched in zip([*alone["aux"], alone], [*batched["aux"], batched]):
        for key in ("logits", "codes"):
            torch.testing.assert_close(stage_batched[key][0], stage_alone[key][0], atol=2e-5, rtol=0)
        torch.testing.assert_close(stage_batched["boxes"][0], stage_alone["boxes"][0], atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------- evaluation batches


def test_sampler_groups_keys_in_dataset_order():
    sampler = ShapeGroupedBatchSampler(["a", "b", "a", "c", "a", "b", "a"], batch_size=2)
    assert list(sampler) == [[0, 2], [4, 6], [1, 5], [3]]
    assert len(sampler) == 4
    assert list(ShapeGroupedBatchSampler(["a", "b", "a"], batch_size=1)) == [[0], [2], [1]]
    with pytest.raises(ValueError, match="batch_size"):
        ShapeGroupedBatchSampler(["a"], batch_size=0)


def write_mixed_coco(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> None:
    """A COCO val split of noisy images of the given (h, w), each with 1-3 rectangles of 3 classes."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images" / "val"
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id, (h, w) in enumerate(sizes, start=1):
        pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=tuple(int(c) for c in rng.integers(120, 256, 3)))
            polygon = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": int(rng.integers(1, 4)), "segmentation": [polygon],
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})  # fmt: skip
        name = f"{image_id:03d}.png"
        canvas.save(image_dir / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)]
    (root / "annotations").mkdir()
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))


@pytest.fixture(scope="module")
def mixed_cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    root = tmp_path_factory.mktemp("mixed")
    write_mixed_coco(root, MIXED_SIZES)
    # fp32 (train.amp=false): the tolerances below are fp32's; bf16 products may round differently per batch size
    extra = ["data.test_short_size=64", "data.test_max_size=128", "data.size_divisibility=32", "model.pooler=auto",
             "train.amp=false"]
    return load_config(None, [*tiny_overrides(root, root / "cache"), *extra])


@pytest.fixture(scope="module")
def mixed_val(mixed_cfg: Config) -> CocoInstances:
    return build_dataset(mixed_cfg.data, "val", train=False)


def test_eval_padded_shapes_are_the_collated_shapes(mixed_cfg, mixed_val):
    """The shapes come from the json alone; collating each decoded, resized image gives the same ones."""
    data = mixed_cfg.data
    shapes = eval_padded_shapes(mixed_val, data.test_short_size, data.test_max_size, data.size_divisibility)
    collated = [tuple(collate_batch([mixed_val[i]], data.size_divisibility)["images"].shape[-2:])
                for i in range(len(mixed_val))]  # fmt: skip
    assert shapes == collated
    assert len(set(shapes)) == 5  # the sizes above do mix shapes
    for batch in build_eval_loader(mixed_val, data, batch_size=8):
        assert all(tuple(size) <= tuple(batch["images"].shape[-2:]) for size in batch["image_sizes"].tolist())
        assert len({shapes[mixed_val.image_ids.index(t["image_id"])] for t in batch["targets"]}) == 1


@pytest.fixture(scope="module")
def random_model(mixed_cfg: Config, mixed_val: CocoInstances) -> tuple[ISTR, DCTCodec]:
    """Random weights, boxes made to move (box_deltas start at zero), and a codec that needs no fit."""
    torch.manual_seed(0)
    codec = DCTCodec(mixed_cfg.codec.dim)
    model = build_model(mixed_cfg.model, mixed_val.num_classes, codec.dim)
    for stage in model.stages:
        nn.init.normal_(stage.box_deltas.weight, std=0.1)
    return model.eval(), codec


def _detections(mixed_cfg, mixed_val, random_model, loader: DataLoader) -> list[dict]:
    model, codec = random_model
    device = torch.device("cpu")
    return predict_dataset(model, codec, loader, device, mixed_val.category_ids, mixed_cfg.eval.max_detections,
                           mixed_cfg.eval.mask_threshold, False, use_amp(device, mixed_cfg.train.amp))  # fmt: skip


def assert_same_detections(got: list[dict], expected: list[dict]) -> tuple[float, float]:
    """Per image, the same detections in the same (score) order; returns max |d score|, max |d box|."""

    def by_image(records: list[dict]) -> dict[int, list[dict]]:
        grouped: dict[int, list[dict]] = {}
        for record in records:
            grouped.setdefault(record["image_id"], []).append(record)
        return grouped

    got_by_image, expected_by_image = by_image(got), by_image(expected)
    assert got_by_image.keys() == expected_by_image.keys()
    score_diff = box_diff = 0.0
    for image_id, records in expected_by_image.items():
        other = got_by_image[image_id]
        assert [r["category_id"] for r in other] == [r["category_id"] for r in records], image_id
        scores = torch.tensor([[r["score"] for r in other], [r["score"] for r in records]])
        boxes = torch.tensor([[r["bbox"] for r in other], [r["bbox"] for r in records]])
        score_diff = max(score_diff, float((scores[0] - scores[1]).abs().max()))
        box_diff = max(box_diff, float((boxes[0] - boxes[1]).abs().max()))
    assert score_diff <= SCORE_ATOL and box_diff <= BOX_ATOL, (score_diff, box_diff)
    return score_diff, box_diff


@pytest.mark.slow
def test_eval_detections_and_metrics_do_not_depend_on_the_batch_size(mixed_cfg, mixed_val, random_model):
    one = _detections(mixed_cfg, mixed_val, random_model, build_eval_loader(mixed_val, mixed_cfg.data, 1))
    eight = _detections(mixed_cfg, mixed_val, random_model, build_eval_loader(mixed_val, mixed_cfg.data, 8))
    assert len(one) == len(eight) > 0
    assert_same_detections(eight, one)
    metrics_one = coco_evaluate(mixed_val.coco, one).metrics
    metrics_eight = coco_evaluate(mixed_val.coco, eight).metrics
    for iou_type, values in metrics_one.items():
        for name, value in values.items():
            other = metrics_eight[iou_type][name]
            assert (value is None) == (other is None), (iou_type, name)
            assert value is None or abs(value - other) <= AP_ATOL, (iou_type, name, value, other)


@pytest.mark.slow
def test_predict_pads_as_eval_does(mixed_cfg, mixed_val, random_model):
    """``istr predict`` (one image per batch) gives the detections of eval's grouped batches of 8."""
    model, codec = random_model
    run = LoadedRun(mixed_cfg, model, codec, mixed_val.category_ids, mixed_val.category_names,
                    torch.device("cpu"), {})  # fmt: skip
    image_dir = Path(mixed_cfg.data.root) / mixed_cfg.data.val_images
    paths = [image_dir / mixed_val.coco.imgs[i]["file_name"] for i in mixed_val.image_ids]
    predicted = []
    for image_id, (_, prediction) in zip(mixed_val.image_ids, predict_files(run, paths)):
        predicted += to_coco_results(prediction, image_id, mixed_val.category_ids)
    evaluated = _detections(mixed_cfg, mixed_val, random_model, build_eval_loader(mixed_val, mixed_cfg.data, 8))
    assert_same_detections(predicted, evaluated)
