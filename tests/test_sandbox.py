"""The HumanEval executor: the reference solutions pass, wrong ones fail, and hostile programs are contained.

Every hostile program runs under several layer combinations (all layers; the kernel's without the audit hook;
one layer alone), so each layer is shown to hold on its own, and every run's layers are checked exactly
(`expected_layers`): a kernel without Landlock, or an evaluator without namespaces, shows in the assertions.
Reads, sockets and links outside run twice: with this process as root (the program under a random uid) and
as a throwaway unprivileged user whose own private files are the target (`as_user`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from opdistill.errors import DataError
from opdistill.evaluate.humaneval import HumanEvalProblem, load_humaneval, program_for
from opdistill.evaluate.sandbox import ExecutionResult, run_humaneval, run_programs, sandbox_python
from opdistill.evaluate.sandbox_runner import SECCOMP_SYSCALLS, landlock_abi

SHARED = Path(__file__).resolve().parents[2] / "shared"
HUMANEVAL = SHARED / "data" / "HumanEval.jsonl.gz"
PACKAGE = Path(__file__).resolve().parents[1] / "opdistill"


def needs_data(test):  # the shared data is part of every checkout's setting (CI too): missing data fails, never skips
    assert HUMANEVAL.is_file(), f"the shared reference data is missing: {HUMANEVAL}"
    return test


linux = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")
SECRET = "OPDISTILL_TEST_SECRET"
ROOT = os.geteuid() == 0
CONFIGS = {
    "all": {},
    "kernel": {"audit_hook": False},
    "landlock-only": {"audit_hook": False, "namespaces": False, "seccomp": False},
    "namespaces-only": {"audit_hook": False, "landlock": False, "seccomp": False},
    "seccomp-only": {"audit_hook": False, "namespaces": False, "landlock": False},
    "hook-only": {"namespaces": False, "landlock": False, "seccomp": False},
}
# The layer a single-layer configuration is about: where this machine lacks it, the test is skipped (after the
# layers were checked), never passed off as holding.
ALONE = {"landlock-only": "landlock", "namespaces-only": "mount namespace", "seccomp-only": "seccomp",
         "hook-only": "audit hook"}
NAMESPACE_LAYERS = ("mount namespace", "network namespace", "pid namespace", "ipc namespace", "disk quota",
                    "read-only filesystem")
LAYERS = (*NAMESPACE_LAYERS, "landlock", "seccomp", "random uid", "audit hook")
LANDLOCK_ABI = landlock_abi()


def expected_layers(config: str, root: bool = ROOT) -> tuple[str, ...]:
    """The exact layers a run under `config` has on this machine: namespaces (and so the read-only mounts and
    the disk quota) need root; Landlock needs a kernel with it; seccomp a known syscall table."""
    on = {"namespaces": True, "landlock": True, "seccomp": True, "audit_hook": True, **CONFIGS[config]}
    return ((NAMESPACE_LAYERS if on["namespaces"] and root else ())
            + ((f"landlock ABI {LANDLOCK_ABI}",) if on["landlock"] and LANDLOCK_ABI else ())
            + (("seccomp",) if on["seccomp"] and os.uname().machine in SECCOMP_SYSCALLS else ())
            + (("random uid",) if root else ()) + (("audit hook",) if on["audit_hook"] else ()))


def check_layers(result: ExecutionResult, config: str, root: bool = ROOT, stops: tuple[str, ...] = ()) -> None:
    """The run had exactly the expected layers, every other one is in `missing` with its reason, and (where
    `stops` names the layers that stop this attack) at least one of them was there, else the test is skipped."""
    assert result.layers == expected_layers(config, root), result
    named = [layer.split(" ABI ")[0] for layer in result.layers] + [m.split(":")[0] for m in result.missing]
    assert sorted(named) == sorted(LAYERS), result.missing
    for needed in ((ALONE[config],) if config in ALONE else ()), stops:
        if needed and not any(layer.startswith(needed) for layer in result.layers):
            pytest.skip(f"{config}: this machine lacks {' and '.join(needed)} ({'; '.join(result.missing)})")


def sandbox_processes(user: int | None = None) -> list[int]:
    """Live processes under a sandbox uid ([2**30, 2**31)) or `user`, or still children of this test process."""
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
        if 2**30 <= uid < 2**31 or uid == user or ppid == os.getpid():
            found.append(int(entry))
    return found


# Runs the evaluator as an unprivileged user: argv is the package's parent folder, the programs, the options.
AS_USER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from dataclasses import asdict
from opdistill.evaluate.sandbox import run_programs
print(json.dumps([asdict(r) for r in run_programs(json.loads(sys.argv[2]), **json.loads(sys.argv[3]))]))
"""


