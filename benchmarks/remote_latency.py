"""A served teacher far away: how long an OPD step waits on it, scoring a step's rows at once vs per micro-batch.

`opdistill serve` runs a tiny teacher (tests/conftest.py's 2-layer Llama, another seed than the student) in a
process of its own on 127.0.0.1; in front of it a thin proxy adds --latency seconds to every request, as a teacher in
another region or behind a busy provider would. OPD then trains the tiny student for --steps steps of --rows rows,
micro_batch_size 1 and teacher_concurrency --rows, twice:

- `per micro-batch`: the old design, kept here only for the comparison: each micro-batch asks the teacher for its
  own row inside the loss loop, so a step waits for --rows round trips one after another.
- `whole step`: opdistill's design: every row of the step is asked for before the loss loop, all in flight at once.

The teacher's wait is RemoteTeacher.wait_seconds (time inside its requests) over the run; one round trip is the
median of 5 single-row requests through the same proxy. Prints one table (markdown).

    python benchmarks/remote_latency.py [--latency 0.5] [--rows 8] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tiny model builder the tests use

from conftest import build_tiny_model  # noqa: E402

from opdistill.config import load_config  # noqa: E402
from opdistill.methods import train  # noqa: E402
from opdistill.teachers import logprob  # noqa: E402
from opdistill.teachers.logprob import StepScores, TeacherRow  # noqa: E402
from opdistill.teachers.remote import RemoteTeacher  # noqa: E402


class Delay(ThreadingHTTPServer):
    """Forwards every request to `target` after sleeping `latency` seconds (a thread per request, so they overlap)."""

    daemon_threads = True

    def __init__(self, target: str, latency: float) -> None:
        self.target, self.latency = target, latency
        super().__init__(("127.0.0.1", 0), DelayHandler)


class DelayHandler(BaseHTTPRequestHandler):
    server: Delay
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.forward(None)

    def do_POST(self) -> None:
        self.forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

    def forward(self, body: bytes | None) -> None:
        time.sleep(self.server.latency)
        request = urllib.request.Request(self.server.target + self.path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class PerMicroBatch(StepScores):
    """The old design: no teacher is asked before the loss loop; each micro-batch asks for its own rows."""

    def __init__(self, teachers: Any, rows: list[TeacherRow], names: list[str], top_k: int = 0, temperature: float = 1.0,
                 step: int = -1) -> None:
        self.teachers, self.rows, self.names, self.top_k, self.temperature = teachers, rows, names, top_k, temperature
        self.eager = {}


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    """`opdistill serve MODEL --port 0` in its own process; returns it and its root URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "opdistill", "serve", str(model), "--port", "0", "--precision", "fp32",
                                "--model-name", "tiny"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    for line in process.stdout:  # type: ignore[union-attr]
        if "listening on " in line:
            return process, line.split("listening on ")[1].strip().removesuffix("/v1")
    raise SystemExit(f"opdistill serve exited ({process.wait()}) before listening")


def round_trip(url: str, model: Path) -> float:
    """Median seconds of one single-row prompt log-prob request through the proxy (a new row each time, so no cache)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = RemoteTeacher(url, "tiny", k=5, vocab=10**6, cache_path=Path(tmp) / "cache.jsonl")
        for i in range(5):
            started = time.perf_counter()
            teacher.score([TeacherRow([1, 2 + i], [5, 6, 7, 8])])
            times.append(time.perf_counter() - started)
        teacher.close()
    return statistics.median(times)


def run(mode: str, url: str, student: Path, data: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(mean step seconds, mean teacher wait per step) of one OPD run in `mode`."""
    made: list[RemoteTeacher] = []
    init = RemoteTeacher.__init__

    def recording_init(self: RemoteTeacher, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    original = logprob.StepScores
    RemoteTeacher.__init__ = recording_init  # type: ignore[method-assign]
    if mode == "per micro-batch":
        logprob.StepScores = PerMicroBatch  # type: ignore[misc]  # TeacherSet.for_step builds this name
    try:
        train(load_config(None, ["method=opd", f"student={student}", f"data={data}", f"out_dir={out}", f"max_steps={args.steps}",
                                 f"batch_size={args.rows}", "micro_batch_size=1", f"teacher_concurrency={args.rows}",
                                 f"teacher_url={url}/v1", "teacher_model=tiny", "top_k=5", "max_response_tokens=16", "precision=fp32",
                                 "checkpoint_every=0", "seed=3"]))
    finally:
        RemoteTeacher.__init__ = init  # type: ignore[method-assign]
        logprob.StepScores = original  # type: ignore[misc]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_seconds"' in line]
    # The pre-flight check's probe goes through a client of its own (check.check_remote), so the waits are the steps'.
    return statistics.mean(s["step_seconds"] for s in steps), sum(t.wait_seconds for t in made) / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds the proxy adds to every request")
    parser.add_argument("--rows", type=int, default=8, help="rows per step (batch_size); micro_batch_size is 1")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student, teacher = build_tiny_model(root / "student"), build_tiny_model(root / "teacher", seed=7)
        data = root / "data.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea."}) + "\n" for i in range(args.rows * args.steps)))
        server, target = start_server(teacher)
        proxy = Delay(target, args.latency)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        try:
            trip = round_trip(url + "/v1", teacher)
            results = {mode: run(mode, url, student, data, root / mode.replace(" ", "-"), args) for mode in ("per micro-batch", "whole step")}
        finally:
            proxy.shutdown()
            server.terminate()
            server.wait()
    print(f"\n{args.rows} rows a step, micro_batch_size 1, teacher_concurrency {args.rows}, {args.latency:g} s added per request; "
          f"one round trip {trip:.3f} s (median of 5); {args.steps} steps each\n")
    print("| teacher asked | step (s) | waiting on the teacher (s) | teacher's share of the step | wait / one round trip |")
    print("|---|---|---|---|---|")
    for mode, (step, wait) in results.items():
        print(f"| {mode} | {step:.2f} | {wait:.2f} | {wait / step:.0%} | {wait / trip:.1f} |")
    print(f"| (old design's arithmetic: {args.rows} x one round trip) | | {args.rows * trip:.2f} | | {args.rows:.1f} |")


if __name__ == "__main__":
    main()
