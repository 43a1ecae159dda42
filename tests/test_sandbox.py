"""The HumanEval executor: the reference solutions pass, wrong ones fail, and hostile programs are contained.

Every hostile program runs under several layer combinations (all layers; the kernel's without the audit hook;
Landlock without namespaces; namespaces without Landlock), so each layer is shown to hold on its own."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from opdistill.errors import DataError
from opdistill.evaluate.humaneval import HumanEvalProblem, canonical_program, load_humaneval, program_for
from opdistill.evaluate.sandbox import run_humaneval, run_programs

SHARED = Path(__file__).resolve().parents[2] / "shared"
HUMANEVAL = SHARED / "data" / "HumanEval.jsonl.gz"


def needs_data(test):  # the shared data is part of every checkout's setting (CI too): missing data fails, never skips
    assert HUMANEVAL.is_file(), f"the shared reference data is missing: {HUMANEVAL}"
    return test


linux = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
SECRET = "OPDISTILL_TEST_SECRET"
CONFIGS = {
    "all": {},
    "kernel": {"audit_hook": False},
    "landlock-only": {"audit_hook": False, "namespaces": False},
    "namespaces-only": {"audit_hook": False, "landlock": False},
}
ROOT_ONLY = {"namespaces-only"}  # namespaces need root (CAP_SYS_ADMIN); Landlock does not


def sandbox_processes() -> list[int]:
    """Live processes under a sandbox uid ([2**30, 2**31)) or still children of this test process."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue  # exited while we looked
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid, ppid = int(fields["Uid"].split()[0]), int(fields["PPid"])
        if 2**30 <= uid < 2**31 or ppid == os.getpid():
            found.append(int(entry))
    return found


def run_hostile(source: str, config: str, **limits: object):
    if config in ROOT_ONLY and os.geteuid() != 0:
        pytest.skip("namespaces need root here")
    # Children this test process had before (servers or helper processes of earlier tests in the same session)
    # are not the sandbox's.
    before = set(sandbox_processes())
    result = run_programs([textwrap.dedent(source)], **CONFIGS[config], **limits)[0]  # type: ignore[arg-type]
    # The host is unharmed: this process lives (we are here), nothing of the run is left running.
    assert set(sandbox_processes()) - before == set(), "processes of the sandbox outlived the run"
    assert result.status != "passed", result
    return result


@pytest.fixture(scope="module")
def problems() -> list[HumanEvalProblem]:
    return load_humaneval(HUMANEVAL)


@needs_data
@linux
def test_every_canonical_solution_passes(problems: list[HumanEvalProblem]) -> None:
    started = time.monotonic()
    results = run_humaneval(problems, [p.canonical_solution for p in problems], workers=2)
    elapsed = time.monotonic() - started
    failed = {p.task_id: r.detail for p, r in zip(problems, results) if not r.passed}
    assert len(problems) == 164 and failed == {}
    print(f"164 canonical solutions in {elapsed:.1f} s")  # reported, not asserted: speed lives in benchmarks/


@needs_data
@linux
def test_wrong_solutions_fail_and_results_keep_their_order(problems: list[HumanEvalProblem]) -> None:
    first = problems[0]  # has_close_elements
    responses = ["    return False\n", first.canonical_solution, "    return (\n"]
    seen: list[tuple[int, int]] = []
    results = run_programs([program_for(first, r) for r in responses], progress=lambda d, t: seen.append((d, t)))
    assert [r.status for r in results] == ["failed", "passed", "failed"]
    assert "AssertionError" in results[0].detail and "SyntaxError" in results[2].detail
    assert sorted(seen) == [(1, 3), (2, 3), (3, 3)]


@linux
def test_an_early_clean_exit_does_not_pass() -> None:
    results = run_programs(["import os\nos._exit(0)\nassert False\n", "import sys\nsys.exit(0)\n", "print('ok')\n"])
    assert [r.status for r in results] == ["failed", "failed", "passed"]


# --- program_for -------------------------------------------------------------------------------------------

PROBLEM = HumanEvalProblem(
    task_id="T/0", entry_point="add",
    prompt='from typing import List\n\n\ndef add(xs: List[int]) -> int:\n    """Sum of xs."""\n',
    canonical_solution="    return sum(xs)\n", test="def check(candidate):\n    assert candidate([1, 2]) == 3\n")


def test_program_for_a_raw_continuation_appends_the_body() -> None:
    program = program_for(PROBLEM, "    return sum(xs)\n")
    assert program.startswith(PROBLEM.prompt + "    return sum(xs)\n\n") and program.endswith("\ncheck(add)\n")


def test_program_for_a_chat_answer_takes_the_block_that_defines_the_entry_point() -> None:
    response = ("Here is a helper first:\n```python\ndef helper(x):\n    return x\n```\nAnd the solution:\n"
                "```python\nfrom typing import List\n\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```\n"
                "Example:\n```\n>>> add([1])\n1\n```")
    program = program_for(PROBLEM, response)
    assert program.startswith(PROBLEM.prompt + "\nfrom typing import List\n\ndef add(xs")
    assert "helper" not in program and ">>>" not in program
    exec(compile(program, "<program_for>", "exec"), {})  # our own trusted code: the pieces fit together


