"""The committed tiny-preset ablation (results/tiny/): `make tables` rebuilds every table and figure from its cell
archive, byte for byte, and trains nothing."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.summary import ABLATION_SUMMARY_FILE
from tests.conftest import REPO

EXPERIMENT = REPO / "results" / "tiny"
README_BLOCK = ("<!-- ablation tables: begin -->", "<!-- ablation tables: end -->")


def _tables_command() -> list[str]:
    """What `make tables` runs (read from the Makefile, so the test and the target cannot drift apart)."""
    makefile = (REPO / "Makefile").read_text()
    options = re.search(r"^TINY_ABLATION := (.+)$", makefile, re.M).group(1).split()
    return [sys.executable, "-m", "istr", "ablate", *options, "--tables-only"]


def _outputs(folder: Path) -> dict[str, bytes]:
    """Every table, figure and the seed rule: what `make tables` writes (the archive is its input; overlays need
    weights, which the archive does not keep)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.parts[len(folder.parts)] != "cells" and "_overlays." not in p.name}  # fmt: skip


@pytest.mark.slow
def test_make_tables_rebuilds_the_committed_tables_byte_for_byte(tmp_path):
    if not (EXPERIMENT / "cells").is_dir():
        pytest.fail(f"{EXPERIMENT}/cells is missing: the committed experiment is part of the repository")
    copy = tmp_path / "tiny"
    shutil.copytree(EXPERIMENT, copy)
    committed = _outputs(copy)
    for name in committed:  # the codec report is an input too: the run scored the codecs on the val set
        if name != ".istr-output" and not name.startswith("codec_report."):
            (copy / name).unlink()
    done = subprocess.run([*_tables_command(), "--out", str(copy), "--root", str(tmp_path / "runs")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "runs").exists()  # no sweep ran: nothing was trained
    rebuilt = _outputs(copy)
    assert sorted(rebuilt) == sorted(committed)
    differ = [name for name in committed if rebuilt[name] != committed[name]]
    assert not differ, f"make tables wrote other bytes than results/tiny holds: {differ}"


def test_the_readme_shows_the_committed_summary():
    readme = (REPO / "README.md").read_text()
    begin, end = README_BLOCK
    shown = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert shown.strip() == (EXPERIMENT / ABLATION_SUMMARY_FILE).read_text().strip(), (
        f"README.md's ablation tables differ from results/tiny/{ABLATION_SUMMARY_FILE}: paste that file between "
        "the markers after `make tables`"
    )
