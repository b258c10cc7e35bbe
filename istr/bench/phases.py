"""Per-phase timing of one ISTR train step and one inference, for ``istr bench``.

Phases are timed with forward hooks and wrappers in a separate instrumented pass, CUDA-synchronised
at every boundary.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from istr.bench.units import Bench


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels: a CUDA time is otherwise only the launch's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall time per named phase; synchronises CUDA around every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.ms = device, defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        sync_device(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync_device(self.device)
            self.ms[name] += 1000 * (time.perf_counter() - start)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return wrapped

    def hook(self, module: torch.nn.Module, name: str) -> list:
        starts: list[float] = []

        def pre(*_):
            sync_device(self.device)
            starts.append(time.perf_counter())

        def post(*_):
            sync_device(self.device)
            self.ms[name] += 1000 * (time.perf_counter() - starts.pop())

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def istr_train_phases(b: Bench) -> tuple[dict[str, float], float]:
    """One instrumented ISTR train step -> ({phase: ms}, total ms).

    It runs the parts of the engine's ``train_step`` (istr/engine/step.py), one timed phase each, as
    ``train_step`` itself runs them back to back in one call, with no boundary to synchronise and time. Two things
    of ``train_step`` are left out: copying the batch to the device (``Bench`` holds it there already, so the phases
    time the model's work) and the rank-averaged finiteness check with its metrics (one process; ``float(loss)``
    synchronises as the check does).
    """
    from istr.engine.step import backward, forward, optimizer_step, weighted_loss
    from istr.targets import prepare_targets

    t, model, state = PhaseTimer(b.device), b.model, b.state
    matcher = b.criterion.matcher
    handles = t.hook(model.backbone, "backbone+fpn") + t.hook(model.pooler, "roi_pooling")
    matcher.match_stages = t.wrap("matcher", matcher.match_stages)  # instance attribute shadows the method
    model.pooler.prepare = t.wrap("roi_pooling", model.pooler.prepare)
    model.train()
    try:
        start = time.perf_counter()
        with t("targets"):
            targets = prepare_targets(b.istr_batch["targets"], b.sizes, b.codec, b.device)
        with t("forward"):
            outputs = forward(state, b.images, b.sizes)
        with t("criterion+matcher"):
            loss, _ = weighted_loss(state, outputs, targets)
            float(loss.detach())
        with t("backward"):
            backward(state, loss)
        with t("optimizer"):
            optimizer_step(state)
        sync_device(b.device)
        total = 1000 * (time.perf_counter() - start)
    finally:
        for h in handles:
            h.remove()
        del matcher.match_stages
        del model.pooler.prepare
    ms = t.ms
    phases = {
        "targets (crop+encode)": ms["targets"],
        "backbone+fpn": ms["backbone+fpn"],
        "roi_pooling": ms["roi_pooling"],
        "stages": ms["forward"] - ms["backbone+fpn"] - ms["roi_pooling"],
        "matcher": ms["matcher"],
        "criterion (incl. decode)": ms["criterion+matcher"] - ms["matcher"],
        "backward": ms["backward"],
        "optimizer": ms["optimizer"],
    }
    return phases, total


def istr_infer_phases(b: Bench) -> tuple[dict[str, float], float]:
    """One instrumented ISTR inference (+ RLE) -> ({phase: ms}, total ms)."""
    import istr.model.inference as inference
    from istr.engine.evaluate import to_coco_results

    t, model = PhaseTimer(b.device), b.model
    original_paste = inference.paste_masks
    inference.paste_masks = t.wrap("paste", original_paste)
    b.codec.decode = t.wrap("decode", b.codec.decode)
    model.eval()
    try:
        start = time.perf_counter()
        with torch.no_grad():
            with t("model"), b._autocast():
                outputs = model(b.images, b.sizes)
            with t("postprocess"):
                results = inference.postprocess(
                    outputs, b.codec, b.sizes, b.sizes, b.cfg.eval.max_detections, b.cfg.eval.mask_threshold
                )
        with t("rle"):
            category_ids = list(range(model.num_classes))
            for i, r in enumerate(results):
                to_coco_results(r, i, category_ids)
        total = 1000 * (time.perf_counter() - start)
    finally:
        inference.paste_masks = original_paste
        del b.codec.decode
    ms = t.ms
    phases = {
        "model": ms["model"],
        "topk (+rest of postprocess)": ms["postprocess"] - ms["decode"] - ms["paste"],
        "decode": ms["decode"],
        "paste (+threshold)": ms["paste"],
        "rle_encode": ms["rle"],
    }
    return phases, total


def phase_summary(runs: list[tuple[dict[str, float], float]]) -> dict:
    """Mean ms per phase over instrumented runs, % of the mean instrumented total."""
    total = statistics.fmean(r[1] for r in runs)
    out = {}
    for name in runs[0][0]:
        mean = statistics.fmean(r[0][name] for r in runs)
        out[name] = {"ms": mean, "pct": 100 * mean / total}
    return {"phases": out, "total_ms": total, "sum_ms": sum(v["ms"] for v in out.values()), "n": len(runs)}
