"""Logging sinks behind one small interface: progress bar, JSONL file, W&B (offline by default).

W&B is imported lazily here, at the edge; a W&B failure is reported and never fails the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class Sink:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one step."""

    def summary(self, metrics: dict[str, Any]) -> None:
        """Record end-of-run metrics (e.g. eval.json)."""

    def close(self) -> None:
        """Flush and release resources."""


class JsonlSink(Sink):
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.handle = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self.handle.close()


class ProgressSink(Sink):
    """tqdm bar showing the loss and the speed."""

    def __init__(self, total: int, initial: int) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=2.0)
        self.last_step = initial

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(step - self.last_step)
        self.last_step = step
        self.bar.set_postfix(loss=f"{metrics.get('loss', math.nan):.3f}", img_s=f"{metrics.get('img_per_s', 0):.1f}")

    def close(self) -> None:
        self.bar.close()


class WandbSink(Sink):
    """A W&B run; ``WANDB_MODE`` (e.g. ``disabled``) overrides the configured mode."""

    def __init__(
        self, run_dir: Path, config: dict, project: str, entity: str, mode: str, group: str, job_type: str, name: str
    ) -> None:
        self.run = None
        id_file = run_dir / "wandb_id.txt"
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", mode)
            # a resumed run keeps its id; under `wandb agent` the agent has chosen the id (WANDB_RUN_ID)
            run_id = (
                id_file.read_text().strip()
                if id_file.is_file()
                else os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)
            )
            self.run = wandb.init(
                project=project,
                entity=entity or None,
                mode=mode,
                group=group or None,
                job_type=job_type,
                name=name,
                id=run_id,
                resume="allow",
                config=config,
                dir=str(run_dir),
                settings=wandb.Settings(silent=True, console="off", init_timeout=60),
            )
            id_file.write_text(run_id)
        except Exception as err:  # noqa: BLE001 - logging must never fail the training run
            log.warning("W&B disabled for this run: %s", err)

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None) if self.run else None

    def _safely(self, action, *args) -> None:
        if self.run is None:
            return
        try:
            action(*args)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B call failed (run continues): %s", err)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._safely(lambda: self.run.log(metrics, step=step))

    def summary(self, metrics: dict[str, Any]) -> None:
        self._safely(lambda: self.run.summary.update(metrics))

    def close(self) -> None:
        self._safely(lambda: self.run.finish())


class MultiSink(Sink):
    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def summary(self, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.summary(metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