@dataclass
class Target:
    """What hostile programs go for: a key (`content` inside) and a file whose name is secret, in `folder`,
    owned by `uid` (the user the evaluator runs as) with mode 0600, or by root with mode 0644 (`uid` None: the
    evaluator is root, the program has a random uid, and nothing but the sandbox keeps it from reading)."""

    folder: Path
    uid: int | None
    package: str  # a copy of opdistill that any user can read, for the evaluator running as `uid`
    content: str = field(default_factory=lambda: uuid.uuid4().hex)
    hidden_name: str = field(default_factory=lambda: f"name_{uuid.uuid4().hex}")

    @property
    def key(self) -> Path:
        return self.folder / "id_ed25519"


@pytest.fixture(scope="module")
def user_package() -> Iterator[str]:
    """A copy of the package that any user can read (this checkout may sit under /root)."""
    folder = tempfile.mkdtemp(prefix="opdistill_package_")
    os.chmod(folder, 0o755)
    shutil.copytree(PACKAGE, Path(folder) / "opdistill", ignore=shutil.ignore_patterns("__pycache__"))
    for path in Path(folder).rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture(params=["root", "user"])
def target(request: pytest.FixtureRequest, user_package: str) -> Iterator[Target]:
    if request.param == "root" and not ROOT:
        pytest.skip("this process is not root, so the root path (a random uid for the program) cannot run")
    uid = None if request.param == "root" else (2**29 + secrets.randbelow(2**29) if ROOT else os.getuid())
    found = Target(Path(tempfile.mkdtemp(prefix="opdistill_target_")), uid, user_package)
    found.key.write_text(found.content)
    (found.folder / found.hidden_name).touch()
    for path, mode in ((found.folder, 0o755 if uid is None else 0o700), (found.key, 0o644 if uid is None else 0o600)):
        path.chmod(mode)
        if uid is not None:
            os.chown(path, uid, uid)
    yield found
    shutil.rmtree(found.folder)


def as_user(sources: list[str], target: Target, **options: object) -> list[ExecutionResult]:
    """run_programs as `target.uid`, in a process of its own with an interpreter every user can run (in this
    process where it is not root)."""
    if not ROOT:
        return run_programs(sources, **options)  # type: ignore[arg-type]
    uid = target.uid
    out = subprocess.run([sandbox_python(), "-I", "-S", "-c", AS_USER, target.package, json.dumps(sources),
                          json.dumps(options)], user=uid, group=uid, extra_groups=[], cwd="/", timeout=300,
                         env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.splitlines()[-1])
    return [ExecutionResult(**{**row, "layers": tuple(row["layers"]), "missing": tuple(row["missing"])})
            for row in rows]


def hostile_runs(sources: list[str], config: str, target: Target | None = None, stops: tuple[str, ...] = (),
                 **limits: object) -> list[ExecutionResult]:
    """Run each program under `config` (as root, or as `target.uid`), check that nothing of it outlived the
    run and that each run had exactly the expected layers (`check_layers`), and that none passed."""
    sources = [textwrap.dedent(source) for source in sources]
    uid = None if target is None else target.uid
    # Children this test process had before (servers or helper processes of earlier tests in the same session)
    # are not the sandbox's.
    before = set(sandbox_processes(uid if ROOT else None))
    options = {**CONFIGS[config], **limits}
    if target is not None and uid is not None:
        results = as_user(sources, target, **options)
    else:
        results = run_programs(sources, **options)  # type: ignore[arg-type]
    # The host is unharmed: this process lives (we are here), nothing of the run is left running.
    assert set(sandbox_processes(uid if ROOT else None)) - before == set(), "processes of the sandbox outlived the run"
    for result in results:
        check_layers(result, config, root=uid is None and ROOT, stops=stops)
        assert result.status != "passed", result
    return results


