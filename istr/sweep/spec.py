"""Sweep specs: W&B sweep YAML files (``sweeps/*.yaml``) parsed, validated and expanded into cells.

A spec is a **valid W&B sweep config** (``method``, ``metric``, ``parameters``, ``command`` with
``${args_no_hyphens}`` calling ``istr train``), so ``wandb sweep sweeps/loss.yaml`` works unchanged.
Nothing project-specific is stored in extra keys; it is derived instead:

- **axis** = the file stem (``sweeps/loss.yaml`` -> ``loss``); it becomes the W&B ``job_type``;
- **base preset** = the ``--config FILE`` argument of ``command`` (``istr sweep --preset`` replaces it);
- **seeds** = the ``seed`` parameter (``--seeds N`` replaces it with ``0..N-1``);
- **arm** = the non-seed parameter values of a cell (the default arm is whatever the preset holds);
- **trial budget** of ``random``/``bayes`` = W&B's own ``run_cap`` key (default 20);
- **pruner** of ``random``/``bayes`` = W&B's own ``early_terminate: {type: hyperband, min_iter, eta}``
  (Optuna's HyperbandPruner on the ``train.eval_every`` evaluations; ``min_iter`` counts training steps).

A **cell** is one (arm x seed) point of a grid; its identity is the hash of its resolved config
(:func:`cell_identity`), so the same training in two studies is the same cell.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from istr.config import Config, ConfigError, LoggingConfig, config_hash
from istr.results import arm_name
from istr.spec_file import SEED_KEY, SpecFileError, read_spec_file

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")
REPO = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "categorical")


class SpecError(ConfigError):
    """A sweep spec that is not a usable W&B sweep config (a ConfigError: ``istr`` prints it cleanly)."""


@dataclass
class Cell:
    """One grid point: the sweep parameters and the ``key=value`` overrides they become."""

    params: dict[str, Any]
    arm: str
    seed: int

    @property
    def overrides(self) -> list[str]:
        return param_overrides(self.params)


@dataclass
class SweepSpec:
    path: Path
    axis: str
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    preset: str
    run_cap: int = 20
    early_terminate: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def axis_keys(self) -> list[str]:
        return [k for k in self.parameters if k != SEED_KEY]

    def with_seeds(self, seeds: int | None) -> SweepSpec:
        """A copy whose ``seed`` grid is ``0..seeds-1`` (``None`` keeps the spec's)."""
        if not seeds:
            return self
        spec = copy.deepcopy(self)
        spec.parameters["seed"] = {"values": list(range(int(seeds)))}
        return spec

    def cells(self) -> list[Cell]:
        """Expand a grid into cells (arm-major, then seed); only defined for ``method: grid``."""
        if self.method != "grid":
            raise SpecError(f"{self.path}: only a grid expands into cells (method is {self.method})")
        keys = list(self.parameters)
        grids = [_grid_values(self.path, k, self.parameters[k]) for k in keys]
        if "seed" not in self.parameters:
            keys.append("seed")
            grids.append([0])
        cells = []
        seed_pos = keys.index("seed")
        order = [i for i in range(len(keys)) if i != seed_pos] + [seed_pos]
        for combo in itertools.product(*[grids[i] for i in order]):
            params = {keys[i]: v for i, v in zip(order, combo)}
            cells.append(Cell(params, arm_name(params), int(params["seed"])))
        return cells


def _grid_values(path: Path, key: str, p: dict[str, Any]) -> list[Any]:
    if "values" in p:
        return list(p["values"])
    if "value" in p:
        return [p["value"]]
    raise SpecError(f"{path}: grid parameter '{key}' needs 'values' (or 'value'); got {sorted(p)}")


def param_overrides(params: dict[str, Any]) -> list[str]:
    """What W&B's ``${args_no_hyphens}`` produces: ``key=value`` per parameter."""
    out = []
    for key, value in params.items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (list, tuple)):
            value = "[" + ",".join(str(v) for v in value) + "]"
        out.append(f"{key}={value}")
    return out


def cell_identity(cfg: Config) -> str:
    """Cell id = hash of the resolved config with ``logging.*`` and ``train.num_threads`` reset to defaults.

    Logging (W&B group/job type, progress bars) does not change what is trained, and differs
    between studies by design, so it is left out: the default arm is one cell in all axes. The CPU
    thread count is how a cell runs (the harness sets it from ``--workers``), not what it trains.
    """
    cfg = copy.deepcopy(cfg)
    cfg.logging = LoggingConfig()
    cfg.train.num_threads = type(cfg.train)().num_threads
    return config_hash(cfg)


