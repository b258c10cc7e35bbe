"""Output folders: a command writes only into a folder it made, or a missing or empty one."""

from __future__ import annotations

import pytest

from istr.cli import main
from istr.io import OUTPUT_MARKER, ForeignFolderError, claim_output_folder, remove_stale_temps


def test_missing_empty_or_marked_folders_are_claimed(tmp_path):
    made = claim_output_folder(tmp_path / "new" / "deeper")
    assert (made / OUTPUT_MARKER).is_file()
    (made / "table.md").write_text("ours")
    assert claim_output_folder(made) == made  # marked: used again
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (claim_output_folder(empty) / OUTPUT_MARKER).is_file()


def test_a_users_folder_or_file_is_refused_untouched(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "attention.md").write_text("my own notes")
    with pytest.raises(ForeignFolderError, match=f"--out {mine} is not empty"):
        claim_output_folder(mine)
    assert [p.name for p in mine.iterdir()] == ["attention.md"]
    with pytest.raises(ForeignFolderError, match="is a file"):
        claim_output_folder(mine / "attention.md")


@pytest.mark.parametrize("command", [
    ["predict", "--run", "nowhere", "image.png"],
    ["quickstart"],
    ["ablate", "--axes", "attention", "--seeds", "1"],
    ["codec-report", "--config", "experiments/tiny.yaml"],
])
def test_commands_refuse_a_users_out_folder_before_any_work(tmp_path, capsys, command):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_bytes(b"the user's own bytes")
    assert main([*command, "--out", str(mine)]) == 2
    assert f"--out {mine} is not empty" in capsys.readouterr().err
    assert [(p.name, p.read_bytes()) for p in mine.iterdir()] == [("summary.md", b"the user's own bytes")]


def test_analysis_refuses_a_users_out_folder(tmp_path, capsys):
    from analysis.tables import main as tables_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "loss.md").write_text("mine")
    assert tables_main(["--runs", str(tmp_path / "runs"), "--out", str(mine)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["loss.md"]


def test_remove_stale_temps_removes_only_atomic_writes_leftovers(tmp_path):
    (tmp_path / ".last.pt.x1y2.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".last.pt.x1y2.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
