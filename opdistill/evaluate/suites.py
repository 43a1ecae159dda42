"""Program-checked evaluation suites: IFEval, GSM8K, MATH-500 and HumanEval, one table of them.

A suite knows its data file, the id field that names an item (IFEval `key`, GSM8K `index` = 0-based line of
gsm8k_test.jsonl, MATH-500 `unique_id`, HumanEval `task_id`), the prompt a model is asked, and how to score a batch
of responses. Scoring is objective: Google's IFEval checkers, exact final-answer match, or the problem's unit tests
run in a sandboxed child process (`sandbox.py`; never in this process).

`opdistill score` scores answers produced anywhere (`score_file`); `opdistill eval --suite` generates with each model
and scores the same way (`run.py`). Both write one line per item and a summary with 95% Wilson intervals.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError, OpdistillError
from ..fileio import read_jsonl
from .stats import proportion

DATA_ENV = "OPDISTILL_DATA"  # the folder holding the suites' files when --data-dir is not given


@dataclass
class SuiteItem:
    id: Any  # the suite's id value (see Suite.id_field)
    prompt: str  # the user message a model answers
    reference: Any  # what scoring needs: the gold answer, the problem, the IFEval record


@dataclass(frozen=True)
class Suite:
    name: str
    id_field: str
    file_name: str  # the file's name in the data folder (../shared/data in this repository's checkouts)
    load: Callable[[Path], list[SuiteItem]]
    score: Callable[[list[SuiteItem], list[str]], list[dict[str, Any]]]  # per item: passed and details, no id
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]


def field(row: dict[str, Any], name: str, where: str, kind: type = str) -> Any:
    value = row.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field `{name}` must be a {kind.__name__}")
    return value


def plain_summary(scores: list[dict[str, Any]]) -> dict[str, Any]:
    return proportion(sum(bool(s["passed"]) for s in scores), len(scores))


# ---------------------------------------------------------------- GSM8K and MATH-500


def load_gsm8k(path: Path) -> list[SuiteItem]:
    from .answers import GSM8K_INSTRUCTION, gsm8k_gold

    items = []
    for index, (number, row) in enumerate(read_jsonl(path)):
        where = f"{path}:{number}"
        solution = field(row, "answer", where)
        try:
            gsm8k_gold(solution)
        except ValueError as err:
            raise DataError(f"{where}: {err}") from None
        items.append(SuiteItem(index, f"{field(row, 'question', where)}\n\n{GSM8K_INSTRUCTION}", solution))
    return items


def score_gsm8k(items: list[SuiteItem], responses: list[str]) -> list[dict[str, Any]]:
    from .answers import gsm8k_correct, gsm8k_gold

    scores = []
    for item, response in zip(items, responses):
        passed, found = gsm8k_correct(response, item.reference)
        scores.append({"passed": passed, "answer": found, "expected": format(gsm8k_gold(item.reference).normalize(), "f")})
    return scores


def load_math500(path: Path) -> list[SuiteItem]:
    from .answers import MATH_INSTRUCTION

    items = []
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        items.append(SuiteItem(field(row, "unique_id", where), f"{field(row, 'problem', where)}\n\n{MATH_INSTRUCTION}",
                               field(row, "answer", where)))
    return items


def score_math500(items: list[SuiteItem], responses: list[str]) -> list[dict[str, Any]]:
    from .answers import math_correct

    scores = []
    for item, response in zip(items, responses):
        passed, found = math_correct(response, item.reference)
        scores.append({"passed": passed, "answer": found, "expected": item.reference})
    return scores


# ---------------------------------------------------------------- HumanEval


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the complete function in one ```python code block."


def load_humaneval_items(path: Path) -> list[SuiteItem]:
    from .humaneval import load_humaneval

    return [SuiteItem(p.task_id, f"{HUMANEVAL_INSTRUCTION}\n\n```python\n{p.prompt}```", p) for p in load_humaneval(path)]


def score_humaneval(items: list[SuiteItem], responses: list[str]) -> list[dict[str, Any]]:
    from .humaneval import program_for
    from .sandbox import run_programs

    results = run_programs([program_for(item.reference, response) for item, response in zip(items, responses)])
    return [{"passed": r.passed, "status": r.status} for r in results]


# ---------------------------------------------------------------- IFEval


def load_ifeval_items(path: Path) -> list[SuiteItem]:
    from .ifeval import load_ifeval

    return [SuiteItem(item.key, item.prompt, item) for item in load_ifeval(path)]


def score_ifeval_items(items: list[SuiteItem], responses: list[str]) -> list[dict[str, Any]]:
    from .ifeval import score_ifeval

    scores = []
    for item, response in zip(items, responses):
        result = score_ifeval(item.reference, response)
        scores.append({"passed": result.passed, "passed_loose": result.passed_loose, "instructions": result.instructions})
    return scores


def summarize_ifeval(scores: list[dict[str, Any]]) -> dict[str, Any]:
    """Prompt-level strict accuracy is the headline (`accuracy`); prompt-level loose and instruction-level strict and
    loose beside it. The instruction-level interval treats instructions as independent, which they are not quite
    (several share a prompt): read it as a little too narrow."""
    instructions = [i for s in scores for i in s["instructions"]]
    return {**plain_summary(scores),
            "prompt_strict": plain_summary(scores),
            "prompt_loose": proportion(sum(bool(s["passed_loose"]) for s in scores), len(scores)),
            "instruction_strict": proportion(sum(bool(i["strict"]) for i in instructions), len(instructions)),
            "instruction_loose": proportion(sum(bool(i["loose"]) for i in instructions), len(instructions))}


SUITES: dict[str, Suite] = {
    "ifeval": Suite("ifeval", "key", "ifeval_input_data.jsonl", load_ifeval_items, score_ifeval_items, summarize_ifeval),
    "gsm8k": Suite("gsm8k", "index", "gsm8k_test.jsonl", load_gsm8k, score_gsm8k, plain_summary),
    "math500": Suite("math500", "unique_id", "math500_test.jsonl", load_math500, score_math500, plain_summary),
    "humaneval": Suite("humaneval", "task_id", "HumanEval.jsonl.gz", load_humaneval_items, score_humaneval, plain_summary),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise OpdistillError(f"unknown suite {name!r}", f"use one of {', '.join(SUITES)}")
    return SUITES[name]


def suite_file(suite: Suite, data: str = "", data_dir: str = "") -> Path:
    """The suite's data file: --data FILE, else <--data-dir or $OPDISTILL_DATA>/<its standard name>."""
    if data:
        path = Path(data)
    else:
        folder = data_dir or os.environ.get(DATA_ENV, "")
        if not folder:
            raise OpdistillError(f"suite {suite.name} needs its data file {suite.file_name}",
                                 f"pass --data-dir DIR (the folder that holds it; docs/data.md says where it comes from) "
                                 f"or set ${DATA_ENV}")
        path = Path(folder) / suite.file_name
    if not path.is_file():
        raise DataError(f"suite {suite.name}: {path} does not exist", f"the suite reads {suite.file_name} (docs/data.md says where it comes from)")
    return path


