"""An OpenAI-compatible chat-completions server for tests, with injectable faults.

Runs for real on 127.0.0.1 (a thread in the test process, or `python tests/openai_stub_server.py`).
Answers are deterministic text derived from the prompt; opdistill's judge prompts get a rule-based
judgment (see judge_text). Faults:
  --script 429,500,timeout,...  the first requests get these faults in order, then all succeed
  --fault-rate 0.1              each request fails with that probability (kind drawn from --fault-kinds)
  --always-fail-substring S     every request whose prompt contains S gets a 500
  --status-always 401           every request gets that status
GET /stats returns counts. Fault kinds: 429 (Retry-After), 500, 503, timeout, malformed, reset, truncated.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "503", "timeout", "malformed", "reset", "truncated")


class StubState:
    def __init__(self, script: list[str], fault_rate: float, fault_kinds: list[str], seed: int, latency: float,
                 timeout_sleep: float, retry_after: str, always_fail_substring: str, status_always: int, expected_key: str, judge_mode: str = "length") -> None:
        self.script = list(script)
        self.fault_rate = fault_rate
        self.fault_kinds = fault_kinds
        self.rng = random.Random(seed)
        self.latency = latency
        self.timeout_sleep = timeout_sleep
        self.retry_after = retry_after
        self.always_fail_substring = always_fail_substring
        self.status_always = status_always
        self.expected_key = expected_key
        self.judge_mode = judge_mode
        self.lock = threading.Lock()
        self.requests = 0
        self.succeeded = 0
        self.faults: dict[str, int] = {}
        self.auth_ok = 0
        self.auth_bad = 0
        self.succeeded_by_prompt: dict[str, int] = {}

    def pick_fault(self, prompt: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.status_always:
                return f"status{self.status_always}"
            if self.always_fail_substring and self.always_fail_substring in prompt:
                return "500"
            if self.script:
                return self.script.pop(0)
            if self.fault_rate and self.rng.random() < self.fault_rate:
                return self.rng.choice(self.fault_kinds)
            return None


def section(prompt: str, title: str) -> str:
    """The text under `[title]` in one of opdistill's judge prompts, up to the next blank-line-separated part."""
    start = prompt.index(f"[{title}]\n") + len(title) + 3
    end = prompt.find("\n\n[", start)
    return prompt[start:end if end >= 0 else prompt.find("\n\nReply", start)]


def length_score(answer: str) -> int:
    """The stub judge's rule: 1 point per 3 words, from 1 to 10 (a real judge reads; this one counts)."""
    return max(1, min(10, 1 + len(answer.split()) // 3))


def judge_text(prompt: str, mode: str, temperature: float = 0.0) -> str | None:
    """A judgment when `prompt` is one of opdistill's judge prompts, else None. Modes: length (the longer
    answer is better), first (always prefers the first answer: pure position bias), garbage (never parses),
    flaky (does not parse when asked greedily, parses when re-asked with sampling)."""
    unparseable = mode == "garbage" or (mode == "flaky" and temperature == 0)
    if unparseable and ("[Answer 1]" in prompt or "[Assistant A]" in prompt):
        return "Both answers have merits."
    if "[Answer 1]" in prompt:
        return f"Scores: {length_score(section(prompt, 'Answer 1'))} {length_score(section(prompt, 'Answer 2'))}\nCounted words."
    if "[Assistant A]" in prompt:
        if mode == "first":
            return "Verdict: A\nThe first one."
        a, b = length_score(section(prompt, "Assistant A")), length_score(section(prompt, "Assistant B"))
        return f"Verdict: {'A' if a > b else 'B' if b > a else 'tie'}\nCounted words."
    return None


def answer_text(messages: list[dict[str, str]], temperature: float, judge_mode: str = "length") -> str:
    prompt = messages[-1]["content"]
    judged = judge_text(prompt, judge_mode, temperature)
    if judged is not None:
        return judged
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    prefix = "Réponse" if "French" in system else "Answer"
    return f"{prefix}: {prompt[::-1][:80]} (t={temperature})"


def make_handler(state: StubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, length: int | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def do_GET(self) -> None:
            if self.path != "/stats":
                self._send(404, b"{}")
                return
            with state.lock:
                stats = {"requests": state.requests, "succeeded": state.succeeded, "faults": state.faults,
                         "auth_ok": state.auth_ok, "auth_bad": state.auth_bad, "succeeded_by_prompt": state.succeeded_by_prompt}
            self._send(200, json.dumps(stats).encode())

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(length) or b"{}")
            auth = self.headers.get("Authorization", "")
            with state.lock:
                if state.expected_key:
                    if auth == f"Bearer {state.expected_key}":
                        state.auth_ok += 1
                    else:
                        state.auth_bad += 1
            if self.path != "/v1/chat/completions":
                self._send(404, b'{"error": "not found"}')
                return
            messages = payload.get("messages") or [{"role": "user", "content": ""}]
            prompt = messages[-1].get("content", "")
            fault = state.pick_fault(prompt)
            if state.latency:
                time.sleep(state.latency)
            if fault is not None:
                with state.lock:
                    state.faults[fault] = state.faults.get(fault, 0) + 1
                self._fault(fault)
                return
            text = answer_text(messages, payload.get("temperature", 1.0), state.judge_mode)
            body = {"id": "x", "object": "chat.completion", "model": payload.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split())}}
            with state.lock:
                state.succeeded += 1
                state.succeeded_by_prompt[prompt] = state.succeeded_by_prompt.get(prompt, 0) + 1
            self._send(200, json.dumps(body).encode())

        def _fault(self, fault: str) -> None:
            if fault.startswith("status"):
                self._send(int(fault[6:]), b'{"error": {"message": "denied"}}')
            elif fault == "429":
                self._send(429, b'{"error": "rate limited"}', {"Retry-After": state.retry_after})
            elif fault in ("500", "503"):
                self._send(int(fault), b'{"error": "server error"}')
            elif fault == "timeout":
                time.sleep(state.timeout_sleep)
                self._send(500, b'{"error": "late"}')
            elif fault == "malformed":
                self._send(200, b'{"choices": "this is not a list"}')
            elif fault == "reset":
                self.close_connection = True
                self.connection.shutdown(2)
            elif fault == "truncated":
                body = b'{"choices": [{"message": {"content": "cut'
                self._send(200, body, length=len(body) + 50)
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients killed mid-request (the kill -9 tests) reset connections; that is expected here


def start_server(port: int = 0, **kwargs: Any) -> tuple[ThreadingHTTPServer, StubState]:
    defaults = dict(script=[], fault_rate=0.0, fault_kinds=list(FAULT_KINDS), seed=0, latency=0.0, timeout_sleep=3.0,
                    retry_after="1", always_fail_substring="", status_always=0, expected_key="")
    defaults.update(kwargs)
    state = StubState(**defaults)
    server = QuietServer(("127.0.0.1", port), make_handler(state))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--fault-kinds", default=",".join(FAULT_KINDS))
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retry-after", default="1", help="Retry-After header value sent with 429s")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop by itself after this long")
    args = parser.parse_args()
    server, _ = start_server(args.port, fault_rate=args.fault_rate, fault_kinds=args.fault_kinds.split(","),
                             latency=args.latency, seed=args.seed, retry_after=args.retry_after)
    with open(args.port_file, "w") as handle:
        handle.write(str(server.server_address[1]))
    time.sleep(args.max_seconds)
    server.shutdown()


if __name__ == "__main__":
    main()
