"""What one timed iteration of ``istr bench`` runs, per model and mode (:class:`Bench`).

Both models see the same seeded uint8 batch and synthetic targets (istr/bench/inputs.py) in the same dtype (fp32
on CPU, bf16 autocast on CUDA). ISTR gets the batch padded to a multiple of 32 as ``collate_batch`` does; Mask
R-CNN gets it unpadded and pads it itself. ISTR trains with the engine's own ``train_step``.

Inference time is what a user gets: ISTR forward + ``postprocess`` (top-k, codec decode, paste, threshold); Mask
R-CNN forward incl. its own postprocess (NMS, paste) + threshold. RLE encoding is left out of both and shown only
in ISTR's phase table (istr/bench/phases.py).
"""

from __future__ import annotations

import torch

from istr.bench.inputs import synthetic_batch
from istr.bench.models import build_istr, build_maskrcnn
from istr.bench.phases import sync_device
from istr.data.collate import collate_batch
from istr.engine.optim import build_optimizer
from istr.engine.precision import autocast
from istr.engine.step import TrainState, train_step
from istr.model.inference import postprocess


class Bench:
    """Holds both models and their inputs; each ``*_infer``/``*_train`` call is one timed unit."""

    def __init__(
        self,
        device: torch.device,
        backbone: str,
        height: int,
        width: int,
        batch: int,
        num_classes: int,
        num_queries: int | None,
        seed: int = 0,
    ) -> None:
        self.device, self.batch, self.amp = device, batch, device.type == "cuda"
        self.height, self.width = height, width
        images, targets = synthetic_batch(batch, height, width, num_classes, seed)
        self.cfg, self.model, self.codec, opt, sched, self.criterion, weights = build_istr(
            backbone, num_classes, num_queries, device, seed
        )
        self.state = TrainState(
            self.model, self.codec, self.criterion, opt, sched, weights, device, self.amp, self.cfg.train.clip_grad_norm
        )
        self.istr_batch = collate_batch(list(zip(images, targets)))  # padded to a multiple of 32
        self.images, self.sizes = self.istr_batch["images"].to(device), self.istr_batch["image_sizes"].to(device)
        if device.type == "cuda":
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.mrcnn_images = [img[:, :height, :width] for img in self.images]  # unpadded views
        self.mrcnn = build_maskrcnn(backbone, num_classes, height, width, device, seed)
        self.mrcnn_opt, _ = build_optimizer(self.mrcnn, self.cfg.train)
        self.mrcnn_targets = [
            {"boxes": t["boxes"].to(device), "labels": (t["labels"] + 1).to(device), "masks": t["masks"].to(device)}
            for t in targets
        ]
        self.detections = {"istr": 0.0, "maskrcnn": 0.0}

    def _autocast(self) -> torch.autocast:
        return autocast(self.device, self.amp)

    def istr_infer(self) -> None:
        """ISTR forward + ``postprocess``; records its detections per image."""
        self.model.eval()
        with torch.no_grad():
            with self._autocast():
                outputs = self.model(self.images, self.sizes)
            results = postprocess(
                outputs, self.codec, self.sizes, self.sizes, self.cfg.eval.max_detections, self.cfg.eval.mask_threshold
            )
        sync_device(self.device)
        self.detections["istr"] = sum(len(r["scores"]) for r in results) / self.batch

    def istr_train(self) -> None:
        """One ``train_step`` of the engine, as ``istr train`` runs it."""
        self.model.train()
        train_step(self.state, self.istr_batch)  # .item() calls inside synchronise
        sync_device(self.device)

    def maskrcnn_infer(self) -> None:
        """Mask R-CNN forward (incl. its postprocess) + mask threshold; records its detections per image."""
        self.mrcnn.eval()
        with torch.no_grad(), self._autocast():
            results = self.mrcnn([img.float() / 255 for img in self.mrcnn_images])
            masks = [r["masks"][:, 0] > 0.5 for r in results]
        sync_device(self.device)
        self.detections["maskrcnn"] = sum(len(m) for m in masks) / self.batch

    def maskrcnn_train(self) -> None:
        """One Mask R-CNN step: its losses, backward, grad-norm clip and the same AdamW as ISTR."""
        self.mrcnn.train()
        with self._autocast():
            losses = self.mrcnn([img.float() / 255 for img in self.mrcnn_images], self.mrcnn_targets)
        loss = sum(losses.values())
        self.mrcnn_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.mrcnn.parameters(), self.cfg.train.clip_grad_norm)
        self.mrcnn_opt.step()
        float(loss.detach())
        sync_device(self.device)
