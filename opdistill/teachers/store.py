"""Durable, append-only store of collected teacher responses (the `--out` JSONL file itself).

Each response is one JSON line, written, flushed and fsynced as it arrives, so a crash or kill -9 loses
at most the requests in flight. A line torn by a crash mid-write is cut off when the store is reopened.
Records are keyed by (prompt, teacher, sampling parameters, sample index); a key already stored is never
requested again and never written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import DataError


def content_key(fields: dict[str, Any]) -> str:
    """Stable hash of what determines a stored result (canonical JSON: sorted keys, no whitespace): the key of
    every durable cache here (teacher responses, eval generations, judge replies, teacher log-probs)."""
    canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_key(messages: list[dict[str, str]], teacher: str, sampling: dict[str, Any], sample_index: int) -> str:
    """Stable hash of what determines one response."""
    return content_key({"messages": messages, "teacher": teacher, "sampling": sampling, "sample_index": sample_index})


class JsonlLog:
    """An append-only JSONL file where each line is committed (flush + fsync) before append() returns.

    `rows` holds the lines read at open, and (unless `keep_rows` is false) every line appended since: a caller that
    keeps its own index of the rows (the remote teacher's cache) passes false, so they are not held twice."""

    def __init__(self, path: str | Path, keep_rows: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.keep_rows = keep_rows
        self.rows: list[dict[str, Any]] = self._read_and_repair()
        self._handle = open(self.path, "a", encoding="utf-8")

    def _read_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            # A torn last line from a crash mid-write: drop it (its request was in flight, not committed).
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)
                os.fsync(handle.fileno())
            data = data[:keep]
        rows = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"{self.path}:{number}: the store has a corrupt line", "move the file aside or delete that line; other lines are intact") from None
            if not isinstance(row, dict):
                raise DataError(f"{self.path}:{number}: a store line must be a JSON object")
            rows.append(row)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        if self.keep_rows:
            self.rows.append(row)

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the whole file by `rows`, atomically: a new file is written and fsynced, renamed over the old one,
        and the directory fsynced, so a crash at any point leaves either the old lines or the new ones, never a mix."""
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            handle.flush()
            os.fsync(handle.fileno())
        self._handle.close()
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is durable
        finally:
            os.close(directory)
        self._handle = open(self.path, "a", encoding="utf-8")
        self.rows = list(rows) if self.keep_rows else []

    def close(self) -> None:
        self._handle.close()


class ResponseStore:
    """Collected responses in `path`, failures in `path` + `.failures.jsonl` (for the record; reruns retry them)."""

    def __init__(self, path: str | Path) -> None:
        self.responses = JsonlLog(path)
        self.failures = JsonlLog(str(path) + ".failures.jsonl")
        self._keys = set()
        for number, row in enumerate(self.responses.rows, start=1):
            key = row.get("meta", {}).get("key") if isinstance(row.get("meta"), dict) else None
            if not key:
                raise DataError(f"{path}: record {number} has no meta.key, so this is not an opdistill store", "write to a new --out file")
            self._keys.add(key)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, record: dict[str, Any]) -> bool:
        """Commit one response; returns False (and writes nothing) when its key is already stored."""
        key = record["meta"]["key"]
        if key in self._keys:
            return False
        self.responses.append(record)
        self._keys.add(key)
        return True

    def add_failure(self, failure: dict[str, Any]) -> None:
        self.failures.append(failure)

    def close(self) -> None:
        self.responses.close()
        self.failures.close()
