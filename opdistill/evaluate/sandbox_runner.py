"""The runner that stands between the evaluator and one untrusted program (see sandbox.py for the layers).

Started by :func:`opdistill.evaluate.sandbox.run_programs` as ``python -I -S sandbox_runner.py CONFIG_JSON`` in a
session of its own, it must import nothing outside the standard library. Processes:

    runner (root, outside the new namespaces; enforces the wall clock, reports JSON on stdout)
      └─ init (pid 1 of the new pid namespace; reaps; its death kills everything in the namespace)
           └─ program (own session, rlimits, Landlock, unprivileged uid, minimal env, audit hook)

The program never holds the runner's stdout, so it cannot forge the report.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field

LIBC = ctypes.CDLL(None, use_errno=True)
NAMESPACES = (("mount", 0x00020000), ("network", 0x40000000), ("pid", 0x20000000), ("ipc", 0x08000000))
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
                 "relatime": 1 << 21}  # a bind remount must repeat these or the kernel refuses it
# Landlock: every filesystem right that creates, changes or removes something (ABI 1-3), TCP bind/connect
# (ABI 4) and, from ABI 6, signals and abstract unix sockets outside the sandbox's own processes.
LANDLOCK_FS_WRITE = {1: 0b1_1111_1111_0010, 2: 0b11_1111_1111_0010, 3: 0b111_1111_1111_0010}
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446


@dataclass
class Layers:
    """Which isolation layers this run has, and why any is missing (reported to the evaluator)."""

    active: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _errno() -> str:
    return os.strerror(ctypes.get_errno())


def enter_namespaces(config: dict, layers: Layers) -> None:
    """New mount, network, pid and IPC namespaces for the runner's children, each where the kernel allows."""
    for name, flag in NAMESPACES:
        if not config["namespaces"]:
            layers.missing.append(f"{name} namespace: disabled")
        elif LIBC.unshare(flag) == 0:
            layers.active.append(name)
        else:
            layers.missing.append(f"{name} namespace: {_errno()}")


def readonly_mounts(workdir: str, layers: Layers) -> None:
    """In the private mount namespace: every mount read-only, except a bind mount of the working directory."""
    if LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        layers.missing.append(f"read-only filesystem: making / private: {_errno()}")
        return
    if LIBC.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None) != 0:
        layers.missing.append(f"read-only filesystem: binding the working directory: {_errno()}")
        return
    failed = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == workdir:
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY
            flags |= sum(MOUNT_OPTIONS.get(option, 0) for option in fields[5].split(","))
            if LIBC.mount(None, point.encode(), None, flags, None) != 0:
                failed.append(f"{point}: {_errno()}")
    if failed:
        layers.missing.append("read-only remount failed for " + "; ".join(failed))
    if not any(item.startswith("/: ") for item in failed):
        layers.active.append("read-only filesystem")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (asking changes nothing)."""
    return max(0, LIBC.syscall(SYS_LANDLOCK_CREATE, None, 0, 1))  # LANDLOCK_CREATE_RULESET_VERSION


def apply_landlock(workdir: str, abi: int) -> None:
    """Restrict the calling process: writes only under `workdir` (and /dev/null); no TCP; no outside signals.

    Raises OSError when a step fails, so that the program does not run with less than was reported."""
    if LIBC.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: needed to self-restrict without CAP_SYS_ADMIN
        raise OSError(ctypes.get_errno(), f"PR_SET_NO_NEW_PRIVS: {_errno()}")
    fs = LANDLOCK_FS_WRITE[min(abi, 3)]
    attr = (ctypes.c_uint64 * 3)(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 * (1 if abi < 4 else 2 if abi < 6 else 3)
    ruleset = LIBC.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {_errno()}")
    for path, allowed in ((workdir, fs), ("/dev/null", 0b10)):  # /dev/null: WRITE_FILE only
        rule = (ctypes.c_uint8 * 12)()  # struct landlock_path_beneath_attr is packed: u64 access, s32 fd
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        ctypes.memmove(rule, ctypes.byref(ctypes.c_uint64(allowed)), 8)
        ctypes.memmove(ctypes.addressof(rule) + 8, ctypes.byref(ctypes.c_int32(fd)), 4)
        if LIBC.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule), 0) != 0:
            raise OSError(ctypes.get_errno(), f"landlock rule for {path}: {_errno()}")
        os.close(fd)
    if LIBC.syscall(SYS_LANDLOCK_RESTRICT, ruleset, 0) != 0:
        raise OSError(ctypes.get_errno(), f"landlock_restrict_self: {_errno()}")
    os.close(ruleset)


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become the sandbox's unprivileged uid/gid (root ignores RLIMIT_NPROC and file permissions)."""
    if uid is None or gid is None:
        return
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)

