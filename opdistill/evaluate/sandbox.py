"""Run untrusted programs (HumanEval completions) for pass@1, never in the evaluating process. Linux only.

Each program runs under a runner, ``python -I -S sandbox_runner.py``, started in a session of its own with an
empty environment. Every run reports the layers it got in ``ExecutionResult.layers`` (names below, in this
order) and each one it lacks, with the reason, in ``ExecutionResult.missing`` ("name: reason"); docs/eval.md
has the table of what each layer stops. Outermost first:

1. A separate runner process between the evaluator and the program. The program signalling its parent or its
   process group reaches at most the runner (with the layers below: nothing at all), and the evaluator then
   records a failed result and goes on. The evaluator kills the runner's whole session as a backstop when it
   overruns the wall clock by ``BACKSTOP_S``. Always there.
2. Namespaces (``unshare``; need root or CAP_SYS_ADMIN): "mount namespace", "network namespace" (only a
   loopback that is down), "pid namespace" (the program sees only its own processes; when its pid-1 init dies
   the kernel kills every process left in it), "ipc namespace"; in the private mount namespace, "disk quota"
   (the working directory is a fresh tmpfs of ``disk_mb``, noexec) and "read-only filesystem" (every other
   mount remounted read-only), with a fresh /proc. Not root (or a container without CAP_SYS_ADMIN): the run
   goes on without them and says so; without a pid namespace the runner kills whatever is left below it
   afterwards (it is their subreaper) and, as root, every process of the run's uid.
3. "landlock ABI n" (kernel 5.13+, works unprivileged): the program may read only its working directory, the
   interpreter's own files (``interpreter_files``: the lib folders of its prefixes, its stdlib, a venv's
   pyvenv.cfg), the system's shared libraries (``SYSTEM_READABLE``) and /dev/null; execute only the
   interpreter and its loader; create, write, link and remove only in the working directory (no links or
   renames into it from outside); from ABI 4 no TCP bind/connect; from ABI 6 no signals to, or abstract
   unix sockets of, processes outside. A kernel without it: "landlock: not in this kernel (release, machine)".
4. "seccomp" (x86_64 and aarch64): socket() and io_uring_setup() fail with EACCES, as does every syscall of
   another ABI. Pathname unix sockets (an ssh agent, a desktop bus) pass namespaces and Landlock; UDP passes
   Landlock; this is what stops them without the audit hook.
5. Resource limits, always: wall clock (the runner kills the namespace at ``timeout_s``), CPU time
   (RLIMIT_CPU), address space (RLIMIT_AS, ``memory_mb``), processes (RLIMIT_NPROC, ``max_processes``), file
   size (RLIMIT_FSIZE, ``file_mb``: each file, the program's stdout and stderr included), no core dumps,
   PR_SET_NO_NEW_PRIVS.
6. "random uid": as root, the program runs under a random unused uid/gid in [2**30, 2**31) with no
   supplementary groups (root ignores RLIMIT_NPROC; a uid of its own makes the process count, the file
   permissions and the kill-by-uid cleanup concern this one run only). Not root: the caller's own uid, so
   only Landlock and the audit hook keep the caller's files (keys included) from the program.
7. A minimal environment, always: only PATH, LANG, HOME (= the working directory) and PYTHONHASHSEED, so none
   of the evaluator's variables (API keys) reach the program; the interpreter runs with ``-s -B`` (no user
   site, no bytecode writes). ``-I`` is not used for the program because it would ignore PYTHONHASHSEED; with
   an environment built from nothing, ``-E`` has nothing left to ignore.
8. "audit hook" in the program's interpreter (defence in depth; ctypes could bypass it, so importing ctypes
   is refused too): no reads or listings outside the working directory and the paths Landlock allows, no
   writes, removals, links, renames or chmods outside the working directory, no os.system, exec, spawn,
   subprocess, os.kill/killpg, socket connect/bind/sendto.

A program passes when it exits with status 0 after running to its end: the runner hands the interpreter a
nonce that is printed only after the program finished without an exception, so an early ``os._exit(0)`` or
``sys.exit(0)`` fails. (A program determined to find the nonce in its own memory could; the layers above
still contain it.)
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .humaneval import HumanEvalProblem, program_for

RUNNER = Path(__file__).with_name("sandbox_runner.py")
BACKSTOP_S = 10.0  # beyond timeout_s, the evaluator's own kill of a runner that failed to enforce it
STATUSES = ("passed", "failed", "timeout", "killed", "error")
FALLBACK_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")
# What every program may read besides its interpreter's own files: shared libraries, the loader's cache, /dev/urandom.
SYSTEM_READABLE = ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", "/dev/urandom")
# Asked of the program's interpreter once: its real file, its prefixes and its standard library's folders.
WHERE = ("import json, os, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps([os.path.realpath("
         "sys.executable), [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix], "
         "[p['stdlib'], p['platstdlib']]]))")
# Runs inside the sandboxed interpreter: reads the nonce, installs the audit hook, runs the program and, only
# when it finished without an exception, prints the nonce (an os._exit(0) or sys.exit(0) does not pass).
BOOT = r'''
import builtins, os, sys
nonce = sys.stdin.readline().strip()
program, guard, readable = sys.argv[1], sys.argv[2] == "1", sys.argv[3].split("\n")
if guard:
    cwd = os.path.realpath(os.getcwd())
    WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    BLOCKED = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.forkpty", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "socket.connect", "socket.bind", "socket.sendto",
               "socket.sendmsg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function"}
    PATHS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
             "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1, "os.mkfifo": 1,
             "os.mknod": 1}
    LISTS = {"os.listdir", "os.scandir", "glob.glob"}
    def under(path, roots):
        if isinstance(path, int) or path is None:
            return True
        full = os.path.realpath(os.fsdecode(path))  # relative to the current directory, wherever that is
        return any(full == root or full.startswith(root.rstrip(os.sep) + os.sep) for root in roots)
    def hook(event, args):
        if event in BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0].partition(".")[0] in ("ctypes", "_ctypes"):
            raise ImportError("sandbox: ctypes is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE)
            if not under(path, (cwd, "/dev/null") if writes else (cwd, "/dev/null", *readable)):
                what = "writing" if writes else "reading"
                raise PermissionError(f"sandbox: {what} {path!r} outside the working directory")
        elif event in LISTS and not under(args[0], (cwd, *readable)):
            raise PermissionError(f"sandbox: {event}({args[0]!r}) outside the working directory")
        elif event in PATHS and not all(under(p, (cwd, "/dev/null")) for p in args[:PATHS[event]]):
            raise PermissionError(f"sandbox: {event}{args[:PATHS[event]]!r} outside the working directory")
    sys.addaudithook(hook)
del guard
with open(program, encoding="utf-8") as f:
    code = compile(f.read(), program, "exec")
exec(code, {"__name__": "__main__", "__builtins__": builtins})
sys.stdout.flush()
os.write(1, ("\n" + nonce + "\n").encode())
'''


@dataclass(frozen=True)
class ExecutionResult:
    """The outcome of one program: status is one of STATUSES; detail is the end of its stderr (~500 chars)."""

    passed: bool
    status: str
    detail: str
    seconds: float = 0.0
    layers: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """What one run may use, and which layers to apply (all on by default; tests switch some off)."""

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 64
    file_mb: int = 16
    disk_mb: int = 64
    hash_seed: int = 0
    audit_hook: bool = True
    landlock: bool = True
    seccomp: bool = True
    namespaces: bool = True
    python: str | None = None


def _world_executable(path: str) -> bool:
    """Whether any uid can run `path`: the file is o+x and every directory above it o+x."""
    real = Path(os.path.realpath(path))
    return all(p.exists() and p.stat().st_mode & stat.S_IXOTH for p in (real, *real.parents))


def sandbox_python(explicit: str | None = None) -> str:
    """The interpreter for the programs: `explicit`, else this one if the sandbox's uid can run it (a venv
    under /root cannot), else the system's python3."""
    if explicit is not None:
        return explicit
    if os.geteuid() != 0 or _world_executable(sys.executable):
        return sys.executable
    for candidate in FALLBACK_PYTHONS:
        if os.path.exists(candidate) and _world_executable(candidate):
            return os.path.realpath(candidate)
    raise RuntimeError(f"{sys.executable} cannot be run by an unprivileged uid (a directory above it is not "
                       "o+x) and no system python3 was found; pass python= with an interpreter every user can run")