def run_hostile(source: str, config: str, **limits: object) -> ExecutionResult:
    return hostile_runs([source], config, **limits)[0]  # type: ignore[arg-type]


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

configs = pytest.mark.parametrize("config", ["all", "kernel", "landlock-only", "namespaces-only", "hook-only"])


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
        try:
            pids = os.listdir("/proc")  # unreadable under Landlock and the audit hook
        except OSError:
            pids = []
        for pid in pids:
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


# --- reading, linking, executing and connecting outside, as root and as a user who is not root ---------------

# Each exfiltrates what it gets through its stderr (the result's detail): a leak would show there.
READS = {
    "open": "raise SystemExit(open(KEY).read())",
    "os.open": "import os\nraise SystemExit(os.read(os.open(KEY, os.O_RDONLY), 999))",
    "/proc/self/root": "raise SystemExit(open('/proc/self/root' + KEY).read())",
    "listdir": "import os\nraise SystemExit(repr(os.listdir(os.path.dirname(KEY))))",
    "symlink": "import os\nos.symlink(KEY, 'link')\nraise SystemExit(open('link').read())",
    "hard link": "import os\nos.link(KEY, 'hard')\nraise SystemExit(open('hard').read())",
    "subprocess": "import subprocess\nraise SystemExit(subprocess.run(['cat', KEY], capture_output=True).stdout)",
    "os.system": "import os\nos.system('cat ' + KEY + ' >&2')\nraise SystemExit(1)",
    "exec": "import os\nos.dup2(2, 1)\nos.execv('/bin/cat', ['cat', KEY])",
    "python exec": ("import os, sys\n"  # a fresh interpreter has no audit hook, but Landlock stays
                    "os.execv(sys.executable, [sys.executable, '-c', f'raise SystemExit(open({KEY!r}).read())'])"),
    "ctypes": ("import ctypes\nlibc = ctypes.CDLL(None)\nbuf = ctypes.create_string_buffer(999)\n"
               "libc.read(libc.open(KEY.encode(), 0), buf, 999)\nraise SystemExit(buf.value)"),
}
READ_CONFIGS = ["all", "kernel", "landlock-only", "hook-only"]
READ_LAYERS = ("landlock", "audit hook")


def attacks(templates: dict[str, str], target: Target) -> list[str]:
    return [f"KEY = {str(target.key)!r}\n{source}" for source in templates.values()]


@linux
@pytest.mark.parametrize("config", READ_CONFIGS)
def test_reads_outside_fail(target: Target, config: str) -> None:
    results = hostile_runs(attacks(READS, target), config, target, stops=READ_LAYERS)
    for name, result in zip(READS, results):
        assert result.status == "failed", (name, result)
        assert target.content not in result.detail and target.hidden_name not in result.detail, (name, result)


@linux
def test_without_a_read_layer_the_layers_say_so_and_every_read_goes_through(target: Target) -> None:
    """The control for the test above: each of its attacks is a real way out for the program's uid (a hard link
    to a file of root's excepted: the kernel's protected_hardlinks refuses it), so the layers are what stopped
    them there; and a run with neither Landlock nor the audit hook says so."""
    results = hostile_runs(attacks(READS, target), "seccomp-only", target)
    leaked = [name for name, r in zip(READS, results) if target.content in r.detail or target.hidden_name in r.detail]
    assert leaked == [name for name in READS if not (name == "hard link" and target.uid is None)]
    assert {"landlock: disabled", "audit hook: disabled"} <= set(results[0].missing)


