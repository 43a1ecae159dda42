"""The runner that stands between the evaluator and one untrusted program (see sandbox.py for the layers).

Started by :func:`opdistill.evaluate.sandbox.run_programs` as ``python -I -S sandbox_runner.py CONFIG_JSON`` in a
session of its own, it must import nothing outside the standard library. Processes:

    runner (root, outside the new namespaces; enforces the wall clock, reports JSON on stdout)
      └─ init (pid 1 of the new pid namespace; reaps; its death kills everything in the namespace)
           └─ program (own session, rlimits, no new privileges, Landlock, seccomp, unprivileged uid, minimal
                      env, audit hook)

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
NAMESPACES = (("mount namespace", 0x00020000), ("network namespace", 0x40000000), ("pid namespace", 0x20000000),
              ("ipc namespace", 0x08000000))
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_OPTIONS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
                 "relatime": 1 << 21}  # a bind remount must repeat these or the kernel refuses it
# Landlock filesystem rights (linux/landlock.h): bit 0 EXECUTE, 1 WRITE_FILE, 2 READ_FILE, 3 READ_DIR, 4-12 removing
# and making things, 13 REFER (ABI 2: link or rename into another directory), 14 TRUNCATE (ABI 3), 15 IOCTL_DEV
# (ABI 5). The ruleset handles every right its ABI knows, so whatever no rule grants is denied.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR, MAKE_CHAR, MAKE_BLOCK = 1, 2, 4, 8, 1 << 6, 1 << 11
TRUNCATE, IOCTL_DEV = 1 << 14, 1 << 15
LANDLOCK_FS = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # all a rule on a file (not a directory) may hold
LANDLOCK_ARCHES = ("x86_64", "aarch64")  # where the syscalls are 444-446
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
# seccomp: (audit arch, socket, io_uring_setup) per machine. No socket() at all (a pathname unix socket is reached
# through every namespace and Landlock; UDP through Landlock) and no io_uring (its operations pass no syscall filter).
SECCOMP_SYSCALLS = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}
BPF_LD_ABS, BPF_JEQ, BPF_JGE, BPF_RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
SECCOMP_ALLOW, SECCOMP_EACCES = 0x7FFF0000, 0x00050000 | 13  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES


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
            layers.missing.append(f"{name}: disabled")
        elif LIBC.unshare(flag) == 0:
            layers.active.append(name)
        else:
            layers.missing.append(f"{name}: {_errno()}")


def workdir_mount(config: dict, layers: Layers) -> bool:
    """The working directory as a mount of its own, so that it stays writable when the rest turns read-only: a
    tmpfs of disk_mb (the disk quota; the program file is copied in) or, where the kernel refuses one, a bind
    mount of the directory on itself. False where neither could be made."""
    workdir, uid = config["workdir"], config["uid"]
    with open(config["program"], "rb") as f:
        program = f.read()
    owner = f",uid={uid},gid={config['gid']}" if uid is not None else ""
    options = f"size={int(config['disk_mb'])}m,mode=0700{owner}".encode()
    if LIBC.mount(b"tmpfs", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options) == 0:
        with open(config["program"], "wb") as f:
            f.write(program)
        if uid is not None:
            os.chown(config["program"], uid, config["gid"])
        layers.active.append("disk quota")
        return True
    layers.missing.append(f"disk quota: tmpfs on the working directory: {_errno()}")
    if LIBC.mount(workdir.encode(), workdir.encode(), None, MS_BIND, None) == 0:
        return True
    layers.missing.append(f"read-only filesystem: binding the working directory: {_errno()}")
    return False


def private_mounts(config: dict, layers: Layers) -> None:
    """In the private mount namespace: the working directory on a mount of its own, every other mount read-only."""
    workdir = config["workdir"]
    if LIBC.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        layers.missing += [f"read-only filesystem: making / private: {_errno()}", "disk quota: no private mounts"]
        return
    if not workdir_mount(config, layers):
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
        layers.missing.append("read-only filesystem (partly): remount failed for " + "; ".join(failed))
    if not any(item.startswith("/: ") for item in failed):
        layers.active.append("read-only filesystem")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where it has none (asking changes nothing)."""
    if os.uname().machine not in LANDLOCK_ARCHES:
        return 0
    return max(0, LIBC.syscall(SYS_LANDLOCK_CREATE, None, 0, 1))  # LANDLOCK_CREATE_RULESET_VERSION


