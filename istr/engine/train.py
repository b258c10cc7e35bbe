"""Training loop as plain functions (docs/architecture.md#data-flow): build -> train_step* -> evaluate.

AdamW, linear warmup + multi-step decay, grad-norm clipping, bf16 autocast (istr/engine/precision.py), DDP under
torchrun, atomic checkpoints, exact resume (docs/method.md#training). SIGUSR1/SIGTERM (a scheduler's warning,
scancel) make a single-process run checkpoint the step it is on and exit ``PREEMPTED_EXIT``, so it resumes there.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from istr.axes import REGISTRY_AXES, config_value
from istr.codecs import MaskCodec, load_codec
from istr.codecs.fit import fit_or_load_codec
from istr.config import Config, config_hash, to_dict, to_yaml
from istr.data.build import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    check_dataset,
    ensure_dataset,
    split_paths,
)
from istr.engine import dist as D
from istr.engine.checkpoint import has_training_state, load_checkpoint, resumable_checkpoint, save_checkpoint
from istr.engine.evaluate import coco_evaluate, predict_dataset
from istr.engine.memory import keep_freed_memory
from istr.engine.precision import autocast, use_amp
from istr.engine.pretrain import resolve_backbone_weights
from istr.engine.rundir import check_run_dir, claimed
from istr.engine.sinks import CostSink, JsonlSink, MultiSink, ProgressSink, Sink, WandbSink
from istr.eval_images import save_records
from istr.io import atomic_write_json, atomic_write_text
from istr.losses import SetCriterion, build_criterion, loss_weights, split_stage, weighted_sum
from istr.matcher import build_matcher
from istr.model import build_model
from istr.provenance import code_version
from istr.registry import pick
from istr.results import (
    CHECKPOINT_FILE,
    CODEC_FILE,
    CODEC_STATS_FILE,
    CONFIG_FILE,
    COST_FILE,
    EVAL_FILE,
    EVAL_IMAGES_FILE,
    EVAL_TEXT_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    flat_metrics,
)
from istr.targets import prepare_targets

log = logging.getLogger(__name__)
PREEMPTED_EXIT = 75  # exit status after a preemption signal: checkpointed, resume later (sysexits' EX_TEMPFAIL)
PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)  # SLURM's warning before the time limit; scancel, preemption


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(
    step: int,
    warmup_steps: int,
    warmup_factor: float,
    lr_steps: list[int],
    gamma: float,
    cosine_steps: int | None = None,
) -> float:
    """Linear warmup from ``warmup_factor`` to 1, then x``gamma`` at each of ``lr_steps`` (docs/method.md#training);
    with ``cosine_steps`` a half-cosine from 1 to 0 between the warm-up's end and that step instead."""
    if cosine_steps is None:
        factor = gamma ** sum(step >= s for s in lr_steps)
    else:
        progress = min(1.0, max(0, step - warmup_steps) / max(1, cosine_steps - warmup_steps))
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def schedule_steps(train_cfg) -> tuple[int, list[int]]:
    """(warmup steps, decay steps): ``warmup_frac`` / ``lr_step_fracs`` x ``max_steps`` when set, else the
    absolute ``warmup_steps`` / ``lr_steps`` (docs/own-data.md, "The finetune preset")."""
    steps = train_cfg.max_steps
    warmup = train_cfg.warmup_steps if train_cfg.warmup_frac is None else round(train_cfg.warmup_frac * steps)
    if train_cfg.lr_step_fracs is None:
        return warmup, list(train_cfg.lr_steps)
    return warmup, [round(f * steps) for f in train_cfg.lr_step_fracs]


def parameter_groups(model: torch.nn.Module, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Trainable parameters as AdamW groups: the model's ``backbone`` (ResNet + FPN) at ``lr * backbone_lr_mult``."""
    backbone = getattr(model, "backbone", None)
    in_backbone = {id(p) for p in backbone.parameters()} if backbone is not None and backbone_lr_mult != 1 else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in in_backbone], "lr": lr}]
    if in_backbone:
        groups.append({"params": [p for p in trainable if id(p) in in_backbone], "lr": lr * backbone_lr_mult})
    return groups