def elf_interpreter(path: str) -> str | None:
    """The dynamic loader a 64-bit little-endian ELF executable names (PT_INTERP), None for any other file."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:6] != b"\x7fELF\x02\x01":
            return None
        (table,), (size, count) = struct.unpack_from("<Q", head, 32), struct.unpack_from("<HH", head, 54)
        for index in range(count):
            f.seek(table + index * size)
            kind, _, offset, _, _, length = struct.unpack("<IIQQQQ", f.read(40))
            if kind == 3:  # PT_INTERP
                f.seek(offset)
                return f.read(length).rstrip(b"\0").decode()
    return None


@functools.lru_cache(maxsize=8)
def interpreter_files(python: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(what the kernel executes to start `python`: its real file and its dynamic loader, what it reads to
    start and import its standard library: the lib and lib64 folders of its prefixes (stdlib, lib-dynload,
    site-packages, a shared libpython), its stdlib folders, a venv's pyvenv.cfg, and SYSTEM_READABLE); real
    paths, existing ones only. Asked of `python` once."""
    with open(os.path.realpath(python), "rb") as f:
        if f.read(2) == b"#!":
            raise RuntimeError(f"{python} is a script (a pyenv shim?), which Landlock would not let start its own "
                               "interpreter; pass python= with the interpreter itself (or a symlink to it)")
    try:
        out = subprocess.run([python, "-I", "-c", WHERE], env={}, capture_output=True, text=True, timeout=60)
        real, prefixes, stdlib = json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        raise RuntimeError(f"cannot ask {python} where its files are ({exc!r}); pass python= with an interpreter "
                           "that runs") from exc
    paths = [os.path.join(p, d) for p in prefixes for d in ("lib", "lib64")] + stdlib
    paths += [os.path.join(p, "pyvenv.cfg") for p in prefixes] + list(SYSTEM_READABLE)
    loader = elf_interpreter(real)
    executable = (real,) if loader is None else (real, os.path.realpath(loader))
    found = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    return executable, tuple(p for p in found if not any(p.startswith(q + os.sep) for q in found))  # outermost


