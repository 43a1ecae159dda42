"""Small file-system helpers shared by the writers of checkpoints and saved models."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_tree(root: Path) -> None:
    """Force every file under `root`, and every directory including `root` itself, to disk.

    Files hold the data; directories hold the names of their entries, so a directory that is not synced can
    lose a file after a power cut even though the file's data was synced. Callers rename `root` into place
    afterwards, and that rename only promises a complete tree once both are durable.
    """
    for path in [*root.rglob("*"), root]:
        if not (path.is_file() or path.is_dir()):  # a dangling link or a special file has no data of its own to sync
            continue
        # os.open with O_RDONLY opens files and directories alike (a Python open() cannot open a directory)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
