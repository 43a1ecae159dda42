"""fsync_tree, which checkpoints and saved models go through before their directory is renamed into place."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from opdistill.fileio import fsync_tree


def test_fsync_tree_syncs_every_file_and_directory_and_passes_over_a_dangling_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "weights.bin").write_bytes(b"x")
    (tmp_path / "state.json").write_text("{}")
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    synced: list[Path] = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, flags: synced.append(Path(path)) or real_open(path, flags))
    fsync_tree(tmp_path)
    assert sorted(synced) == sorted([tmp_path, tmp_path / "sub", tmp_path / "sub" / "weights.bin", tmp_path / "state.json"])
