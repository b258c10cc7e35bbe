"""A sweep spec file (``sweeps/<axis>.yaml``, docs/sweeps.md) read into its parameters and base preset.

The one reader of a spec's YAML: the sweep harness (``istr.sweep.spec.load_spec``, which adds the W&B method,
metric and pruner checks) and the analysis (``analysis.load.read_axes``) both start here, so a spec means the
same to both. A leaf (docs/architecture.md#layers): the analysis may import it, and it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SEED_KEY = "seed"  # the one parameter that is not an arm: the seed grid


class SpecFileError(ValueError):
    """A file that is not a sweep spec; the message names the file (and the line, for malformed YAML)."""


@dataclass(frozen=True)
class SpecFile:
    """What every reader of a spec needs: its parameters (as written) and the base preset of its command."""

    path: Path
    raw: dict[str, Any]
    parameters: dict[str, Any]
    command: list[str]
    preset: str  # the --config argument of command

    @property
    def axis(self) -> str:
        """The file stem: ``sweeps/loss.yaml`` -> ``loss`` (W&B's job_type, the results' ``axis``)."""
        return self.path.stem

    def axis_keys(self) -> list[str]:
        """The swept config keys: every parameter but the seed."""
        return [k for k in self.parameters if k != SEED_KEY]


def preset_from_command(path: Path, command: list[str]) -> str:
    """The base preset: the ``--config FILE`` argument of a command that calls ``istr train`` with the parameters."""
    if "--config" not in command or command.index("--config") + 1 >= len(command):
        raise SpecFileError(f"{path}: command needs '--config experiments/<preset>.yaml' (the base preset)")
    if "${args_no_hyphens}" not in command and "${args}" not in command:
        raise SpecFileError(f"{path}: command must pass the parameters with ${{args_no_hyphens}}")
    if "train" not in command or "istr" not in command:
        raise SpecFileError(f"{path}: command must call 'istr train' (e.g. ${{interpreter}} -m istr train ...)")
    return command[command.index("--config") + 1]


def read_spec_file(path: str | Path) -> SpecFile:
    """Parse ``path``: a mapping whose ``parameters`` is a non-empty mapping and whose ``command`` is a list
    naming the base preset. Errors are :class:`SpecFileError`, naming the file and the fix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecFileError(f"{where}: malformed YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecFileError(f"{path}: a sweep spec is a mapping with method/metric/parameters/command")
    for key in ("parameters", "command"):
        if key not in raw:
            raise SpecFileError(f"{path}: missing W&B sweep key '{key}'")
    params = raw["parameters"]
    if not isinstance(params, dict) or not params:
        raise SpecFileError(f"{path}: parameters must be a non-empty mapping")
    if not isinstance(raw["command"], list):
        raise SpecFileError(f"{path}: command must be a list (${{env}}, ${{interpreter}}, -m, istr, train, ...)")
    command = [str(c) for c in raw["command"]]
    return SpecFile(path=path, raw=raw, parameters=params, command=command, preset=preset_from_command(path, command))