@linux
@pytest.mark.parametrize("config", ["kernel", "hook-only"])
def test_forked_strays_die_with_the_run(target: Target, config: str) -> None:
    """A child in a session of its own outlives its parent, a fork bomb its init: the pid namespace, killing the
    random uid, or (for a user who is not root, with neither) the runner's sweep of what it reaped ends them."""
    hostile_runs(["import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nraise SystemExit(1)\n",
                  "import os\nwhile True:\n    try:\n        os.fork() or os.setsid()\n    except OSError:\n        pass\n"],
                 config, target, timeout_s=3, max_processes=32)  # hostile_runs asserts that no process is left


def reached(server: socket.socket) -> bool:
    """Whether anything connected to, or sent to, the non-blocking `server`."""
    try:
        if server.type == socket.SOCK_STREAM:
            server.accept()[0].close()
        else:
            server.recv(99)
        return True
    except BlockingIOError:
        return False


@linux
@pytest.mark.parametrize("config", ["all", "kernel", "seccomp-only", "hook-only", "landlock-only"])
def test_unix_and_udp_sockets_reach_nothing(target: Target, config: str) -> None:
    """A pathname unix socket (an ssh agent's: the user's own) is reached through every namespace and Landlock,
    UDP through Landlock: seccomp refuses socket() itself, the audit hook connect and sendto. landlock-only is
    the control: Landlock stops the abstract socket (ABI 6), the other two get through."""
    path, abstract = target.folder / "agent.sock", f"\0opdistill-{uuid.uuid4().hex}"
    servers = {"unix": socket.socket(socket.AF_UNIX), "abstract": socket.socket(socket.AF_UNIX),
               "udp": socket.socket(socket.AF_INET, socket.SOCK_DGRAM)}
    servers["unix"].bind(str(path))
    os.chmod(path, 0o777 if target.uid is None else 0o600)
    if target.uid is not None:
        os.chown(path, target.uid, target.uid)
    servers["abstract"].bind(abstract)
    servers["udp"].bind(("127.0.0.1", 0))
    for server in servers.values():
        server.setblocking(False)
        if server.type == socket.SOCK_STREAM:
            server.listen(8)
    connect = "s = socket.socket(socket.AF_UNIX)\ns.connect({!r})\ns.sendall(b'leaked')"
    programs = [connect.format(str(path)), connect.format(abstract),
                f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'leaked', {servers['udp'].getsockname()!r})"]
    control = config == "landlock-only"
    results = hostile_runs([f"import socket\n{p}\nraise SystemExit('sent')\n" for p in programs], config, target,
                           stops=() if control else ("seccomp", "audit hook"))
    got_through = {name for name, server in servers.items() if reached(server)}
    for server in servers.values():
        server.close()
    assert got_through == ({"unix", "udp", *(["abstract"] if LANDLOCK_ABI < 6 else [])} if control else set()), results
    if not control:
        assert all(r.status == "failed" and "PermissionError" in r.detail for r in results), results


# --- the disk and the outputs ---------------------------------------------------------------------------------

@linux
@pytest.mark.parametrize("config", ["all", "kernel", "namespaces-only"])
def test_filling_the_disk_stops_at_the_quota(config: str) -> None:
    """Many files each under the file-size limit: only the tmpfs working directory (disk_mb) bounds their sum,
    so without a mount namespace (layers say so) the wall clock is all that bounds it."""
    result = run_hostile("""
        for i in range(64):
            with open(f"part{i}", "wb") as f:
                f.write(b"x" * 2**20)
        """, config, stops=("disk quota",), file_mb=2, disk_mb=8)
    assert result.status == "failed" and "No space left on device" in result.detail, result


@linux
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("flood", [
    "with open('big', 'wb') as f:\n    for _ in range(2048):\n        f.write(b'x' * 2**20)",  # 2 GiB in one file
    "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "import os\nwhile True:\n    os.write(2, b'y' * 65536)",
])
def test_a_huge_file_and_flooded_outputs_stop_at_the_file_size_limit(config: str, flood: str) -> None:
    started = time.monotonic()
    result = run_hostile(flood, config, file_mb=1)
    assert result.status == "failed" and time.monotonic() - started < 10, result  # stopped, not timed out
    assert len(result.detail) <= 600 and ("File too large" in result.detail or "yyyy" in result.detail)
