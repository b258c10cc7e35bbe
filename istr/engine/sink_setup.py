"""The sinks of a run, from its config (docs/architecture.md#results): metrics.jsonl and cost.json always, the
progress bar and W&B when ``logging`` asks; rank 0 only, so a DDP run writes each file once."""

from __future__ import annotations

from pathlib import Path

from istr.config import Config, to_dict
from istr.engine import dist as D
from istr.engine.sinks import CostSink, JsonlSink, MultiSink, ProgressSink, Sink, WandbSink
from istr.results import COST_FILE, METRICS_FILE


def build_sinks(
    cfg: Config, run_dir: Path, start_step: int, info: D.DistInfo
) -> tuple[Sink, WandbSink | None, CostSink | None]:
    """(the sink the loop logs to, the W&B sink for its run id, the cost sink for its totals); a do-nothing
    ``Sink`` and two Nones off rank 0."""
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
