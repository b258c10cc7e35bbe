"""ISTR: learnable query boxes/features refined over N stages (docs/method.md#architecture, Fig. 2).

The model predicts mask *embeddings*; it never sees the codec. The criterion and the inference
path (``istr.model.inference``) decode them (docs/method.md#architecture: the model never sees the codec).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from istr.model.backbone import BackboneFPN
from istr.model.head import ISTRStage
from istr.model.pooler import POOLERS

# torchvision's ImageNet statistics, on 0-255 pixels.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def valid_cells(image_sizes: Tensor, input_size: tuple[int, int], map_size: tuple[int, int]) -> Tensor:
    """[B,1,h,w] True on the cells of a ``map_size`` (h, w) map that cover each image's unpadded region.

    A map of stride ``s = H / h`` (``input_size`` (H, W) is the padded input) covers an image of height
    ``ih`` with ``ceil(ih / s) = ceil(ih * h / H)`` rows, and likewise for columns (integer arithmetic:
    exact, so an unpadded image keeps every row).
    """
    (height, width), (padded_h, padded_w) = map_size, input_size
    valid_h = (image_sizes[:, 0] * height + padded_h - 1) // padded_h
    valid_w = (image_sizes[:, 1] * width + padded_w - 1) // padded_w
    rows = torch.arange(height, device=image_sizes.device) < valid_h[:, None]
    cols = torch.arange(width, device=image_sizes.device) < valid_w[:, None]
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def valid_region_mean(feature: Tensor, image_sizes: Tensor, input_size: tuple[int, int]) -> Tensor:
    """Per-image mean of ``feature`` [B,C,h,w] over the cells of each image's unpadded region -> [B,C].

    docs/method.md#architecture: the image feature is each level's average over the image, not over
    the batch's padding, so an image's queries do not depend on what it is batched with.
    """
    height, width = feature.shape[-2:]
    inside = valid_cells(image_sizes, input_size, (height, width))
    # The mean over the whole map, rescaled by (all cells / valid cells): without padding the factor is
    # exactly 1, so the result is the plain mean bit for bit (results of unpadded batches do not change).
    mean = feature.masked_fill(~inside, 0).mean(dim=(2, 3))
    scale = (height * width) / inside.sum(dim=(1, 2, 3))
    accumulate = torch.promote_types(feature.dtype, torch.float32)  # bf16 under autocast: scale in float32
    return (mean.to(accumulate) * scale[:, None].to(accumulate)).to(feature.dtype)


class ISTR(nn.Module):
    """Backbone+FPN -> k queries -> N stages; returns the last stage's outputs plus ``aux`` stages."""

    def __init__(
        self,
        backbone: BackboneFPN,
        num_classes: int,
        code_dim: int,
        num_queries: int = 300,
        num_stages: int = 6,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        dynamic_dim: int = 64,
        pooler_resolution: int = 7,
        pooler_sampling_ratio: int = 2,
        pooler: str = "roi_align",
        attention: str = "self+dynamic",
        head_layers: int = 3,
        dropout: float = 0.0,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        hidden_dim = backbone.out_channels
        self.backbone = backbone
        self.num_classes, self.code_dim, self.num_queries = num_classes, code_dim, num_queries
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; valid: {', '.join(POOLERS)}")
        self.pooler = POOLERS[pooler](pooler_resolution, pooler_sampling_ratio)
        # Query boxes start covering the whole image: normalised (cx, cy, w, h) = (.5, .5, 1, 1).
        self.query_boxes = nn.Embedding(num_queries, 4)
        nn.init.constant_(self.query_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.query_boxes.weight[:, 2:], 1.0)
        self.query_features = nn.Embedding(num_queries, hidden_dim)
        self.stages = nn.ModuleList(
            ISTRStage(
                num_classes,
                code_dim,
                hidden_dim,
                num_heads,
                ffn_dim,
                dynamic_dim,
                pooler_resolution,
                attention,
                head_layers,
                dropout,
                prior_prob,
            )
            for _ in range(num_stages)
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def initial_boxes(self, image_sizes: Tensor) -> Tensor:
        """Learnable normalised cxcywh query boxes -> absolute x1y1x2y2 per image [B,k,4]."""
        cxcywh = self.query_boxes.weight
        xyxy = torch.cat([cxcywh[:, :2] - 0.5 * cxcywh[:, 2:], cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]], dim=1)
        scale = image_sizes.flip(1).repeat(1, 2).to(xyxy.dtype)  # (w, h, w, h)
        return xyxy[None] * scale[:, None, :]

    def image_feature(self, features: dict[str, Tensor], image_sizes: Tensor, input_size: tuple[int, int]) -> Tensor:
        """Each FPN level's average over the image's valid region (:func:`valid_region_mean`), summed -> [B,d].

        docs/method.md#architecture; ``input_size`` is the padded (H, W) the backbone saw.
        """
        return torch.stack([valid_region_mean(level, image_sizes, input_size) for level in features.values()]).sum(0)

    def forward(self, images: Tensor, image_sizes: Tensor) -> dict:
        """images uint8/float [B,3,H,W] (0-255, padded), image_sizes [B,2] (h, w) -> docs/method.md outputs."""
        x = (images.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std
        input_size = (images.shape[-2], images.shape[-1])
        if bool((image_sizes != image_sizes.new_tensor(input_size)).any()):
            # Padding reads as 0 after normalisation, as the convolutions' own zero padding (detectron2's
            # convention): a padded border then resembles the image's true edge more closely.
            x = x * valid_cells(image_sizes, input_size, input_size)
        features = self.backbone(x)
        boxes = self.initial_boxes(image_sizes)
        # Initial query features: the image feature (each FPN level's average over the unpadded image,
        # summed) plus a learnable embedding per query, as the authors' first release.
        image_feature = self.image_feature(features, image_sizes, input_size)
        queries = self.query_features.weight[None] + image_feature[:, None, :]
        pooler_input = self.pooler.prepare(features)
        outputs: list[dict] = []
        for stage in self.stages:
            # docs/method.md#architecture: boxes are detached BETWEEN stages; stage 0's loss trains the query boxes.
            stage_boxes = boxes.detach() if outputs else boxes
            # fp32 boxes even under bf16 autocast: bf16 would round the sampling points to 0.25-0.5 px at 32-128 px
            rois = self.pooler(pooler_input, stage_boxes.detach())  # [B*k, S*S, d]
            out = stage(queries, rois, stage_boxes)
            queries, boxes = out.pop("queries"), out["boxes"]
            outputs.append(out)
        return {**outputs[-1], "aux": outputs[:-1]}


def build_model(model_cfg, num_classes: int, code_dim: int, backbone_weights: Path | None = None) -> ISTR:
    """Builder: the only place that reads ``cfg.model`` (docs/architecture.md#layers).

    ``backbone_weights`` is a local file resolved by the engine from ``model.pretrained``; None builds
    random weights (a checkpoint is loaded afterwards, or training starts from scratch).
    """
    backbone = BackboneFPN(
        model_cfg.backbone, model_cfg.hidden_dim, model_cfg.norm, backbone_weights, model_cfg.freeze_at
    )
    return ISTR(
        backbone,
        num_classes=num_classes,
        code_dim=code_dim,
        num_queries=model_cfg.num_queries,
        num_stages=model_cfg.num_stages,
        num_heads=model_cfg.num_heads,
        ffn_dim=model_cfg.ffn_dim,
        dynamic_dim=model_cfg.dynamic_dim,
        pooler_resolution=model_cfg.pooler_resolution,
        pooler_sampling_ratio=model_cfg.pooler_sampling_ratio,
        pooler=model_cfg.pooler,
        attention=model_cfg.attention,
        head_layers=model_cfg.head_layers,
        dropout=model_cfg.dropout,
        prior_prob=model_cfg.prior_prob,
    )