def load_suite(name: str, data: str = "", data_dir: str = "") -> tuple[Suite, list[SuiteItem]]:
    suite = get_suite(name)
    items = suite.load(suite_file(suite, data, data_dir))
    if not items:
        raise DataError(f"suite {name}: no items in its data file")
    return suite, items


# ---------------------------------------------------------------- scoring answers produced elsewhere


def read_responses(path: Path, suite: Suite, items: list[SuiteItem]) -> tuple[list[SuiteItem], list[str]]:
    """The items a responses file answers, in the file's order, and the responses; every id is checked."""
    by_id = {item.id: item for item in items}
    chosen: list[SuiteItem] = []
    texts: list[str] = []
    seen: set[Any] = set()
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        if suite.id_field not in row:
            raise DataError(f"{where}: no `{suite.id_field}` field (suite {suite.name} names its items by {suite.id_field})")
        item_id = row[suite.id_field]
        if isinstance(item_id, bool) or item_id not in by_id:
            raise DataError(f"{where}: {suite.id_field} {item_id!r} is not an item of suite {suite.name}")
        if item_id in seen:
            raise DataError(f"{where}: {suite.id_field} {item_id!r} is answered twice", "keep one response per item")
        seen.add(item_id)
        chosen.append(by_id[item_id])
        texts.append(field(row, "response", where))
    if not chosen:
        raise DataError(f"{path}: no responses")
    return chosen, texts


