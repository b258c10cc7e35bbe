"""Sweeps on a shared PostgreSQL study: several `istr sweep` processes ("machines", each with its own
--root) started at once on an empty database. A throwaway server is started per test (initdb + pg_ctl): the
``postgres_url`` fixture of tests/conftest.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from istr.sweep import run_sweep, sweep_status
from istr.sweep.storage import open_storage
from tests.conftest import REPO
from tests.sweep_helpers import cell_dirs, metrics_lines, read_rows, write_setup

pytestmark = pytest.mark.slow


def test_two_workers_on_postgres_run_each_cell_once(tmp_path, tiny_cfg_factory, postgres_url):
    preset, spec = write_setup(tmp_path, tiny_cfg_factory, ["l2+dice", "l2"])
    root = tmp_path / "runs"
    counts = run_sweep(spec, preset=str(preset), seeds=1, sets=["logging.wandb=false"], study_name="pg",
                       workers=2, storage_url=postgres_url, root=root, progress=False)
    assert counts["done"] == 2 and counts["failed"] == 0
    study = optuna.load_study(study_name="pg", storage=open_storage(postgres_url, root, "pg"))
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(study.trials) == 2 and len({t.user_attrs["cell_id"] for t in complete}) == 2
    # every metric is a flat user attr (the dashboard's columns; the rows of machines without the dirs)
    assert all({"segm_AP", "bbox_AP75", "steps", "wall_s", "img_per_s"} <= set(t.user_attrs) for t in complete)
    assert set(metrics_lines(cell_dirs(root, "pg")).values()) == {2}
    assert len(read_rows(root, "pg")) == 2
    assert sweep_status("pg", postgres_url, root)["done"] == 2
    assert not (root / "pg" / "journal.log").exists()


def _machines(n: int, tmp_path: Path, cfg_factory, url: str, arms: list[str], seeds: int):
    preset, spec = write_setup(tmp_path, cfg_factory, arms)
    cmd = [sys.executable, "-m", "istr", "sweep", str(spec), "--preset", str(preset), "--seeds", str(seeds),
           "--name", "shared", "--storage", url, "--set", "logging.wandb=false"]
    roots = [tmp_path / f"machine{i}" for i in range(n)]
    procs = [subprocess.Popen([*cmd, "--root", str(r)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for r in roots]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    return roots, [p.returncode for p in procs], outputs


@pytest.mark.parametrize(("machines", "arms", "seeds"), [(2, ["l2+dice", "l2", "dice"], 1),
                                                         (4, ["l2+dice", "l2"], 2)])
def test_machines_on_one_postgres_study_queue_once_and_all_see_every_result(
        tmp_path, tiny_cfg_factory, postgres_url, machines, arms, seeds):
    """Started at the same second on an empty database: nobody crashes creating Optuna's schema, the grid is
    queued once (trials == cells), every machine exits 0 only once all cells are done, and every machine's
    results.csv holds every cell, wherever it ran."""
    roots, codes, outputs = _machines(machines, tmp_path, tiny_cfg_factory, postgres_url, arms, seeds)
    cells = len(arms) * seeds
    assert codes == [0] * machines, "\n".join(outputs)
    study = optuna.load_study(study_name="shared", storage=open_storage(postgres_url, tmp_path, "shared"))
    assert len(study.trials) == cells, [(t.number, t.state, t.user_attrs.get("fail_reason")) for t in study.trials]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    for root in roots:
        rows = read_rows(root, "shared")
        assert len(rows) == cells and len({r["cell_id"] for r in rows}) == cells
        assert all(r["segm_AP"] != "" and r["steps"] == "2" for r in rows)
    trained = [d.name for root in roots for d in cell_dirs(root, "shared")]
    assert sorted(trained) == sorted({t.user_attrs["cell_id"] for t in study.trials})  # each cell trained once
    assert not any("Heartbeat of storage" in out or "Traceback" in out for out in outputs), "\n".join(outputs)
    # a machine that ran nothing gets every row from the storage alone
    third = tmp_path / "laptop"
    cli = subprocess.run([sys.executable, "-m", "istr", "sweep", "results", "shared", "--storage", postgres_url,
                          "--root", str(third)], cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 0 and f"({cells} completed cells)" in cli.stdout, cli.stdout + cli.stderr
    assert read_rows(third, "shared") == read_rows(roots[0], "shared")
    missing = subprocess.run([sys.executable, "-m", "istr", "sweep", "status", "nope", "--storage", postgres_url],
                             cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr
