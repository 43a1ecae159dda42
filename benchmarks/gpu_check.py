"""The GPU check: one command, offline, under 8 minutes on one recent NVIDIA GPU, one JSON file.

Sections, in order (each isolated: a failure is recorded and the next one runs; once --budget-s has passed,
the remaining ones are recorded as "skipped: budget"):

  build_models     SmolLM2-135M- and Qwen2.5-0.5B-shaped models from their configs, random weights, and a local
                   byte-level BPE tokenizer padded to the model's vocabulary (no downloads)
  cuda_checks      the tests in tests/ that need CUDA (a `cuda` marker or a skip without CUDA; if there are none
                   the JSON says so), then a built-in set: a bf16 forward/backward of the SmolLM2 shape,
                   opdistill's hf sampler, every divergence on CUDA against the CPU
  opd/SHAPE        OPD steps at bf16 with the hf engine through opdistill.methods.train (opd_vs_trl.run_opdistill)
  trl/SHAPE        TRL's DistillationTrainer at the same settings (opd_vs_trl.run_trl); "not installed" without trl
  gad/SHAPE        GAD adversarial steps at bf16 with the hf engine
  fsdp/seqkd, fsdp/opd   `accelerate launch` of one process with an FSDP2 config: a few steps of each

Each timed row reports seconds per step (median of the timed steps; one warm-up step first is not timed) and
peak memory (torch.cuda.max_memory_allocated of its own process; max RSS on a CPU). `--dry-run` runs every
section on the CPU at tiny shapes and one timed step, so the whole path is exercised by tests/test_gpu_check.py.

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 420] [--dry-run] [--keep-work DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GRACE_S = 45  # a section that starts inside the budget may overrun it by this much before it is killed
FSDP_METHODS = ("seqkd", "opd")
# A test needs CUDA when it carries a `cuda` marker or skips without CUDA (a decorator or a module-level
# `pytestmark`, at the start of a line: a string that merely mentions them does not count).
CUDA_TEST = re.compile(r"^\s*(@pytest\.mark\.cuda\b|@pytest\.mark\.skipif\([^)]*cuda\.is_available|pytestmark\b.*cuda)", re.MULTILINE)
Result = dict[str, Any]
Section = Callable[[float], dict[str, Result]]  # given its time limit, a section returns a result per section name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON file to write (default gpu_check.json)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="sections that would start later than this are skipped (default 420)")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU at tiny shapes (what the test runs)")
    parser.add_argument("--keep-work", type=Path, help="keep models, section logs and runs in this directory (default: a temporary one)")
    parser.add_argument("--isolation", choices=["auto", "forkserver", "spawn"], default="auto",
                        help="how sections get their own process (auto: a preloaded fork server, spawn if its children cannot use CUDA)")
    return parser.parse_args(argv)


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> Result:
    import torch

    info: Result = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "gpu": None}
    for name in ("transformers", "accelerate", "peft", "tokenizers", "trl"):
        info[name] = package_version(name)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    return info


def find_cuda_tests(tests: Path) -> list[str]:
    # This check's own test runs the check: never from inside it.
    return [str(path.relative_to(REPO)) for path in sorted(tests.glob("test_*.py"))
            if path.name != "test_gpu_check.py" and CUDA_TEST.search(path.read_text(errors="replace"))]


def cuda_marker_registered() -> bool:
    pyproject = REPO / "pyproject.toml"
    return pyproject.is_file() and re.search(r"""["']cuda\s*:""", pyproject.read_text()) is not None


