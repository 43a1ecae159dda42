"""The pre-flight check's report: rows of what was checked, and the problems with their fixes.

Below both `config.py` (whose preflight hooks fill it) and `check.py` (which runs them), so neither imports the other
for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["CheckReport", "Problem"]


@dataclass
class Problem:
    message: str
    fix: str


@dataclass
class CheckReport:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (what, ok | error | note, detail)
    problems: list[Problem] = field(default_factory=list)

    def ok(self, what: str, detail: str) -> None:
        self.rows.append((what, "ok", detail))

    def note(self, what: str, detail: str) -> None:
        self.rows.append((what, "note", detail))

    def fail(self, what: str, message: str, fix: str) -> None:
        self.rows.append((what, "error", message))
        self.problems.append(Problem(message, fix))

    def lines(self) -> list[str]:
        width = max((len(what) for what, _, _ in self.rows), default=0)
        out = [f"  {what:<{width}}  {status:<5}  {detail}" for what, status, detail in self.rows]
        for problem in self.problems:
            out += [f"error: {problem.message}", f"  fix: {problem.fix}"]
        return out

    def raise_if_failed(self) -> None:
        if self.problems:
            first = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problem(s): run `opdistill check` for the list)" if len(self.problems) > 1 else ""
            raise ConfigError(first.message + more, first.fix)
