"""Durable, append-only JSONL stores: collected teacher responses (the `--out` file itself) and the keyed, bounded
RowLog behind the remote teacher's cache.

Each response is one JSON line, written, flushed and fsynced as it arrives, so a crash or kill -9 loses
at most the requests in flight. A line torn by a crash mid-write is cut off when the store is reopened.
Records are keyed by (prompt, teacher, sampling parameters, sample index); a key already stored is never
requested again and never written twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
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


def repair_torn_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-write: its request was in flight, not committed) off `path`, reading only the
    file's tail, never the whole file."""
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        end = size
        while end > 0:
            start = max(0, end - 65536)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end < size:
            handle.truncate(end)
            os.fsync(handle.fileno())


def parse_line(path: Path, number: int, line: bytes) -> dict[str, Any]:
    """One store line as a JSON object; DataError naming the file and line when it is not one."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}:{number}: the store has a corrupt line", "move the file aside or delete that line; other lines are intact") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: a store line must be a JSON object")
    return row


class JsonlLog:
    """An append-only JSONL file where each line is committed (flush + fsync) before append() returns.
    `rows` holds the lines read at open and every line appended since."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            repair_torn_tail(self.path)
            with open(self.path, "rb") as handle:
                self.rows = [parse_line(self.path, number, line) for number, line in enumerate(handle, start=1) if line.strip()]
        self._handle = open(self.path, "a", encoding="utf-8")

    def append(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.rows.append(row)

    def close(self) -> None:
        self._handle.close()


@dataclass(slots=True)
class Slot:
    """Where a row's line lies in a RowLog's file, and the last step that used the row: `step` may run ahead of
    `written` (the step in the line) until a rewrite writes it."""

    offset: int
    length: int
    step: int
    written: int


class RowLog:
    """A durable key -> row store (the remote teacher's cache): one append-only JSONL file, each line committed (flush
    + fsync) before `add` returns, each row tagged with the last training step that used it.

    Bounded by what it holds, in bytes: memory keeps only an index (key -> Slot, ~350 bytes a row, whatever the row's
    length) and `get` reads a row back from its line; the file is streamed line by line at open and at a rewrite, never
    read whole. An `add` that would take the file past `max_bytes` first rewrites it to the most recently used rows
    that fit in half of it (so copying costs at most one byte per byte appended), and `retain` drops the rows no resume
    can ask for. A rewrite goes to a new file, fsynced, renamed over the old one, the directory fsynced: a crash at any
    point leaves the old lines or the new ones, never a mix."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        self.path, self.max_bytes = Path(path), max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, Slot] = {}
        self.size = 0  # bytes in the file, lines no longer indexed (a key written twice) included
        if self.path.exists():
            repair_torn_tail(self.path)
            with open(self.path, "rb") as handle:
                for number, line in enumerate(handle, start=1):
                    key, step = self._tag(parse_line(self.path, number, line)) if line.strip() else (None, -1)
                    if key is not None:  # a line without a key (not a row) is left to the next rewrite to drop
                        self.index[key] = Slot(self.size, len(line), step, step)
                    self.size += len(line)
        self._writer, self._reader = open(self.path, "ab"), open(self.path, "rb")
        if self.size > self.max_bytes:  # left by a run with a larger bound (or none)
            self._shrink()

    @staticmethod
    def _tag(row: dict[str, Any]) -> tuple[str | None, int]:
        key, step = row.get("key"), row.get("step", -1)
        return (key if isinstance(key, str) else None), (step if isinstance(step, int) else -1)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def get(self, key: str) -> dict[str, Any]:
        slot = self.index[key]
        self._reader.seek(slot.offset)
        return json.loads(self._reader.read(slot.length))

    def touch(self, key: str, step: int) -> None:
        slot = self.index[key]
        slot.step = max(slot.step, step)

    def add(self, key: str, row: dict[str, Any], step: int) -> None:
        """Commit `row` under `key`, tagged `step` (its line holds `key` and `step` first, then the row's fields)."""
        line = (json.dumps({"key": key, "step": step, **row}) + "\n").encode()
        if self.size + len(line) > self.max_bytes:
            self._shrink()
        self._writer.write(line)
        self._writer.flush()
        os.fsync(self._writer.fileno())
        self.index[key] = Slot(self.size, len(line), step, step)
        self.size += len(line)

    def retain(self, first_step: int) -> None:
        """Keep only the rows last used at `first_step` or later."""
        self._rewrite([key for key, slot in self.index.items() if slot.step >= first_step])

    def _shrink(self) -> None:
        """Keep the most recently used rows (latest step first, then latest written) that fit in half of `max_bytes`."""
        budget, keep = self.max_bytes // 2, []
        for key, slot in sorted(self.index.items(), key=lambda item: (item[1].step, item[1].offset), reverse=True):
            if slot.length > budget:
                break
            budget -= slot.length
            keep.append(key)
        self._rewrite(keep)

    def _rewrite(self, keys: list[str]) -> None:
        slots = [self.index[key] for key in keys]
        if len(keys) == len(self.index) and self.size == sum(s.length for s in slots) and all(s.step == s.written for s in slots):
            return  # the file already holds exactly these lines, tags included
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        index: dict[str, Slot] = {}
        size = 0
        with open(tmp, "wb") as handle:
            for key, slot in sorted(zip(keys, slots), key=lambda pair: pair[1].offset):  # file order: the old file read once, forwards
                self._reader.seek(slot.offset)
                line = self._reader.read(slot.length)
                if slot.step != slot.written:  # the tag moved on in memory: the line says so now
                    line = (json.dumps({**json.loads(line), "step": slot.step}) + "\n").encode()
                handle.write(line)
                index[key] = Slot(size, len(line), slot.step, slot.step)
                size += len(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.close()
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself is durable
        finally:
            os.close(directory)
        self.index, self.size = index, size
        self._writer, self._reader = open(self.path, "ab"), open(self.path, "rb")

    def close(self) -> None:
        self._writer.close()
        self._reader.close()


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