def landlock_rules(config: dict, handled: int) -> list[tuple[str, int]]:
    """(path, rights) for each rule: everything but executing and devices in the working directory; reading
    the interpreter's files and executing only the interpreter and its loader (the paths sandbox.py found);
    reading and writing /dev/null."""
    workdir = handled & ~(EXECUTE | MAKE_CHAR | MAKE_BLOCK | IOCTL_DEV)
    rules = [(config["workdir"], workdir), ("/dev/null", READ_FILE | WRITE_FILE)]
    rules += [(path, READ_FILE | READ_DIR) for path in config["readable"]]
    rules += [(path, READ_FILE | EXECUTE) for path in config["executable"]]
    return [(path, rights & handled & (~0 if os.path.isdir(path) else FILE_RIGHTS))
            for path, rights in rules if os.path.exists(path)]


def apply_landlock(config: dict, abi: int) -> None:
    """Restrict the calling process to the rules of `landlock_rules`; from ABI 4 no TCP bind or connect; from
    ABI 6 no signals to, and no abstract unix sockets of, processes outside the sandbox.

    Raises OSError when a step fails, so that the program does not run with less than was reported."""
    fs = LANDLOCK_FS[min(abi, 5)]
    attr = (ctypes.c_uint64 * 3)(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 * (1 if abi < 4 else 2 if abi < 6 else 3)
    ruleset = LIBC.syscall(SYS_LANDLOCK_CREATE, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), f"landlock_create_ruleset: {_errno()}")
    for path, allowed in landlock_rules(config, fs):
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


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def apply_seccomp(machine: str) -> None:
    """A seccomp filter on the calling process: socket() and io_uring_setup() fail with EACCES, and so does every
    syscall of another ABI (32-bit or x32 calls from the 64-bit process). Raises OSError where the kernel refuses."""
    arch, socket_nr, uring_nr = SECCOMP_SYSCALLS[machine]
    program = [(BPF_LD_ABS, 0, 0, 4), (BPF_JEQ, 1, 0, arch), (BPF_RET, 0, 0, SECCOMP_EACCES),  # seccomp_data.arch
               (BPF_LD_ABS, 0, 0, 0), (BPF_JGE, 3, 0, 0x40000000),  # seccomp_data.nr; x32 numbers have bit 30
               (BPF_JEQ, 2, 0, socket_nr), (BPF_JEQ, 1, 0, uring_nr),
               (BPF_RET, 0, 0, SECCOMP_ALLOW), (BPF_RET, 0, 0, SECCOMP_EACCES)]
    filters = (SockFilter * len(program))(*(SockFilter(*step) for step in program))
    fprog = SockFprog(len(program), filters)
    if LIBC.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), f"seccomp: {_errno()}")


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
    """In the program's process: fds, session, limits, no new privileges, Landlock, seccomp, uid, then exec.
    Never returns."""
    try:
        for target, fd in enumerate(fds):  # stdin: the nonce pipe; stdout, stderr: the runner's files
            os.dup2(fd, target)
        os.closerange(3, 65536)  # nothing of the runner's (its report pipe above all) reaches the program
        os.setsid()  # killpg(0) from the program then reaches only its own processes
        set_limits(config)
        if LIBC.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: no setuid gains; lets Landlock and seccomp apply
            raise OSError(ctypes.get_errno(), f"PR_SET_NO_NEW_PRIVS: {_errno()}")
        if config["landlock_abi"]:
            apply_landlock(config, config["landlock_abi"])
        if config["seccomp"]:
            apply_seccomp(os.uname().machine)
        drop_privileges(config["uid"], config["gid"])
        os.chdir(config["workdir"])
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": config["workdir"],
               "PYTHONHASHSEED": str(config["hash_seed"])}
        guard = "1" if config["audit_hook"] else "0"
        readable = "\n".join(config["readable"])  # what the audit hook lets the program read, besides its directory
        argv = [config["python"], "-s", "-B", "-c", config["boot"], config["program"], guard, readable]
        os.execve(config["python"], argv, env)
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped the setup, then leave
        os.write(2, f"sandbox setup failed: {exc!r}\n".encode())
    os._exit(125)