def run_cuda_tests(timeout_s: float) -> Result:
    """pytest over the tests that need CUDA; none so far, which the result says."""
    marker = cuda_marker_registered()
    files = find_cuda_tests(REPO / "tests")
    if not files:
        return {"status": "none", "found": [], "note": "no test in tests/ needs CUDA (no `cuda` marker, no skip without CUDA); "
                                                       "the built-in checks below stand in for them"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-m", "cuda"] if marker else []), *files]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "error", "found": files, "error": f"pytest timed out after {timeout_s:.0f} s"}
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    # pytest exits 5 when the marker selected nothing: not a failure of the code under test
    ok = done.returncode in (0, 5)
    return {"status": "ok" if ok else "error", "found": files, "command": " ".join(command[1:]), "summary": summary,
            **({} if ok else {"error": f"pytest exited {done.returncode}", "output_tail": done.stdout[-2000:]})}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Check:
    """The run: its settings, work directory, budget, the models built so far and the report."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import gpu_check_sections as sections

        self.sections = sections
        self.dry_run = args.dry_run
        self.settings = sections.DRY_SETTINGS if args.dry_run else sections.Settings()
        self.shapes = sections.TINY_SHAPES if args.dry_run else sections.SHAPES
        self.work, self.out, self.budget_s = work, args.out, args.budget_s
        self.started = time.perf_counter()
        self.models: dict[str, str] = {}
        self.report: Result = {"machine": machine_info(), "dry_run": args.dry_run, "budget_s": args.budget_s,
                               "settings": asdict(self.settings), "sections": {}}
        (work / "logs").mkdir(parents=True, exist_ok=True)
        self.report["isolation"] = sections.choose_isolation(args.isolation, self.report["machine"]["cuda_available"],
                                                             work / "logs" / "cuda_probe.log")

    # ------------------------------------------------------------ running sections

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, names: list[str], section: Section) -> None:
        """Run one section (or one launch that fills several), unless the budget is spent; record and save."""
        if self.elapsed() >= self.budget_s:
            results = {name: {"status": "skipped: budget"} for name in names}
        else:
            print(f"gpu_check: {', '.join(names)} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                results = section(self.budget_s - self.elapsed() + GRACE_S)
            except Exception as err:  # noqa: BLE001 - a section's failure is recorded, the check goes on
                results = {name: {"status": "error", "error": f"{type(err).__name__}: {err}"} for name in names}
            for result in results.values():
                result["seconds"] = round(time.perf_counter() - started, 2)
        self.report["sections"].update(results)
        self.save()

    def save(self) -> None:
        """Written after every section, so a run stopped from outside still leaves what it measured."""
        self.report["total_seconds"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.report, indent=2, default=str) + "\n")

    def isolated(self, target: Callable[[dict], Result], name: str, params: dict, timeout_s: float) -> Result:
        log = self.work / "logs" / f"{name.replace('/', '_')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        return self.sections.run_isolated(target, {"work": str(self.work), "settings": asdict(self.settings), **params}, timeout_s, log)

    def model_dir(self, shape_name: str) -> str:
        if shape_name not in self.models:
            raise RuntimeError(f"no {shape_name} model: build_models did not finish")
        return self.models[shape_name]

    # ------------------------------------------------------------ the sections

    def build_models(self, timeout_s: float) -> dict[str, Result]:
        result = self.isolated(self.sections.child_build, "build_models", {"shapes": [asdict(s) for s in self.shapes]}, timeout_s)
        self.models = {name: model["dir"] for name, model in result.get("models", {}).items()}
        return {"build_models": result}

    def cuda_checks(self, timeout_s: float) -> dict[str, Result]:
        started = time.perf_counter()
        tests = run_cuda_tests(timeout_s / 2)
        params = {"model_dir": self.model_dir(self.shapes[0].name), "new_tokens": self.settings.new_tokens}
        result = self.isolated(self.sections.child_cuda_sanity, "cuda_checks", params, timeout_s - (time.perf_counter() - started))
        if tests["status"] == "error":
            result.update(status="error", error=f"CUDA tests failed; {result.get('error', 'built-in checks ok')}")
        return {"cuda_checks": {**result, "cuda_tests": tests}}

    def timed_row(self, kind: str, shape_name: str) -> Section:
        name = f"{kind}/{shape_name}"
        targets = {"opd": self.sections.child_opd, "trl": self.sections.child_trl, "gad": self.sections.child_gad,
                   "vllm": self.sections.child_vllm}

        def section(timeout_s: float) -> dict[str, Result]:
            if kind == "trl" and importlib.util.find_spec("trl") is None:
                return {name: {"status": "not installed", "note": "trl: not installed"}}
            params = {"model_dir": self.model_dir(shape_name)}
            if kind == "gad":
                params["data"] = str(self.records())
            return {name: self.isolated(targets[kind], name, params, timeout_s)}

        return section

    def records(self) -> Path:
        """The generated prompt/response file GAD and SeqKD train on (enough for every step of every row)."""
        path = self.work / "records.jsonl"
        if not path.is_file():
            from opdistill.data import load_records

            self.sections.write_records(path, min(64, len(load_records("builtin:train")) - 1))
        return path

    def fsdp(self, timeout_s: float) -> dict[str, Result]:
        """One `accelerate launch` (one process, FSDP2 config) running a few steps of each FSDP method."""
        names = [f"fsdp/{method}" for method in FSDP_METHODS]
        config = self.sections.fsdp_accelerate_config(self.work / "fsdp_accelerate.yaml", self.settings.precision)
        spec, result_file, log = self.work / "fsdp_spec.json", self.work / "fsdp_result.json", self.work / "logs" / "fsdp.log"
        spec.write_text(json.dumps({"settings": asdict(self.settings), "model_dir": self.model_dir(self.shapes[0].name), "data": str(self.records()),
                                    "work": str(self.work), "result": str(result_file), "methods": list(FSDP_METHODS)}))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", str(free_port()),
                   str(HERE / "gpu_check_sections.py"), "--fsdp-worker", str(spec)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as handle:
            # Its own session, so a timeout kills the launcher and the worker it started together.
            process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                failure = {"status": "error", "error": f"timed out after {timeout_s:.0f} s", "log_tail": self.sections.tail(log)}
                return {name: dict(failure) for name in names}
        launch = {"launcher": "accelerate launch --config_file fsdp_accelerate.yaml (distributed_type FSDP, fsdp_version 2, 1 process)",
                  "exit_code": code}
        if not result_file.is_file():
            failure = {"status": "error", "error": f"accelerate launch exited {code} without a result", "log_tail": self.sections.tail(log), **launch}
            return {name: dict(failure) for name in names}
        results = json.loads(result_file.read_text())
        out: dict[str, Result] = {}
        for method, name in zip(FSDP_METHODS, names):
            result = {**results.get(method, {"status": "error", "error": "the worker recorded nothing"}), **launch}
            if result["status"] != "ok":
                result["log_tail"] = self.sections.tail(log)
            elif not self.report["machine"]["cuda_available"]:
                result["note"] = "CPU: accelerate runs an FSDP config as plain data parallelism (gloo), so no sharding was exercised"
            out[name] = result
        return out

    # ------------------------------------------------------------ the whole check

    def plan(self) -> list[tuple[list[str], Section]]:
        steps: list[tuple[list[str], Section]] = [(["build_models"], self.build_models), (["cuda_checks"], self.cuda_checks)]
        first, *others = self.shapes
        # The small shape's rows, then FSDP, then the larger shape: if the budget runs out, the cheapest complete
        # picture (every kind of check once) is already on disk.
        for shape in [first]:  # vllm: the colocated engine's sync and an OPD step with its rollouts (where vllm is installed)
            steps += [([f"{kind}/{shape.name}"], self.timed_row(kind, shape.name)) for kind in ("opd", "trl", "gad", "vllm")]
        steps.append(([f"fsdp/{method}" for method in FSDP_METHODS], self.fsdp))
        for shape in others:
            steps += [([f"{kind}/{shape.name}"], self.timed_row(kind, shape.name)) for kind in ("opd", "trl", "gad")]
        return steps

    def summary(self) -> Result:
        """OPD's speedup over TRL per shape, where both rows ran."""
        sections, speedups = self.report["sections"], {}
        for shape in self.shapes:
            opd, peer = sections.get(f"opd/{shape.name}", {}), sections.get(f"trl/{shape.name}", {})
            if opd.get("status") == "ok" and peer.get("status") == "ok":
                speedups[shape.name] = round(peer["step_s_median"] / opd["step_s_median"], 2)
        return {"speedup_vs_trl": speedups, "statuses": {name: result["status"] for name, result in sections.items()}}


def print_table(report: Result) -> None:
    machine = report["machine"]
    where = machine["gpu"] or f"CPU ({machine['cpu_count']} cores)"
    print(f"\n{where}; torch {machine['torch']}, transformers {machine['transformers']}, trl {machine['trl']}"
          f"{'; DRY RUN (tiny shapes)' if report['dry_run'] else ''}")
    print(f"\n| section | status | seconds | step s (median) | peak MiB |\n|---|---|---:|---:|---:|")
    for name, result in report["sections"].items():
        median, peak = result.get("step_s_median"), result.get("peak_mem_mb")
        status = result["status"] + (f": {str(result['error'])[:60]}" if "error" in result else "")
        print(f"| {name} | {status} | {result.get('seconds', '')} | {'' if median is None else f'{median:.3f}'} | "
              f"{'' if peak is None else f'{peak:.0f}'} |")
    for shape, speedup in report["summary"]["speedup_vs_trl"].items():
        print(f"\nspeedup_vs_trl ({shape}): {speedup:.2f}")
    print(f"\ntotal {report['total_seconds']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # set before torch is imported: the CPU even on a GPU machine
        # One thread per process: tiny shapes gain nothing from more, and on a busy 2-core machine OpenMP's
        # spinning threads made a tiny OPD step 12x slower (4.4 s instead of 0.35 s).
        os.environ["OMP_NUM_THREADS"] = "1"
    # Offline by construction (nothing is downloaded), progress bars off, and no tokenizers fork warning.
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, str(HERE))
    work = args.keep_work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        check = Check(args, work.resolve())
        for names, section in check.plan():
            check.run(names, section)
        check.report["summary"] = check.summary()
        check.save()
    finally:
        if args.keep_work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(check.report)
    print(f"\nwrote {args.out}")
    failed = [name for name, status in check.report["summary"]["statuses"].items() if status == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