def test_program_for_a_fenced_body_and_an_unclosed_fence() -> None:
    fenced_body = "Sure!\n```py\n    return sum(xs)\n```"
    assert program_for(PROBLEM, fenced_body).startswith(PROBLEM.prompt + "    return sum(xs)\n\n")
    truncated = "```python\ndef add(xs):\n    return sum(xs)\n"
    assert program_for(PROBLEM, truncated).startswith(PROBLEM.prompt + "\ndef add(xs):\n    return sum(xs)\n")


def test_program_for_a_function_without_fences_and_other_languages_ignored() -> None:
    bare = "def add(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total\n"
    assert program_for(PROBLEM, bare).startswith(PROBLEM.prompt + "\n" + bare)
    other = "```bash\nrm -rf /\n```\n    return sum(xs)\n"  # no python block: the whole text is the body
    assert program_for(PROBLEM, other).startswith(PROBLEM.prompt + other)


@linux
def test_a_chat_answer_runs_and_passes() -> None:
    response = "```python\nfrom typing import List\n\ndef add(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert [r.status for r in run_humaneval([PROBLEM, PROBLEM], [response, "    return 0\n"])] == ["passed", "failed"]


def test_load_humaneval_names_the_bad_line(tmp_path: Path) -> None:
    good = '{"task_id": "a", "prompt": "p", "canonical_solution": "c", "test": "t", "entry_point": "f"}'
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_humaneval(bad)
    bad.write_text(good + "\n" + good.replace('"test": "t"', '"test": 3') + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'test' must be a string"):
        load_humaneval(bad)


# --- hostile programs ----------------------------------------------------------------------------------------

configs = pytest.mark.parametrize("config", list(CONFIGS))


@linux
@configs
@pytest.mark.parametrize("loop", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_an_endless_program_times_out_within_the_limit(config: str, loop: str) -> None:
    started = time.monotonic()
    result = run_hostile(loop, config, timeout_s=2)
    assert result.status == "timeout" and time.monotonic() - started < 2 + 8  # the limit held (generous margin: a loaded CI machine)


@linux
@configs
def test_a_bounded_fork_count_is_capped_by_the_process_limit(config: str) -> None:
    result = run_hostile("""
        import os, time
        children = 0
        for _ in range(500):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
        """, config, timeout_s=5, max_processes=32)
    assert result.status == "failed" and "BlockingIOError" in result.detail  # the 32nd fork fails


@linux
@configs
def test_a_fork_bomb_is_contained(config: str) -> None:
    started = time.monotonic()
    result = run_hostile("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """, config, timeout_s=3, max_processes=32)
    assert result.status == "timeout" and time.monotonic() - started < 3 + 8


@linux
@configs
@pytest.mark.parametrize("allocate", ["x = bytearray(10**11)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"])
def test_a_huge_allocation_fails_inside(config: str, allocate: str) -> None:
    result = run_hostile(allocate, config, memory_mb=512)
    assert "MemoryError" in result.detail


@linux
@configs
def test_a_write_outside_the_working_directory_fails(config: str) -> None:
    target = Path("/tmp") / f"opdistill_escape_{uuid.uuid4().hex}"
    result = run_hostile(f"""
        open("mine.txt", "w").write("inside is fine")
        with open({str(target)!r}, "w") as f:
            f.write("escaped")
        """, config)
    assert not target.exists(), "the program wrote outside its directory"
    assert "mine.txt" not in result.detail and ("PermissionError" in result.detail or "OSError" in result.detail)


@linux
@configs
def test_a_connection_to_a_local_server_fails(config: str) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_hostile(f"""
            import socket
            with socket.create_connection(("127.0.0.1", {port}), timeout=3) as s:
                s.sendall(b"leaked")
            """, config)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection ever reached the server
    assert "Error" in result.detail


@linux
@configs
def test_the_evaluators_environment_is_invisible(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = uuid.uuid4().hex
    monkeypatch.setenv(SECRET, secret)
    result = run_hostile(f"""
        import os
        found = [k for k, v in os.environ.items() if v == {secret!r}]
        for pid in os.listdir("/proc"):
            try:
                found += [pid] if {secret!r}.encode() in open(f"/proc/{{pid}}/environ", "rb").read() else []
            except OSError:
                pass
        assert found, sorted(os.environ)  # passing would mean the secret leaked
        """, config)
    assert secret not in result.detail and SECRET not in result.detail
    assert set(result.detail.split("[")[-1].strip("]\n ").replace("'", "").split(", ")) <= {
        "HOME", "LANG", "PATH", "PYTHONHASHSEED"}  # the program saw only the minimal environment


@linux
@configs
@pytest.mark.parametrize("attack", [
    "os.kill(os.getppid(), signal.SIGKILL)",
    "os.kill(os.getppid(), signal.SIGTERM)",
    "os.killpg(os.getpgid(0), signal.SIGKILL)",
    "os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
    "os.kill(-1, signal.SIGKILL)",
])
def test_signals_reach_at_most_the_sandbox(config: str, attack: str) -> None:
    run_hostile(f"import os, signal, time\n{attack}\ntime.sleep(0.5)\nraise SystemExit('no effect')\n", config)
    assert run_programs(["print('still working')"])[0].passed  # the evaluator goes on