def init_process(config: dict, layers: Layers, nonce: str, outputs: tuple[int, int]) -> None:
    """Pid 1 of the namespace: start the program, reap every orphan, exit with the program's status."""
    LIBC.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: the runner's death takes the namespace down
    if "pid namespace" in layers.active and "mount namespace" in layers.active:
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


def descendants(root: int) -> list[int]:
    """Every process below `root` (zombies included), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                parent = int(f.read().rsplit(b")", 1)[1].split()[1])  # the field after the state
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
        children.setdefault(parent, []).append(int(entry))
    found, frontier = [], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, [])]
        found += frontier
    return found


def kill_strays(deadline_s: float = 5.0) -> bool:
    """Kill every process left below the runner (their subreaper) and reap them: without a pid namespace what
    the program forked would outlive the run, and a runner that is not root cannot kill by uid. Each round kills
    the whole tree it sees, so only what forked since is left for the next. False if some outlived the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        strays = descendants(os.getpid())
        if not strays:
            return True
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.001)
    return False


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


def process_layers(config: dict, layers: Layers) -> None:
    """The layers the program's own process gets (Landlock, seccomp, its uid, the audit hook), into `layers`."""
    config["landlock_abi"] = landlock_abi() if config["landlock"] else 0
    if config["landlock_abi"]:
        layers.active.append(f"landlock ABI {config['landlock_abi']}")
    elif config["landlock"]:
        layers.missing.append(f"landlock: not in this kernel ({os.uname().release}, {os.uname().machine})")
    else:
        layers.missing.append("landlock: disabled")
    if not config["seccomp"]:
        layers.missing.append("seccomp: disabled")
    elif os.uname().machine not in SECCOMP_SYSCALLS:
        layers.missing.append(f"seccomp: no syscall table for {os.uname().machine}")
        config["seccomp"] = False  # from here on: whether the program's process applies it
    else:
        layers.active.append("seccomp")
    if config["uid"] is not None:
        layers.active.append("random uid")
    else:
        layers.missing.append(f"random uid: not root, the program runs as uid {os.getuid()}")
    if config["audit_hook"]:
        layers.active.append("audit hook")
    else:
        layers.missing.append("audit hook: disabled")


def main() -> None:
    config = json.loads(sys.argv[1])
    layers = Layers()
    LIBC.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come to the runner, not the host's init
    # The program's stdout and stderr, opened on the host's mounts before the namespace's copies exist (an
    # open-for-write file on a mount would make its read-only remount fail with EBUSY).
    outputs = (os.open(config["stdout"], os.O_WRONLY | os.O_APPEND),
               os.open(config["stderr"], os.O_WRONLY | os.O_APPEND))
    enter_namespaces(config, layers)
    if "mount namespace" in layers.active:
        private_mounts(config, layers)
    else:
        layers.missing += ["read-only filesystem: no mount namespace", "disk quota: no mount namespace (file_mb "
                           "bounds each file, not their sum)"]
    process_layers(config, layers)
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
    swept = True
    if "pid namespace" not in layers.active:  # with one, the kernel did this when init died
        if config["kill_uid"]:
            kill_uid(config["uid"])
        swept = kill_strays()
    status, note = verdict(code, config, nonce)
    if not swept:
        note += "; some of the program's processes outlived the runner's sweep"
    report = {"status": status, "note": note, "exit": code, "seconds": round(seconds, 3),
              "stderr": tail(config["stderr"]), "layers": layers.active, "missing": layers.missing}
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
