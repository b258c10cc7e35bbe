"""The training driver (docs/architecture.md#data-flow): build -> train_step* -> evaluate, into a run dir.

The schedule and AdamW are istr/engine/optim.py, one step istr/engine/step.py, the run's codec
istr/engine/codec_setup.py, its sinks istr/engine/sink_setup.py, the evaluation istr/engine/evaluate.py and the
preemption signals istr/engine/preemption.py; this file wires them into a run: DDP under torchrun, bf16 autocast
(istr/engine/precision.py), atomic checkpoints, exact resume (docs/method.md#training). A preemption signal makes
a single-process run checkpoint the step it is on and exit ``PREEMPTED_EXIT``, so it resumes there.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from istr.axes import REGISTRY_AXES, config_value
from istr.config import Config, config_hash, to_yaml
from istr.data.build import build_dataset, build_train_loader, check_dataset, ensure_dataset
from istr.engine import dist as D
from istr.engine.checkpoint import has_training_state, load_checkpoint, resumable_checkpoint, save_checkpoint
from istr.engine.codec_setup import prepare_codec
from istr.engine.evaluate import evaluate_run
from istr.engine.memory import keep_freed_memory
from istr.engine.optim import build_optimizer
from istr.engine.precision import use_amp
from istr.engine.preemption import PREEMPTED_EXIT, catch_preemption
from istr.engine.pretrain import resolve_backbone_weights
from istr.engine.rundir import check_run_dir, claimed
from istr.engine.sink_setup import build_sinks
from istr.engine.step import NonFiniteLossError, TrainState, train_step
from istr.io import atomic_write_json, atomic_write_text
from istr.losses import build_criterion, loss_weights
from istr.matcher import build_matcher
from istr.model import build_model
from istr.provenance import code_version
from istr.registry import pick
from istr.results import CHECKPOINT_FILE, CONFIG_FILE, SUMMARY_FILE, flat_metrics

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch from the config's one ``seed`` (docs/architecture.md#determinism)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parameter_checksum(model: torch.nn.Module) -> float:
    """A float that differs when any weight differs: DDP ranks must agree on it at the end."""
    with torch.no_grad():
        return float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(model.parameters())))


def check_arms(cfg: Config) -> None:
    """Each ablation arm looked up in the registry its builder uses (the axes of istr/axes.py): UnknownArmError,
    listing the valid names."""
    for ax in REGISTRY_AXES:
        for key in ax.keys:
            pick(ax.arms(), config_value(cfg, key), key)


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