def score_items(suite: Suite, items: list[SuiteItem], responses: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-item rows ({id_field: id, passed, ...}) and the summary (suite, n, accuracy and its interval, ...)."""
    scores = suite.score(items, responses)
    rows = [{suite.id_field: item.id, **score} for item, score in zip(items, scores)]
    return rows, {"suite": suite.name, **suite.summarize(scores)}


def write_scores(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("scores.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)),
                       ("summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def paired_rows(rows_x: list[dict[str, Any]], rows_y: list[dict[str, Any]], id_field: str) -> dict[str, Any]:
    """McNemar's test of two scorings on the items both contain (X's order)."""
    from .stats import paired_comparison

    passed_y = {row[id_field]: bool(row["passed"]) for row in rows_y}
    common = [row for row in rows_x if row[id_field] in passed_y]
    return paired_comparison([bool(r["passed"]) for r in common], [passed_y[r[id_field]] for r in common])


def paired_against(suite: Suite, rows: list[dict[str, Any]], against: Path) -> dict[str, Any]:
    """The paired test of these scores (X) against another `opdistill score` output (Y) of the same suite."""
    summary_path = against / "summary.json"
    try:
        other = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"--against {against}: {summary_path} cannot be read ({err})", "pass a directory that `opdistill score` wrote") from None
    if other.get("suite") != suite.name:
        raise DataError(f"--against {against}: it scored suite {other.get('suite')!r}, not {suite.name}")
    result = paired_rows(rows, [r for _, r in read_jsonl(against / "scores.jsonl")], suite.id_field)
    if not result["n"]:
        raise DataError(f"--against {against}: no item in common with these responses")
    return {"against": str(against), **result}


def score_file(suite_name: str, responses: str, out: str, data: str = "", data_dir: str = "", against: str = "") -> dict[str, Any]:
    """`opdistill score`: score a responses file, write DIR/scores.jsonl and DIR/summary.json, return the summary.
    With `against` (another score output of the same suite), summary.json also holds the paired test."""
    suite, items = load_suite(suite_name, data, data_dir)
    chosen, texts = read_responses(Path(responses), suite, items)
    rows, summary = score_items(suite, chosen, texts)
    summary["items_in_suite"] = len(items)
    if against:
        summary["paired"] = paired_against(suite, rows, Path(against))
    write_scores(Path(out), rows, summary)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One line a person reads: accuracy with its interval (and IFEval's four numbers)."""
    def show(p: dict[str, Any]) -> str:
        return f"{p['accuracy']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]" if p.get("n") else "n/a"

    text = f"{summary['suite']}: {summary['passed']}/{summary['n']} passed, accuracy {show(summary)}"
    if "instruction_strict" in summary:
        text += (f"; prompt loose {show(summary['prompt_loose'])}, instruction strict {show(summary['instruction_strict'])}, "
                 f"instruction loose {show(summary['instruction_loose'])}")
    if "paired" in summary:
        p = summary["paired"]
        text += (f"\npaired with {p['against']} on {p['n']} items: difference {p['difference']:+.3f} "
                 f"({p['x_only']} only here, {p['y_only']} only there), McNemar p = {p['p_value']:.3g}")
    return text
