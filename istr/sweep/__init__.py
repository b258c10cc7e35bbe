"""Sweep harness: W&B sweep specs run as resumable Optuna studies (docs/architecture.md#data-flow).

Optuna and W&B are imported only inside this package, never by the model or engine.
``run_sweep`` runs/resumes a spec, ``sweep_status`` counts a study's cells, ``sweep_results`` rebuilds
its results.csv from the storage, ``load_spec`` parses
and expands a spec; ``istr.sweep.cli.add_parsers`` registers the ``istr`` subcommands.
"""

from istr.sweep.records import sweep_results, sweep_status
from istr.sweep.runner import run_sweep
from istr.sweep.spec import SpecError, cell_identity, load_spec

__all__ = ["SpecError", "cell_identity", "load_spec", "run_sweep", "sweep_results", "sweep_status"]
