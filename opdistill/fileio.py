"""Small file-system helpers: syncing trees for the writers of checkpoints and saved models, and reading JSONL files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any


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


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line of a .jsonl (or .jsonl.gz) file, a byte-order mark allowed.
    A line that is not a JSON object raises DataError naming the file and line."""
    from .errors import DataError

    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})", "fix or remove that line") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise DataError(f"{path}: cannot be read ({err})", "pass a UTF-8 JSONL file (or .jsonl.gz)") from None
    return rows
