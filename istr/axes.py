"""The paper's ablation axes, listed once (docs/adding-an-arm.md): embedding, embedding_dim, mask_cost, loss, attention.

For each axis: its name (the stem of its sweep spec ``sweeps/<axis>.yaml``), the config keys it sweeps, the
registry its arms live in and whether it is a codec axis (its arms are (codec type, dim) pairs). ``istr ablate``,
the analysis tables and ``istr.engine.train.check_arms`` read this list; the spec itself stays the plain W&B
sweep config that holds the arm values (``tests/test_axes.py`` keeps the two in step).

A registry is named by a string, ``"module:NAME"``, not imported: the registries live in the parts
(``istr.codecs``, ``istr.matcher``, ``istr.losses``, ``istr.model.head``), which import torch, and this module is a
leaf (docs/architecture.md#layers) that the analysis and the CLI's start import without torch. :meth:`Axis.arms`
imports the registry only when asked, i.e. by the engine and the tests, which have torch anyway; the string also
reads as-is in docs and error messages.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from istr.results import arm_name
from istr.spec_file import SpecFile, read_spec_file

REPO = Path(__file__).resolve().parents[1]
SPEC_DIR = Path("sweeps")  # the specs' folder, relative to the repo root (and to the cwd, which comes first)


@dataclass(frozen=True)
class Axis:
    """One ablation axis: what it sweeps and where its arms are defined."""

    name: str  # the spec's file stem and the results' ``axis`` column
    keys: tuple[str, ...]  # the config keys its spec sweeps (every parameter but the seed)
    registry: str | None  # "module:NAME" of the dict from arm name to what computes it; None: plain values
    title: str = ""  # what the paper's table ablates, as a heading
    codec: bool = False  # its arms are codecs (type, dim): the codec upper-bound table reads these axes

    @property
    def spec(self) -> Path:
        """``sweeps/<axis>.yaml``, relative to the repo root."""
        return SPEC_DIR / f"{self.name}.yaml"

    def read_spec(self, root: Path = REPO) -> SpecFile:
        """The axis' spec under ``root`` (default: this checkout), parsed as the harness and the analysis read it."""
        return read_spec_file(Path(root) / self.spec)

    def arms(self) -> Mapping[str, Any]:
        """The registry (arm name -> what computes it); imports its part, so only callers that have torch ask."""
        if self.registry is None:
            raise ValueError(f"axis {self.name}: its arms are values of {', '.join(self.keys)}, not registry names")
        module, _, name = self.registry.partition(":")
        return getattr(importlib.import_module(module), name)


# The paper's order (its Tables 1-4).
AXES: tuple[Axis, ...] = (
    Axis("embedding", ("codec.type",), "istr.codecs:CODECS", "Mask embedding (type, l = 60)", codec=True),
    Axis("embedding_dim", ("codec.dim",), None, "Mask embedding dimension l (PCA)", codec=True),
    Axis("mask_cost", ("matcher.mask_cost",), "istr.matcher:MASK_COSTS", "Mask matching cost"),
    Axis("loss", ("loss.mask",), "istr.losses:MASK_LOSSES", "Mask loss"),
    Axis("attention", ("model.attention",), "istr.model.head:ATTENTIONS", "Attention"),
)
AXIS_NAMES: tuple[str, ...] = tuple(a.name for a in AXES)
CODEC_AXES: tuple[str, ...] = tuple(a.name for a in AXES if a.codec)
REGISTRY_AXES: tuple[Axis, ...] = tuple(a for a in AXES if a.registry)  # the axes whose arms are names


def axis(name: str) -> Axis:
    """The axis called ``name``; KeyError listing the axes otherwise."""
    for a in AXES:
        if a.name == name:
            return a
    raise KeyError(f"{name!r} is not an ablation axis; axes: {', '.join(AXIS_NAMES)}")


def config_value(cfg: Any, key: str) -> Any:
    """``cfg``'s value of a dotted key (``codec.type``), as a sweep override would set it."""
    return functools.reduce(getattr, key.split("."), cfg)


def preset_arm(cfg: Any, keys: Iterable[str]) -> str:
    """The arm ``cfg`` is on along ``keys``, named as the harness names a cell's arm: an axis' default arm is
    its preset's own value, so the sweep harness, ``istr ablate`` and the analysis all name it this way."""
    return arm_name({k: config_value(cfg, k) for k in keys})
