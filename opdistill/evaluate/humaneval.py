"""HumanEval: loading the problems and turning a model's response into the program that checks it.

The program for a completion is the one the original benchmark runs:
``prompt + completion + "\\n" + test + "\\ncheck(" + entry_point + ")\\n"``. Running it is the job of
:mod:`opdistill.evaluate.sandbox`; nothing here executes model-written code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..fileio import read_jsonl

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# An opening fence (```python, ```py, ```Python3 or a bare ```) up to the end of its line, the code, and the
# closing fence; a missing closing fence (a truncated answer) takes the rest of the response.
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
CODE_LANGS = {"", "python", "python3", "py", "py3"}


@dataclass(frozen=True)
class HumanEvalProblem:
    """One HumanEval task: the prompt (imports, signature, docstring), a reference body and its checker."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


def _problem(record: object, where: str) -> HumanEvalProblem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for field in FIELDS:
        if not isinstance(record.get(field), str):
            got = "missing" if field not in record else type(record[field]).__name__
            raise DataError(f"{where}: field '{field}' must be a string ({got})")
    return HumanEvalProblem(**{field: record[field] for field in FIELDS})


def load_humaneval(path: str | Path) -> list[HumanEvalProblem]:
    """Read HumanEval problems from a .jsonl or .jsonl.gz file; blank lines are skipped.

    A line that is not JSON, or lacks one of the five string fields, raises DataError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", fix="pass the path of HumanEval.jsonl.gz (or a .jsonl copy)")
    problems = [_problem(record, f"{path}:{number}") for number, record in read_jsonl(path)]
    if not problems:
        raise DataError(f"{path}: no problems in the file")
    return problems


def _defines(code: str, entry_point: str) -> bool:
    definition = rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\("
    return re.search(definition, code, re.MULTILINE) is not None


def extract_code(response: str, entry_point: str) -> str:
    """The code in a response: the fenced block that defines `entry_point` (else the first code block), or
    the whole response when it has no fences (a base model's raw continuation)."""
    blocks = [code for lang, code in FENCE.findall(response) if lang.lower() in CODE_LANGS]
    if not blocks:
        return response
    for code in blocks:
        if _defines(code, entry_point):
            return code
    return blocks[0]


def completion_for(problem: HumanEvalProblem, response: str) -> tuple[str, bool]:
    """The code to place after the prompt, and whether it is a whole definition (True) or a body (False)."""
    code = extract_code(response, problem.entry_point)
    return code, _defines(code, problem.entry_point)


def program_for(problem: HumanEvalProblem, response: str) -> str:
    """The program that checks `response` against `problem` (it passes when it exits normally).

    The rule:

    1. The code is taken from the response: if it has Markdown code fences (```python, ```py or bare ```),
       the block that contains ``def <entry_point>(`` or, when none does, the first block; an unclosed
       fence (a truncated answer) runs to the end. Without fences the whole response is the code.
    2. If the code defines ``def <entry_point>(`` (a chat answer repeating the function, often with its
       imports), the program is ``prompt + "\\n" + code``: the prompt still supplies its imports and helper
       functions, and the code's definition replaces the prompt's stub (which has only a docstring, so it is
       valid on its own).
    3. Otherwise the code continues the prompt as the function's body (a base model's completion, or a chat
       answer that gives only the body): ``prompt + code``.

    The benchmark's test and ``check(<entry_point>)`` follow in both cases.
    """
    code, whole = completion_for(problem, response)
    head = problem.prompt + "\n" + code if whole else problem.prompt + code
    return head + "\n" + problem.test + "\ncheck(" + problem.entry_point + ")\n"


def canonical_program(problem: HumanEvalProblem) -> str:
    """The program for the reference solution (the benchmark's sanity check: it must pass)."""
    return program_for(problem, problem.canonical_solution)
