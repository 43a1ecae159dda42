"""Collection under faults, end to end through the CLI, against the tests' OpenAI-compatible stub server.

Scenario (the foundation issue's acceptance check): 200 prompts, a server failing 10% of requests
(429 / 500 / malformed / reset), concurrency 8. Run 1 completes; run 2 (a rerun) must send 0 requests;
then a fresh store with the same server: kill -9 the collector mid-run and rerun. Prints a table.

    python benchmarks/collect_faults.py
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from openai_stub_server import start_server  # noqa: E402

PROMPTS, CONCURRENCY = 200, 8


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def main() -> None:
    server, state = start_server(fault_rate=0.1, fault_kinds=["429", "500", "malformed", "reset"], retry_after="0", latency=0.01)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    stats = lambda: httpx.get(url + "/stats").json()  # noqa: E731
    work = Path(tempfile.mkdtemp())
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Prompt {i}: name a colour."}) + "\n" for i in range(PROMPTS)))
    rows = []

    def collect_cmd(out: Path) -> list[str]:
        return [sys.executable, "-m", "opdistill", "collect", "--prompts", str(prompts), "--out", str(out), "--teacher-model",
                "stub", "--teacher-url", url + "/v1", "--concurrency", str(CONCURRENCY), "--retry-base-delay", "0.05", "--no-progress"]

    def unique(out: Path) -> tuple[int, int]:
        keys = [json.loads(line)["meta"]["key"] for line in out.read_text().splitlines()]
        return len(keys), len(set(keys))

    out = work / "a.jsonl"
    before = stats()
    started = time.monotonic()
    run(collect_cmd(out))
    after = stats()
    rows.append(("run 1 (10% faults)", *unique(out), after["requests"] - before["requests"], after["succeeded"] - before["succeeded"], time.monotonic() - started))
    before = after
    started = time.monotonic()
    run(collect_cmd(out))
    after = stats()
    rows.append(("rerun", *unique(out), after["requests"] - before["requests"], after["succeeded"] - before["succeeded"], time.monotonic() - started))

    out = work / "b.jsonl"
    before = stats()
    started = time.monotonic()
    victim = subprocess.Popen(collect_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out.exists() and out.read_bytes().count(b"\n") >= PROMPTS // 3):
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = out.read_bytes().count(b"\n")
    run(collect_cmd(out))
    after = stats()
    rows.append((f"kill -9 at {killed_at} + rerun", *unique(out), after["requests"] - before["requests"], after["succeeded"] - before["succeeded"], time.monotonic() - started))
    server.shutdown()

    print(f"{'scenario':28} {'stored':>6} {'unique':>6} {'requests':>8} {'paid (200 OK)':>13} {'seconds':>8}")
    for name, stored, uniq, requests, paid, seconds in rows:
        print(f"{name:28} {stored:>6} {uniq:>6} {requests:>8} {paid:>13} {seconds:>8.1f}")
    print(f"bound for the kill scenario: paid <= {PROMPTS} + concurrency = {PROMPTS + CONCURRENCY}")


if __name__ == "__main__":
    main()