def _prepare(base: str, program: str, uid: int | None) -> dict[str, str]:
    """The run's files: base/ (root, o+x only) holds the output files and work/, the program's directory."""
    os.chmod(base, 0o711)
    work = os.path.join(base, "work")
    os.mkdir(work, 0o700)
    paths = {"workdir": work, "program": os.path.join(work, "program.py"),
             "stdout": os.path.join(base, "stdout"), "stderr": os.path.join(base, "stderr")}
    Path(paths["program"]).write_text(program, encoding="utf-8")
    for name in ("stdout", "stderr"):
        Path(paths[name]).touch(0o600)
    if uid is not None:
        os.chown(work, uid, uid)
        os.chown(paths["program"], uid, uid)
    return paths


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def _result(report: dict) -> ExecutionResult:
    detail = "\n".join(part for part in (report.get("note", ""), report.get("stderr", "")[-500:]) if part)
    return ExecutionResult(passed=report["status"] == "passed", status=report["status"], detail=detail[-600:],
                           seconds=report.get("seconds", 0.0), layers=tuple(report.get("layers", ())),
                           missing=tuple(report.get("missing", ())))


def run_program(program: str, limits: Limits = Limits()) -> ExecutionResult:
    """Run one program in a fresh sandbox (see the module docstring) and wait for its result."""
    root = os.geteuid() == 0
    uid = 2**30 + secrets.randbelow(2**30) if root else None
    base = tempfile.mkdtemp(prefix="opdistill_sandbox_")
    try:
        python = sandbox_python(limits.python)
        executable, readable = interpreter_files(python)
        config = {**asdict(limits), **_prepare(base, program, uid), "python": python, "executable": executable,
                  "readable": readable, "uid": uid, "gid": uid, "cpu_s": max(1, int(limits.timeout_s + 0.999)),
                  "nproc": limits.max_processes, "kill_uid": root, "boot": BOOT}
        proc = subprocess.Popen([sys.executable, "-I", "-S", str(RUNNER), json.dumps(config)], cwd=base,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limits.timeout_s + BACKSTOP_S)
        except subprocess.TimeoutExpired:
            _kill_session(proc.pid)
            proc.communicate()
            return ExecutionResult(False, "timeout", f"the runner overran the wall clock by {BACKSTOP_S} s")
        finally:
            _kill_session(proc.pid)  # anything of the runner's session still alive
        lines = out.decode("utf-8", "replace").strip().splitlines()
        try:
            return _result(json.loads(lines[-1]))
        except (IndexError, json.JSONDecodeError, KeyError):
            code = proc.returncode
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return ExecutionResult(False, "killed" if code < 0 else "error",
                                   f"the runner gave no report ({why}): {err.decode('utf-8', 'replace')[-500:]}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run_programs(programs: Sequence[str], *, timeout_s: float = 10.0, memory_mb: int = 1024,
                 max_processes: int = 64, file_mb: int = 16, workers: int = 2,
                 progress: Callable[[int, int], None] | None = None, **layers: object) -> list[ExecutionResult]:
    """Run each program in its own sandbox, `workers` at a time; the results are in the input's order.

    `progress(done, total)` is called after each program (from a worker thread, one call at a time).
    `layers` takes the remaining Limits fields (disk_mb, hash_seed, audit_hook, landlock, seccomp, namespaces,
    python)."""
    if sys.platform != "linux":
        raise RuntimeError(f"the sandbox needs Linux (namespaces, rlimits, Landlock); this is {sys.platform}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    limits = Limits(timeout_s=timeout_s, memory_mb=memory_mb, max_processes=max_processes, file_mb=file_mb,
                    **layers)  # type: ignore[arg-type]
    if limits.disk_mb < 1:
        raise ValueError(f"disk_mb must be at least 1 (a tmpfs of size 0 has no limit), got {limits.disk_mb}")
    done, lock = [0], threading.Lock()

    def one(program: str) -> ExecutionResult:
        result = run_program(program, limits)
        if progress is not None:
            with lock:
                done[0] += 1
                progress(done[0], len(programs))
        return result

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, programs))


def run_humaneval(problems: Sequence[HumanEvalProblem], responses: Sequence[str],
                  **limits: object) -> list[ExecutionResult]:
    """pass@1 results for one response per problem (see humaneval.program_for for how a response is read)."""
    if len(problems) != len(responses):
        raise ValueError(f"{len(problems)} problems but {len(responses)} responses: give one response per problem")
    return run_programs([program_for(p, r) for p, r in zip(problems, responses)], **limits)  # type: ignore[arg-type]