def resolve_spec_path(spec: str | Path) -> Path:
    """A path, or a name in ``sweeps/`` (``loss`` -> ``sweeps/loss.yaml``), cwd first then the repo."""
    spec = Path(spec)
    candidates = [spec, spec.with_suffix(".yaml"), Path("sweeps") / spec, Path("sweeps") / f"{spec}.yaml",
                  REPO / "sweeps" / spec, REPO / "sweeps" / f"{spec}.yaml"]
    for cand in candidates:
        if cand.is_file():
            return cand
    raise SpecError(f"sweep spec not found: {spec} (looked in ., sweeps/ and {REPO / 'sweeps'})")


def resolve_preset(preset: str | Path) -> Path:
    """A YAML path, or a name in ``experiments/`` (``tiny`` -> ``experiments/tiny.yaml``)."""
    p = Path(preset)
    for cand in (p, Path("experiments") / f"{p}.yaml", REPO / "experiments" / f"{p}.yaml",
                 REPO / p):
        if cand.is_file():
            return cand
    raise SpecError(f"preset not found: {preset} (a YAML path or a name in experiments/)")


def _check_parameter(path: Path, key: str, p: Any, method: str) -> None:
    if not isinstance(p, dict):
        raise SpecError(f"{path}: parameter '{key}' must be a mapping (values:/value:/distribution:)")
    if "values" in p or "value" in p:
        if "values" in p and not (isinstance(p["values"], list) and p["values"]):
            raise SpecError(f"{path}: parameter '{key}': 'values' must be a non-empty list")
        return
    if method == "grid":
        raise SpecError(f"{path}: grid parameter '{key}' needs 'values'")
    dist = p.get("distribution", "uniform")
    if dist not in DISTRIBUTIONS or "min" not in p or "max" not in p:
        raise SpecError(f"{path}: parameter '{key}' needs min/max and a distribution in {DISTRIBUTIONS}")


def load_spec(path: str | Path) -> SweepSpec:
    """Parse + validate a W&B sweep YAML; errors name the file and the fix.

    The YAML, the parameters and the command are read by :func:`istr.spec_file.read_spec_file`, as the analysis
    reads them; what only the harness needs (method, metric, run_cap, early_terminate) is checked here.
    """
    path = resolve_spec_path(path)
    try:
        spec_file = read_spec_file(path)
    except SpecFileError as err:
        raise SpecError(str(err)) from None
    raw = spec_file.raw
    for key in ("method", "metric"):
        if key not in raw:
            raise SpecError(f"{path}: missing W&B sweep key '{key}'")
    method = raw["method"]
    if method not in METHODS:
        raise SpecError(f"{path}: method '{method}' is not one of {METHODS}")
    metric = raw["metric"]
    if not isinstance(metric, dict) or "name" not in metric:
        raise SpecError(f"{path}: metric must be {{name: segm_AP, goal: maximize}}")
    goal = metric.get("goal", "maximize")
    if goal not in GOALS:
        raise SpecError(f"{path}: metric.goal '{goal}' is not one of {GOALS}")
    params = spec_file.parameters
    for key, p in params.items():
        _check_parameter(path, key, p, method)
    run_cap = raw.get("run_cap", 20)
    if not isinstance(run_cap, int) or run_cap < 1:
        raise SpecError(f"{path}: run_cap must be a positive integer, got {run_cap!r}")
    return SweepSpec(path=path, axis=spec_file.axis, method=method, metric=metric["name"], goal=goal,
                     parameters=params, preset=spec_file.preset, run_cap=run_cap,
                     early_terminate=_check_early_terminate(path, raw.get("early_terminate"), method), raw=raw)


def _check_early_terminate(path: Path, early: Any, method: str) -> dict[str, Any] | None:
    if early is None:
        return None
    if method == "grid":
        raise SpecError(f"{path}: early_terminate would prune grid cells; use it with method random or bayes")
    if not isinstance(early, dict) or early.get("type") != "hyperband":
        raise SpecError(f"{path}: early_terminate must be {{type: hyperband, min_iter: STEPS, eta: 3}}")
    for key in ("min_iter", "max_iter", "eta"):
        if key in early and not (isinstance(early[key], int) and early[key] > 0):
            raise SpecError(f"{path}: early_terminate.{key} must be a positive integer, got {early[key]!r}")
    return dict(early)
