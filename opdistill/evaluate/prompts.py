"""Prompt sets for evaluation: the built-in held-out set, any record file, and two public benchmark formats.

An EvalSet is a list of prompts (Records) plus, for each prompt, the reference answers it carries, by name.
Formats, detected from the first row:
- records (opdistill's own format, e.g. a `collect` store or the Self-Instruct predictions): a record's
  `response` is the reference "teacher"; string fields `target` (Self-Instruct's human answer) and
  `reference` become references of those names.
- MT-Bench questions (`question_id`, `turns`): the first turn is the prompt; a `reference` list gives the
  reference "reference" (its first turn).
- Vicuna questions (`question_id`, `text`, `category`; the GAD paper's out-of-distribution set): the text is the prompt.
- Answer files join a question set by question_id through `--references`, each as a reference named after its
  model_id (e.g. "gpt-4", "gpt-3.5-turbo"): MT-Bench's (`choices[0].turns`) and Vicuna's (`answer_id`, `text`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import Record, load_records, split_slice
from ..errors import DataError
from ..fileio import read_jsonl

NAME = re.compile(r"[\w.-]+")  # a prompt set's label in `NAME=SPEC`
RECORD_REFERENCES = {"target": "target", "reference": "reference"}  # record field -> reference name


@dataclass
class EvalSet:
    name: str
    records: list[Record]
    references: list[dict[str, str]] = field(default_factory=list)  # per prompt: reference name -> text
    suite: str = ""  # a program-checked suite's name (suites.py): its answers are scored objectively
    items: list[Any] = field(default_factory=list)  # the suite's items, one per record

    @property
    def reference_names(self) -> list[str]:
        names: dict[str, None] = {}
        for refs in self.references:
            names.update(dict.fromkeys(refs))
        return list(names)


def first_json_row(path: Path) -> Any:
    with open(path, "rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    return json.loads(raw.decode("utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return None  # the record loader reports the bad line with its number
    return None


def detect_format(path: Path) -> str:
    """records or mtbench, from the first row of a JSONL file (directories and Parquet are records)."""
    if path.suffix != ".jsonl" or not path.is_file():
        return "records"
    row = first_json_row(path)
    if isinstance(row, dict) and "question_id" in row and "turns" in row:
        return "mtbench"
    if isinstance(row, dict) and "question_id" in row and "text" in row and "answer_id" not in row:
        return "vicuna"
    return "records"


def load_mtbench(path: Path, rows: slice) -> EvalSet:
    """MT-Bench questions, first turn only (single-turn evaluation)."""
    records, references = [], []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str) or not turns[0].strip():
            raise DataError(f"{where}: field `turns` must be a non-empty list of strings")
        meta = {"question_id": row.get("question_id"), "category": row.get("category")}
        records.append(Record(messages=[{"role": "user", "content": turns[0]}], meta=meta, source=where))
        reference = row.get("reference")
        references.append({"reference": reference[0]} if isinstance(reference, list) and reference and isinstance(reference[0], str) else {})
    return EvalSet(path.stem, records[rows], references[rows])


def load_vicuna(path: Path, rows: slice) -> EvalSet:
    """Vicuna's questions (`question_id`, `text`, `category`), the GAD paper's out-of-distribution set."""
    records = []
    for number, row in read_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: field `text` must be a non-empty string (the question)")
        meta = {"question_id": row.get("question_id"), "category": row.get("category")}
        records.append(Record(messages=[{"role": "user", "content": text}], meta=meta, source=f"{path}:{number}"))
    return EvalSet(path.stem, records[rows], [{} for _ in records][rows])


def answer_of(row: dict[str, Any]) -> str | None:
    """An answer file row's first-turn answer: MT-Bench's choices[0].turns[0], or Vicuna's `text`."""
    try:
        return row["choices"][0]["turns"][0]
    except (KeyError, IndexError, TypeError):
        return row.get("text") if "answer_id" in row else None


def join_answer_file(eval_set: EvalSet, path: Path) -> int:
    """Add the answers of an MT-Bench answer file as references named after its model_id, matched on
    question_id; returns how many prompts got one."""
    if not path.is_file():
        raise DataError(f"reference file {path} does not exist")
    by_question: dict[Any, tuple[str, str]] = {}
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        answer = answer_of(row)
        if answer is None:
            raise DataError(f"{where}: expected an MT-Bench answer row with choices[0].turns[0], or a Vicuna answer row with `text`")
        if not isinstance(answer, str) or "question_id" not in row:
            raise DataError(f"{where}: the answer must be a string and the row needs question_id")
        by_question[row["question_id"]] = (str(row.get("model_id") or path.stem), answer)
    matched = 0
    for record, refs in zip(eval_set.records, eval_set.references):
        hit = by_question.get(record.meta.get("question_id"))
        if hit:
            refs[hit[0]] = hit[1]
            matched += 1
    return matched


def record_references(record: Record) -> dict[str, str]:
    refs = {"teacher": record.response} if record.response else {}
    for field_name, name in RECORD_REFERENCES.items():
        value = record.meta.get(field_name)
        if isinstance(value, str) and value.strip():
            refs[name] = value
    return refs


def load_eval_set(spec: str) -> EvalSet:
    """`[NAME=]SPEC` where SPEC is builtin:heldout, a file, or either with a [a:b] row slice."""
    head, sep, tail = spec.partition("=")
    name, body = (head, tail) if sep and NAME.fullmatch(head) and not Path(spec).exists() else ("", spec)
    path_text, rows = split_slice(body)
    path = Path(path_text)
    file_format = "records" if path_text.startswith("builtin:") else detect_format(path)
    if file_format == "mtbench":
        eval_set = load_mtbench(path, rows)
    elif file_format == "vicuna":
        eval_set = load_vicuna(path, rows)
    else:
        records = load_records(body)
        default_name = path_text.split(":", 1)[1] if path_text.startswith("builtin:") else path.stem
        eval_set = EvalSet(default_name, records, [record_references(r) for r in records])
    eval_set.name = name or eval_set.name
    if not eval_set.records:
        raise DataError(f"{spec}: no prompts", "pass a file with at least one prompt, or a non-empty [a:b] slice")
    return eval_set


def load_suite_set(spec: str, data_dir: str) -> EvalSet:
    """`NAME[a:b]`: a program-checked suite's prompts (all its items, or the [a:b] slice) as a prompt set."""
    from .suites import load_suite

    name, rows = split_slice(spec)
    suite, items = load_suite(name, data_dir=data_dir)
    items = items[rows]
    if not items:
        raise DataError(f"--suite {spec}: the slice selects no item")
    records = [Record(messages=[{"role": "user", "content": item.prompt}], meta={suite.id_field: item.id}, source=f"{name}:{item.id}")
               for item in items]
    return EvalSet(name, records, [{} for _ in items], suite=name, items=items)
