"""Logging sinks behind one small interface: progress bar, JSONL file, cost file, W&B (offline by default).

W&B is imported lazily here, at the edge; a W&B failure is reported and never fails the run. A resumed
training continues the same W&B run (same id, ``resume="allow"``) and first replays the history it
already wrote to ``metrics.jsonl``, so the run's history is whole even if the killed attempt's W&B
files were lost; the killed attempt's offline folder moves to ``wandb-attempts/`` so ``wandb sync``
uploads one run. The ``.wandb`` file is flushed every :data:`WANDB_FLUSH_S` seconds (W&B's default: 15).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from istr.io import atomic_write_json, atomic_write_text
from istr.results import METRICS_FILE

log = logging.getLogger(__name__)
WANDB_FLUSH_S = 5.0  # seconds between writes of the run's .wandb file: a kill loses at most this much history


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
        # Appended line by line, not through istr.io: an atomic rewrite per step would copy the whole history
        # each time, and a kill cuts at most the last line (replay_history skips it).
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


class CostSink(Sink):
    """Training seconds and images of every attempt of a run, summed in ``cost.json``.

    Rewritten at each logged step, so a killed attempt's cost survives (all but its last ``log_every``
    steps) and a resumed one adds to it; :meth:`totals` feeds ``train_summary.json``.
    """

    def __init__(self, path: Path, batch_size: int, start_step: int) -> None:
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = {}
        self.path, self.batch_size, self.last_step = path, batch_size, start_step
        self.earlier_s, self.images = float(earlier.get("train_seconds", 0.0)), int(earlier.get("images", 0))
        self.attempts, self.started = int(earlier.get("attempts", 0)) + 1, time.perf_counter()

    def totals(self) -> dict[str, Any]:
        seconds = self.earlier_s + time.perf_counter() - self.started
        return {"train_seconds": seconds, "images": self.images, "attempts": self.attempts,
                "img_per_s": self.images / max(seconds, 1e-9)}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step > self.last_step:  # an eval line repeats a step
            self.images += (step - self.last_step) * self.batch_size
            self.last_step = step
        atomic_write_json(self.path, self.totals())


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"mask": "l2"}}`` -> ``{"loss.mask": "l2"}`` (the keys W&B sweeps and its UI group by)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def replay_history(path: Path, after: int, until: int) -> list[tuple[int, dict[str, Any]]]:
    """The ``metrics.jsonl`` rows of steps in (after, until], one merged dict a step (the last write wins)."""
    rows: dict[int, dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        step = record.pop("step", None)
        if isinstance(step, int) and after < step <= until:
            rows.setdefault(step, {}).update(record)
    return sorted(rows.items())


class WandbSink(Sink):
    """A W&B run; ``WANDB_MODE`` (e.g. ``disabled``) overrides the configured mode."""

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        project: str,
        entity: str,
        mode: str,
        group: str,
        job_type: str,
        name: str,
        start_step: int = 0,
    ) -> None:
        self.run = None
        id_file = run_dir / "wandb_id.txt"
        try:
            import wandb

            mode = os.environ.get("WANDB_MODE", mode)
            if id_file.is_file() and mode == "offline":
                _set_aside_offline_runs(run_dir)
            tags = [t for t in os.environ.get("WANDB_TAGS", "").split(",") if t]
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
                name=os.environ.get("WANDB_NAME") or name,
                tags=tags or None,
                id=run_id,
                resume="allow",
                config={**config, **flat_config(config)},
                dir=str(run_dir),
                settings=wandb.Settings(silent=True, console="off", init_timeout=60,
                                        x_transaction_log_flush_interval=WANDB_FLUSH_S),
            )
            atomic_write_text(id_file, run_id)
            for step, metrics in replay_history(run_dir / METRICS_FILE, self.run.step, start_step):
                self.run.log(metrics, step=step)
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


def _set_aside_offline_runs(run_dir: Path) -> None:
    """Move earlier attempts' offline runs to ``wandb-attempts/``: the resumed run replays their history."""
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (run_dir / "wandb-attempts").mkdir(exist_ok=True)
        shutil.move(str(folder), run_dir / "wandb-attempts" / folder.name)


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