def set_limits(config: dict) -> None:
    import resource

    cpu = int(config["cpu_s"])
    memory = int(config["memory_mb"]) * 2**20
    size = int(config["file_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NPROC, (config["nproc"], config["nproc"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def exec_program(config: dict, fds: tuple[int, int, int]) -> None:
    """In the program's process: fds, session, limits, Landlock, uid, then exec. Never returns."""
    try:
        for target, fd in enumerate(fds):  # stdin: the nonce pipe; stdout, stderr: the runner's files
            os.dup2(fd, target)
        os.closerange(3, 65536)  # nothing of the runner's (its report pipe above all) reaches the program
        os.setsid()  # killpg(0) from the program then reaches only its own processes
        set_limits(config)
        if config["landlock_abi"]:
            apply_landlock(config["workdir"], config["landlock_abi"])
        drop_privileges(config["uid"], config["gid"])
        os.chdir(config["workdir"])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": config["workdir"],
               "PYTHONHASHSEED": str(config["hash_seed"])}
        guard = "1" if config["audit_hook"] else "0"
        argv = [config["python"], "-s", "-B", "-c", config["boot"], config["program"], guard]
        os.execve(config["python"], argv, env)
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped the setup, then leave
        os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
    os._exit(125)


def init_process(config: dict, layers: Layers, nonce: str, outputs: tuple[int, int]) -> None:
    """Pid 1 of the namespace: start the program, reap every orphan, exit with the program's status."""
    LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: the runner's death takes the namespace down
    if "pid" in layers.active and "mount" in layers.active:
        # A fresh /proc shows only the sandbox's processes (the host's stay out of sight).
        if LIBC.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
            os.write(outputs[1], f"sandbox: the host's /proc stays visible (new one: {_errno()})\n".encode())
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(write_end)
        exec_program(config, (read_end, *outputs))
    os.close(read_end)
    try:
        os.write(write_end, (nonce + "\n").encode())
    except OSError:
        pass  # the program died before reading it; its status says why
    os.close(write_end)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(125)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            os._exit(code if code >= 0 else 128 - code)


def kill_uid(uid: int) -> None:
    """Kill every process left with the sandbox's dedicated uid (a fork bomb's strays without a pid namespace)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)  # as that uid: reaches only processes of that uid, never the caller
        except OSError:
            pass
        os._exit(0)
    while True:  # the runner is their subreaper: reap the killed strays so no zombie outlives the run
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def wait_until(pid: int, deadline: float) -> int | None:
    """The exit code of `pid` (128 + signal when signalled), or None once the deadline passes."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return code if code >= 0 else 128 - code
        time.sleep(0.005)
    return None


def tail(path: str, size: int = 4000) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - size))
        return f.read().decode("utf-8", "replace")


def verdict(code: int | None, config: dict, nonce: str) -> tuple[str, str]:
    """(status, note) from the program's exit code."""
    if code is None:
        return "timeout", f"wall-clock limit of {config['timeout_s']} s"
    if code == 128 + signal.SIGXCPU:
        return "timeout", f"CPU-time limit of {config['cpu_s']} s"
    if code > 128:
        return "killed", f"killed by {signal.Signals(code - 128).name}"
    if code == 0:
        if tail(config["stdout"], 200).rstrip("\n").endswith(nonce):
            return "passed", ""
        return "failed", "exited with status 0 before the checks finished"
    return "failed", f"exit status {code}"


def main() -> None:
    config = json.loads(sys.argv[1])
    layers = Layers()
    LIBC.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to the runner, not the host's init
    # The program's stdout and stderr, opened on the host's mounts before the namespace's copies exist (an
    # open-for-write file on a mount would make its read-only remount fail with EBUSY).
    outputs = (os.open(config["stdout"], os.O_WRONLY | os.O_APPEND),
               os.open(config["stderr"], os.O_WRONLY | os.O_APPEND))
    enter_namespaces(config, layers)
    config["landlock_abi"] = landlock_abi() if config["landlock"] else 0
    if config["landlock_abi"]:
        layers.active.append(f"landlock ABI {config['landlock_abi']}")
    else:
        layers.missing.append("landlock: " + ("not in this kernel" if config["landlock"] else "disabled"))
    if "mount" in layers.active:
        readonly_mounts(config["workdir"], layers)
    nonce = secrets.token_hex(16)
    started = time.monotonic()
    init = os.fork()
    if init == 0:
        init_process(config, layers, nonce, outputs)
    code = wait_until(init, started + float(config["timeout_s"]))
    if code is None:
        os.kill(init, signal.SIGKILL)  # pid 1 of the namespace: its death kills every process inside
        os.waitpid(init, 0)
    seconds = time.monotonic() - started
    if config["kill_uid"] and "pid" not in layers.active:  # with one, the kernel did this when init died
        kill_uid(config["uid"])
    status, note = verdict(code, config, nonce)
    report = {"status": status, "note": note, "exit": code, "seconds": round(seconds, 3),
              "stderr": tail(config["stderr"]), "layers": layers.active, "missing": layers.missing}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
