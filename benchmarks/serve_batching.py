"""`opdistill serve` with concurrent requests batched vs answered one row at a time (--max-batch-rows 1).

Two servers of the same model run side by side, each in its own process on 127.0.0.1: one with the default batching
flags, one with `--max-batch-rows 1` (the server before batching). N clients, each on a thread of its own, send one
request at the same moment (a barrier), and the wave's wall time is from that moment to the last reply. Waves alternate
between the servers (`--waves` each, the median kept), so a machine shared with other jobs slows both alike.

Workloads:
- `score`: what a remote teacher sends for a row: about --tokens token ids, max_tokens 1, prompt_logprobs 20,
  temperature 0 (docs/teachers.md). Each client's row is another slice of text, so lengths differ a little.
- `generate`: a greedy chat completion of --new-tokens tokens (the decode loop is where one weight read serving
  several rows pays most).

Every batched answer is checked against the one-at-a-time server's: the largest log-prob difference is printed, and
the top-k token ids and the generated texts must be equal.

    python benchmarks/serve_batching.py [--model smollm2-135m-instruct] [--clients 1,8] [--waves 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from opdistill.data import builtin_prompts_path  # noqa: E402
from opdistill.models import load_tokenizer  # noqa: E402


def start(model: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """`opdistill serve MODEL --port 0 FLAGS` in its own process; returns it and its /v1 URL once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "opdistill", "serve", model, "--port", "0", "--model-name", "m", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    for line in process.stdout:  # type: ignore[union-attr]
        if "listening on " in line:
            return process, line.split("listening on ")[1].strip()
    raise SystemExit(f"opdistill serve exited ({process.wait()}) before listening")


def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{url}/{path}", data=json.dumps({"model": "m", **body}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def wave(url: str, requests: list[tuple[str, dict[str, Any]]]) -> tuple[float, list[dict[str, Any]]]:
    """Seconds from the moment all clients are ready to the last reply, and the replies."""
    ready = threading.Barrier(len(requests) + 1)

    def one(request: tuple[str, dict[str, Any]]) -> dict[str, Any]:
        ready.wait()
        return post(url, *request)

    with ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(one, request) for request in requests]
        ready.wait()
        started = time.perf_counter()
        replies = [future.result() for future in futures]
    return time.perf_counter() - started, replies


def workload(kind: str, clients: int, args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, dict[str, Any]]]:
    prompts = [json.loads(line)["prompt"] for line in builtin_prompts_path().read_text().splitlines()]
    if kind == "generate":
        return [("chat/completions", {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                                      "max_tokens": args.new_tokens, "temperature": 0}) for i in range(clients)]
    text = " ".join(prompts)
    ids = tokenizer(text)["input_ids"]
    rows = [ids[i * 37:i * 37 + args.tokens - 10 + (i * 7) % 20] for i in range(clients)]  # ~--tokens each, lengths differ
    return [("completions", {"prompt": row, "max_tokens": 1, "prompt_logprobs": 20, "temperature": 0}) for row in rows]


def differences(batched: list[dict[str, Any]], alone: list[dict[str, Any]]) -> float:
    """Largest |log-prob difference| over every entry; raises when a top-k set or a text differs."""
    worst = 0.0
    for got, expected in zip(batched, alone):
        a, b = got["choices"][0], expected["choices"][0]
        if a.get("message", {}).get("content", a.get("text")) != b.get("message", {}).get("content", b.get("text")):
            raise SystemExit("a batched answer's text differs from the one-at-a-time server's")
        for entry, reference in zip((a.get("prompt_logprobs") or [])[1:], (b.get("prompt_logprobs") or [])[1:]):
            if entry.keys() != reference.keys():
                raise SystemExit("a batched answer's top-k tokens differ from the one-at-a-time server's")
            worst = max(worst, max(abs(entry[t]["logprob"] - reference[t]["logprob"]) for t in entry))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--clients", default="1,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per scoring row (about)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per generated answer")
    parser.add_argument("--workloads", default="score,generate")
    parser.add_argument("--waves", type=int, default=3, help="waves per server and row of the table (the median is kept)")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    servers = {"batched": start(args.model, "--precision", args.precision),
               "alone": start(args.model, "--precision", args.precision, "--max-batch-rows", "1")}
    rows = []
    try:
        for kind in args.workloads.split(","):
            for clients in map(int, args.clients.split(",")):
                requests = workload(kind, clients, args, tokenizer)
                for _, url in servers.values():
                    wave(url, requests[:1])  # warm-up: first-call costs are nobody's
                times: dict[str, list[float]] = {"batched": [], "alone": []}
                replies: dict[str, list[dict[str, Any]]] = {}
                for _ in range(args.waves):
                    for name, (_, url) in servers.items():
                        seconds, replies[name] = wave(url, requests)
                        times[name].append(seconds)
                rows.append((kind, clients, statistics.median(times["alone"]), statistics.median(times["batched"]),
                             differences(replies["batched"], replies["alone"])))
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait()
    print(f"\n{args.model}, --precision {args.precision}, {os.cpu_count()} CPUs; median of {args.waves} waves; score: rows of "
          f"~{args.tokens} tokens, prompt_logprobs 20, max_tokens 1; generate: greedy chat, {args.new_tokens} new tokens\n")
    print("| workload | clients | one at a time (s) | batched (s) | one at a time (req/s) | batched (req/s) | speed-up | max abs log-prob diff |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, clients, alone, batched, diff in rows:
        print(f"| {kind} | {clients} | {alone:.2f} | {batched:.2f} | {clients / alone:.2f} | {clients / batched:.2f} | "
              f"{alone / batched:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
