"""No two modules of opdistill import each other, directly or through a cycle.

Every import statement counts, those inside functions too: a function-level import only hides a cycle (it
still ties the two modules together, and breaks as soon as someone moves it to the top). Imports under
`if TYPE_CHECKING:` never run; they are checked for cycles too, in a second pass. Run as a script to print the module graph's cycles:
`python tests/test_import_cycles.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "opdistill"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def body_nodes(node: ast.If | ast.FunctionDef | ast.AsyncFunctionDef) -> set[int]:
    """ids of every node in the body of `node` (an if's else branch is not its body)."""
    return {id(child) for statement in node.body for child in ast.walk(statement)}


def import_graph(include_typing: bool = False) -> dict[str, dict[str, str]]:
    """module -> {imported opdistill module: 'top' or 'function'} from every import statement that runs (and, with
    include_typing, the `if TYPE_CHECKING:` ones too)."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, dict[str, str]] = {name: {} for name in files}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only: set[int] = set().union(*(body_nodes(node) for node in ast.walk(tree)
                                              if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)))
        in_function: set[int] = set().union(*(body_nodes(node) for node in ast.walk(tree)
                                              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in typing_only and not include_typing:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = ".".join(filter(None, [base, node.module])) if node.level else node.module or ""
                # `from pkg import name` imports pkg, and pkg.name too when that is a module
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target in files and target != name:
                    graph[name].setdefault(target, "function" if id(node) in in_function else "top")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            component = stack[stack.index(module):]
            del stack[stack.index(module):]
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in order:
            visit(module)
    return found


def describe(graph: dict[str, dict[str, str]], component: list[str]) -> str:
    return "; ".join(f"{a} -> {b} ({graph[a][b]}-level)" for a in component for b in graph[a] if b in component)


@pytest.mark.parametrize("include_typing", [False, True], ids=["runtime", "type-only too"])
def test_no_import_cycles_inside_opdistill(include_typing: bool) -> None:
    """No cycle among the imports that run, nor once the `if TYPE_CHECKING:` ones are counted: a type-only import still
    ties two modules together (config.py named check.py's report type while check.py imported config.py)."""
    graph = import_graph(include_typing=include_typing)
    assert "opdistill.analysis.updates" in graph and graph["opdistill.cli"], "the graph was not built"
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, component) for component in found)


def test_a_function_level_import_cycle_is_found() -> None:
    graph = {"a": {"b": "top"}, "b": {"c": "function"}, "c": {"a": "top"}, "d": {"a": "top"}}
    assert cycles(graph) == [["a", "b", "c"]]


if __name__ == "__main__":
    sys.setrecursionlimit(10_000)
    graph = import_graph()
    for component in cycles(graph):
        print(describe(graph, component))


def test_rooms_know_only_their_own_business():
    """The engine runs any method and names none (its own Method protocol); teachers serve any method and import none;
    type-only imports count too."""
    graph = import_graph(include_typing=True)
    for room in ("opdistill.engine", "opdistill.checkpoints", "opdistill.teachers", "opdistill.rollout", "opdistill.objectives"):
        for module, targets in graph.items():
            if module == room or module.startswith(room + "."):
                upward = sorted(t for t in targets if t == "opdistill.methods" or t.startswith("opdistill.methods."))
                assert not upward, f"{module} imports {upward}"


def test_the_log_prob_helpers_are_the_ground_floor():
    """Training, teachers, evaluation, the server and the samplers share opdistill/logprobs.py; it imports nothing of
    opdistill, so none of them has to reach into another room (rollout/) for them."""
    graph = import_graph(include_typing=True)
    assert "opdistill.logprobs" in graph
    assert not [t for t in graph["opdistill.logprobs"] if t.startswith("opdistill")], graph["opdistill.logprobs"]
    assert "opdistill.rollout.scoring" not in graph