def build_optimizer(
    model: torch.nn.Module, train_cfg
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = parameter_groups(model, train_cfg.lr, train_cfg.backbone_lr_mult)
    warmup_steps, lr_steps = schedule_steps(train_cfg)
    cosine_steps = train_cfg.max_steps if train_cfg.lr_schedule == "cosine" else None
    # fused: one kernel for all parameters instead of ~10 per tensor (~8% of a tiny CPU step); same math.
    optimizer = torch.optim.AdamW(groups, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps, train_cfg.warmup_factor, lr_steps, train_cfg.lr_gamma, cosine_steps
        ),
    )
    return optimizer, scheduler


@dataclass
class TrainState:
    """Everything a training step touches."""

    model: torch.nn.Module
    codec: MaskCodec
    criterion: SetCriterion
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    weights: dict[str, float]
    device: torch.device
    amp: bool
    clip_grad_norm: float


def train_step(state: TrainState, batch: dict) -> dict[str, float]:
    """One optimisation step; returns the (rank-averaged) weighted loss and its terms."""
    device = state.device
    images = batch["images"].to(device, non_blocking=True)
    image_sizes = batch["image_sizes"].to(device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    targets = prepare_targets(batch["targets"], image_sizes, state.codec, device)
    with autocast(device, state.amp):
        outputs = state.model(images, image_sizes)
    losses = state.criterion(outputs, targets)
    loss = weighted_sum(losses, state.weights)
    # Every rank must agree on skipping, so the finiteness check uses the all-reduced loss.
    reduced = D.all_reduce_mean(loss.detach())
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(
            f"non-finite loss {reduced.item()} (terms: { {k: round(v.item(), 4) for k, v in losses.items()} })"
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad_norm)
    state.optimizer.step()
    state.scheduler.step()
    metrics = {k: v.item() for k, v in losses.items() if split_stage(k)[1] is None}
    metrics.update(loss=reduced.item(), grad_norm=float(grad_norm), lr=state.optimizer.param_groups[0]["lr"])
    return metrics


def parameter_checksum(model: torch.nn.Module) -> float:
    """A float that differs when any weight differs: DDP ranks must agree on it at the end."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def prepare_codec(cfg: Config, run_dir: Path, train_set, info: D.DistInfo) -> MaskCodec:
    """Rank 0 fits (or loads from the cache) the codec into run_dir/codec.pt; other ranks load it."""
    codec_path = run_dir / CODEC_FILE
    if info.is_main and not codec_path.is_file():
        json_path, _ = split_paths(cfg.data, "train")
        codec, stats, cached = fit_or_load_codec(cfg.codec, json_path, train_set.coco, Path(cfg.cache_dir), cfg.seed)
        codec.save(codec_path)
        atomic_write_json(run_dir / CODEC_STATS_FILE, {**stats, "cache": str(cached)})
        log.info(
            "codec %s-%d: reconstruction mask IoU %.3f on %d train masks",
            cfg.codec.type,
            cfg.codec.dim,
            stats.get("mask_iou", math.nan),
            int(stats.get("n_masks", 0)),
        )
    D.barrier()
    return load_codec(codec_path)


def build_sinks(
    cfg: Config, run_dir: Path, start_step: int, info: D.DistInfo
) -> tuple[Sink, WandbSink | None, CostSink | None]:
    if not info.is_main:
        return Sink(), None, None
    cost = CostSink(run_dir / COST_FILE, cfg.train.batch_size, start_step)  # sums every attempt of the run
    sinks: list[Sink] = [JsonlSink(run_dir / METRICS_FILE), cost]
    if cfg.logging.progress:
        sinks.append(ProgressSink(cfg.train.max_steps, start_step))
    wandb_sink = None
    if cfg.logging.wandb:
        lc = cfg.logging
        wandb_sink = WandbSink(
            run_dir,
            to_dict(cfg),
            lc.wandb_project,
            lc.wandb_entity,
            lc.wandb_mode,
            lc.wandb_group,
            lc.wandb_job_type,
            run_dir.name,
            start_step,
        )
        sinks.append(wandb_sink)
    return MultiSink(sinks), wandb_sink, cost


def evaluate_run(
    cfg: Config,
    model: torch.nn.Module,
    codec: MaskCodec,
    device: torch.device,
    run_dir: Path,
    detections_path: Path | None = None,
) -> dict:
    """COCOeval on the val split -> run_dir/eval.json (percent) and the per-image records (eval_images.npz); the
    detections too, to ``detections_path``."""
    val_set = build_dataset(cfg.data, "val", train=False)
    loader = build_eval_loader(val_set, cfg.data, cfg.eval.batch_size)
    results = predict_dataset(
        model,
        codec,
        loader,
        device,
        val_set.category_ids,
        cfg.eval.max_detections,
        cfg.eval.mask_threshold,
        cfg.logging.progress,
        use_amp(device, cfg.train.amp),
    )
    if detections_path is not None:
        atomic_write_json(detections_path, results)
    evaluation = coco_evaluate(val_set.coco, results)
    atomic_write_json(run_dir / EVAL_FILE, evaluation.metrics)
    atomic_write_text(run_dir / EVAL_TEXT_FILE, evaluation.summary)
    if evaluation.segm_records is not None:
        save_records(run_dir / EVAL_IMAGES_FILE, evaluation.segm_records)
    return evaluation.metrics


def check_arms(cfg: Config) -> None:
    """Each ablation arm looked up in the registry its builder uses (the axes of istr/axes.py): UnknownArmError,
    listing the valid names."""
    for ax in REGISTRY_AXES:
        for key in ax.keys:
            pick(ax.arms(), config_value(cfg, key), key)


def catch_preemption(enabled: bool) -> tuple[list[int], Callable[[], None]]:
    """SIGUSR1/SIGTERM -> appended to the returned list, so the loop can checkpoint its step before it exits;
    and the function that restores the previous handlers.

    Only in a single-process run's main thread: under DDP every rank would have to agree on the step to stop at.
    """
    caught: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        return caught, lambda: None
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum)) for s in PREEMPT_SIGNALS}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return caught, restore


def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """Train ``cfg`` into ``run_dir`` (fresh, or resumed from checkpoints/last.pt) and evaluate."""
    check_arms(cfg)  # before anything is written, generated or fitted
    info = D.init_distributed(cfg.train.device)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT_FILE
    checkpoint = None
    if info.is_main:
        check_run_dir(run_dir, resume)  # before any data work: a user's folder is refused untouched
        if resume:
            checkpoint = resumable_checkpoint(ckpt_path, cfg.train.max_steps)
        # Both splits are checked before anything is written (config values were, by load_config).
        ensure_dataset(cfg.data)
        check_dataset(cfg.data, Path(cfg.cache_dir))
    if info.device.type == "cpu":
        keep_freed_memory()  # large per-step tensors reuse the heap instead of fresh zero-filled pages
        if cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)

    marker_fields = {"config_hash": config_hash(cfg), "world_size": info.world_size, "device": str(info.device)}
    with claimed(run_dir, marker_fields) if info.is_main else contextlib.nullcontext():
        if info.is_main:
            atomic_write_text(run_dir / CONFIG_FILE, to_yaml(cfg))
        D.barrier()
        train_set = build_dataset(cfg.data, "train", train=True)
        codec = prepare_codec(cfg, run_dir, train_set, info).to(info.device)
        # Rank 0 pretrains and caches an 'auto' backbone once (one-time cost); the others then find it.
        weights = resolve_backbone_weights(cfg) if info.is_main else None
        D.barrier()
        if not info.is_main:
            weights = resolve_backbone_weights(cfg, build=False)
        model = build_model(cfg.model, train_set.num_classes, codec.dim, weights).to(info.device)
        if info.device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, scheduler = build_optimizer(model, cfg.train)
    start_step = 0
    if resume:
        if checkpoint is None:  # the other ranks read it once rank 0 has checked it
            checkpoint = load_checkpoint(ckpt_path, info.device)
        model.load_state_dict(checkpoint["model"])
        if has_training_state(checkpoint):
            optimizer.load_state_dict(checkpoint["optimizer"])
            scheduler.load_state_dict(checkpoint["scheduler"])
        start_step = checkpoint["step"]
        del checkpoint
    train_model = model
    if info.world_size > 1:
        train_model = DistributedDataParallel(
            model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
        )
    if cfg.train.compile:
        train_model = torch.compile(train_model)
    matcher = build_matcher(cfg.matcher, codec)
    state = TrainState(
        train_model,
        codec,
        build_criterion(cfg.loss, matcher, codec),
        optimizer,
        scheduler,
        loss_weights(cfg.loss),
        info.device,
        use_amp(info.device, cfg.train.amp),
        cfg.train.clip_grad_norm,
    )

    batch_per_rank = max(1, cfg.train.batch_size // info.world_size)
    loader = build_train_loader(
        train_set,
        cfg.data,
        batch_per_rank,
        cfg.seed,
        info.rank,
        info.world_size,
        start_step,
        pin_memory=info.device.type == "cuda",
    )
    sink, wandb_sink, cost = build_sinks(cfg, run_dir, start_step, info)
    step, started, window_start, window_images = start_step, time.perf_counter(), time.perf_counter(), 0
    preempted, restore_signals = catch_preemption(info.world_size == 1)
    try:
        model.train()
        batches = iter(loader)
        while step < cfg.train.max_steps:
            batch = next(batches)
            try:
                metrics = train_step(state, batch)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"step {step + 1}: {err}; last good checkpoint kept at {ckpt_path}") from None
            step += 1
            window_images += len(batch["targets"]) * info.world_size
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics["img_per_s"] = window_images / max(elapsed, 1e-9)
                sink.log(step, metrics)
                window_start, window_images = time.perf_counter(), 0
            if info.is_main and (step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps):
                # The last one keeps the weights only, unless asked (docs/architecture.md#results).
                keep_state = step < cfg.train.max_steps or cfg.train.keep_optimizer_state
                save_checkpoint(ckpt_path, model, step, *((optimizer, scheduler) if keep_state else ()))
            if (
                cfg.train.eval_every
                and step % cfg.train.eval_every == 0
                and step < cfg.train.max_steps
                and info.is_main
            ):
                metrics_eval = evaluate_run(cfg, model, codec, info.device, run_dir)
                sink.log(
                    step, {f"eval/{t}_{k}": v for t, m in metrics_eval.items() for k, v in m.items() if v is not None}
                )
                model.train()
            if preempted and step < cfg.train.max_steps:  # a sweep worker resumes the cell from this step
                if step % cfg.train.checkpoint_every:
                    save_checkpoint(ckpt_path, model, step, optimizer, scheduler)
                log.warning("preempted (%s) at step %d: checkpoint saved to %s; exiting %d to be resumed",
                            signal.Signals(preempted[0]).name, step, ckpt_path, PREEMPTED_EXIT)
                raise SystemExit(PREEMPTED_EXIT)
        train_seconds = time.perf_counter() - started
        totals = cost.totals() if cost else {}  # every attempt: a killed one's time counts too
        checksums = D.all_gather_floats(parameter_checksum(model))
        result: dict = {}
        if info.is_main:
            result = evaluate_run(cfg, model, codec, info.device, run_dir)
            sink.summary({**flat_metrics(result), "train_seconds": totals["train_seconds"], "steps": step})
            atomic_write_json(
                run_dir / SUMMARY_FILE,
                {
                    "steps": step,
                    "train_seconds": totals["train_seconds"],
                    "attempt_seconds": train_seconds,
                    "attempts": totals["attempts"],
                    "device": str(info.device),
                    "world_size": info.world_size,
                    "param_checksums": checksums,
                    "wandb_run_id": wandb_sink.run_id if wandb_sink else None,
                    "img_per_s": totals["img_per_s"],
                    "code_version": code_version(),
                },
            )
        D.barrier()
        return result
    except Exception:
        if preempted:  # e.g. data loader workers killed by the same signal: the last checkpoint is kept
            log.warning("preempted (%s) at step %d: exiting %d to be resumed from the last checkpoint",
                        signal.Signals(preempted[0]).name, step, PREEMPTED_EXIT)
            raise SystemExit(PREEMPTED_EXIT) from None
        raise
    finally:
        restore_signals()
        sink.close()
        D.cleanup()
