"""`opdistill serve` as a client sees it: a real server (a subprocess on 127.0.0.1, a free port) over a tiny random
model, checked against a forward pass of the same model; plus the pure top-k helper it is built on."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from opdistill.cli import main
from opdistill.rollout import top_k_logprobs

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-5f1c9e"  # must never appear in the server's output
SYSTEM = "Always answer in French."
MARKER = "zebra quartz marker"  # sent in a request body; must never appear in the server's output


class Server:
    def __init__(self, process: subprocess.Popen, url: str, out: Path, err: Path) -> None:
        self.process, self.url, self.out, self.err = process, url, out, err
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    logs = tmp_path_factory.mktemp("serve")
    out, err = logs / "stdout.txt", logs / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO), "OPD_TEST_KEY": KEY}
    command = [sys.executable, "-m", "opdistill", "serve", str(tiny_model), "--port", "0", "--api-key-env", "OPD_TEST_KEY",
               "--system", SYSTEM, "--precision", "fp32", "--max-request-bytes", "4096", "--max-prompt-tokens", "64", "--model-name", "tiny"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 90
        while "listening on http://" not in out.read_text():
            assert process.poll() is None, f"the server exited: {err.read_text()}"
            assert time.monotonic() < deadline, f"the server did not start: {err.read_text()}"
            time.sleep(0.2)
        url = next(w for w in out.read_text().split() if w.startswith("http://"))
        yield Server(process, url, out, err)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def call(server: Server, path: str, body: Any = None, *, key: str | None = KEY, raw: bytes | None = None,
         model: str | None = "tiny") -> tuple[int, Any]:
    """(status, parsed JSON) of one request; `path` is under /v1 unless it starts with '/'."""
    url = server.url.removesuffix("/v1") + path if path.startswith("/") else f"{server.url}/{path}"
    if isinstance(body, dict) and model is not None:
        body = {"model": model, **body}
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def local(tiny_model: Path) -> tuple[Any, Any]:
    from opdistill.models import load_model, load_tokenizer

    return load_model(str(tiny_model)).eval(), load_tokenizer(str(tiny_model))


def test_top_k_logprobs_ranks_ties_and_the_target() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 5.0], [4.0, 1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([3, 1, 0])
    top = top_k_logprobs(logits, targets, 3)
    logp = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(top.logprobs, logp.topk(3).values)
    assert torch.equal(top.logprobs, logp.gather(-1, top.ids))
    assert top.ranks.tolist() == [[1, 1, 3], [1, 2, 2], [1, 2, 2]]  # ties share a rank
    assert top.target_ranks.tolist() == [5, 2, 1]
    assert torch.equal(top.target_logprobs, logp.gather(-1, targets[:, None]).squeeze(-1))
    chunked = top_k_logprobs(logits, targets, 3, chunk_rows=2)
    assert all(torch.equal(a, b) for a, b in zip(top, chunked))
    assert top_k_logprobs(logits, targets, 99).ids.shape == (3, 5)  # k capped at V
    empty = top_k_logprobs(logits[:0], targets[:0], 3)
    assert empty.ids.shape == (0, 3) and empty.target_ranks.shape == (0,)


def test_models_lists_the_served_model(server: Server) -> None:
    status, body = call(server, "models")
    assert status == 200
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model" and body["data"][0]["max_model_len"] == 1024


def test_prompt_logprobs_match_a_forward_pass(server: Server, local: tuple[Any, Any]) -> None:
    model, _ = local
    prompts = [[1, 40, 85, 91, 307, 71, 79, 201, 36, 2], [1, 87, 85, 264, 5]]
    k = 4
    status, body = call(server, "completions", {"prompt": prompts, "max_tokens": 0, "prompt_logprobs": k})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": 15, "completion_tokens": 0, "total_tokens": 15}
    for i, (prompt, choice) in enumerate(zip(prompts, body["choices"])):
        assert choice["index"] == i and choice["text"] == "" and choice["logprobs"] is None
        entries = choice["prompt_logprobs"]
        assert len(entries) == len(prompt) and entries[0] is None  # nothing predicts the first token (vLLM)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), dim=-1)
        for j in range(1, len(prompt)):
            row, entry = logp[j - 1], entries[j]
            top_values, top_ids = row.topk(k)
            assert str(prompt[j]) in entry  # the actual token is always there
            assert len(entry) == (k if prompt[j] in top_ids.tolist() else k + 1)
            for token, value in zip(top_ids.tolist(), top_values.tolist()):
                assert entry[str(token)]["logprob"] == pytest.approx(value, abs=1e-5)
            for token, item in entry.items():
                assert item["logprob"] == pytest.approx(float(row[int(token)]), abs=1e-5)
                assert item["rank"] == 1 + int((row > row[int(token)]).sum())
                assert isinstance(item["decoded_token"], str)


def test_generation_is_the_project_sampler(server: Server, local: tuple[Any, Any]) -> None:
    from opdistill.rollout import SamplingParams, make_sampler

    model, tokenizer = local
    ids = tokenizer("Write a poem about")["input_ids"]
    status, body = call(server, "completions", {"prompt": "Write a poem about", "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    expected = make_sampler("hf", model, tokenizer, precision="fp32", owns_model=True).sample([ids], SamplingParams(0.0, 1.0, 6))[0]
    assert body["choices"][0]["text"] == tokenizer.decode(expected.response_ids, skip_special_tokens=True)  # not stripped
    assert body["choices"][0]["finish_reason"] == ("stop" if expected.finished else "length")
    assert body["usage"]["prompt_tokens"] == len(ids) and body["usage"]["completion_tokens"] == len(expected.response_ids)
    # max_tokens 1 with prompt_logprobs (a white-box client's request) draws from the scoring pass: greedy is its argmax.
    status, body = call(server, "completions", {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    assert body["choices"][0]["text"] == tokenizer.decode(expected.response_ids[:1], skip_special_tokens=True)
    assert all(len(e) == 1 for e in body["choices"][0]["prompt_logprobs"][1:])  # k = 0: the actual token only
    # A seed fixes a sampled completion.
    request = {"prompt": ids, "max_tokens": 8, "temperature": 1.0, "seed": 7}
    assert call(server, "completions", request)[1]["choices"] == call(server, "completions", request)[1]["choices"]


def test_chat_gets_the_system_prompt_and_completions_do_not(server: Server, local: tuple[Any, Any]) -> None:
    from opdistill.data import render_prompt

    _, tokenizer = local
    user = [{"role": "user", "content": "Name a colour."}]
    status, body = call(server, "chat/completions", {"messages": user, "max_tokens": 5, "temperature": 0})
    assert status == 200, body
    choice = body["choices"][0]
    assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 5
    expected = render_prompt(tokenizer, [{"role": "system", "content": SYSTEM}, *user])
    assert body["usage"]["prompt_tokens"] == len(expected)
    assert call(server, "/tokenize", {"messages": user})[1] == {"tokens": expected, "count": len(expected), "max_model_len": 1024}
    own = [{"role": "system", "content": "Be brief."}, *user]  # the server's text goes first, then the client's own system text
    merged = render_prompt(tokenizer, [{"role": "system", "content": f"{SYSTEM}\n\nBe brief."}, *user])
    assert call(server, "/tokenize", {"messages": own})[1]["tokens"] == merged
    # Token ids and text prompts are served as sent: no system prompt.
    status, body = call(server, "/tokenize", {"prompt": "Name a colour."})
    assert status == 200 and body["tokens"] == tokenizer("Name a colour.")["input_ids"]
    status, body = call(server, "completions", {"prompt": [1, 40, 85], "max_tokens": 0})
    assert body["usage"]["prompt_tokens"] == 3


def test_oversize_bodies_get_413(server: Server) -> None:
    status, body = call(server, "completions", {"prompt": "x" * 5000})
    assert status == 413 and "4096" in body["error"]["message"]
    # A huge declared length is refused before anything is read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(10**9))
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == 413
    connection.close()


@pytest.mark.parametrize("path, body, field", [
    ("completions", {"prompt": [True, 2]}, "prompt"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": [1, 2, 100000]}, "prompt"),  # outside the vocabulary
    ("completions", {"prompt": [-1, 2]}, "prompt"),
    ("completions", {"prompt": list(range(1, 70))}, "prompt"),  # over --max-prompt-tokens 64
    ("completions", {"prompt": [1, 2], "prompt_logprobs": -1}, "prompt_logprobs"),
    ("completions", {"prompt": [1, 2], "prompt_logprobs": 21}, "prompt_logprobs"),  # over --max-logprobs 20
    ("completions", {"prompt": [1, 2], "prompt_logprobs": "3"}, "prompt_logprobs"),
    ("completions", {"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ("completions", {"prompt": [1, 2], "max_tokens": 2.5}, "max_tokens"),
    ("completions", {"prompt": [1, 2], "max_tokens": 5000}, "max_tokens"),  # past the 1024-token context
    ("completions", {"prompt": [1, 2], "temperature": "hot"}, "temperature"),
    ("completions", {"prompt": [1, 2], "top_p": 0}, "top_p"),
    ("completions", {"prompt": [1, 2], "seed": -3}, "seed"),
    ("completions", {"prompt": [1, 2], "stream": True}, "stream"),
    ("chat/completions", {"messages": "hello"}, "messages"),
    ("chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ("/tokenize", {"prompt": 5}, "prompt"),
])
def test_bad_fields_get_400_naming_the_field(server: Server, path: str, body: dict[str, Any], field: str) -> None:
    status, reply = call(server, path, {**body, "note": MARKER})
    assert status == 400, reply
    error = reply["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400 and error["param"] == field
    assert f"`{field}`" in error["message"]


@pytest.mark.parametrize("raw", [b'{"prompt": [1, 2', b"[1, 2]", b"\xc3\x28"])
def test_malformed_json_gets_400(server: Server, raw: bytes) -> None:
    status, reply = call(server, "completions", raw=raw)
    assert status == 400 and reply["error"]["type"] == "BadRequestError" and "body" in reply["error"]["message"]


def test_unknown_model_and_path_get_404(server: Server) -> None:
    status, reply = call(server, "completions", {"prompt": [1, 2], "max_tokens": 0}, model="gpt-x")
    assert status == 404 and reply["error"]["message"] == "The model `gpt-x` does not exist."
    assert call(server, "nothing-here")[0] == 404
    assert call(server, "completions", model=None)[0] == 405  # GET on a POST endpoint
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/models")  # no body and no Content-Length, as `curl -X POST` sends it
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 405 and json.loads(response.read())["error"]["type"] == "MethodNotAllowedError"
    connection.close()


def test_api_key_is_required(server: Server) -> None:
    for key in (None, "wrong-key", ""):
        status, reply = call(server, "models", key=key)
        assert status == 401 and reply["error"]["code"] == 401
    assert call(server, "completions", {"prompt": [1, 2], "max_tokens": 0}, key="nope")[0] == 401
    assert call(server, "models", key=KEY)[0] == 200


def test_start_up_errors_are_one_message(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path), "--port", str(server.port)]) == 2  # the port is the running server's
    err = capsys.readouterr().err
    assert "error: cannot listen on" in err and "in use" in err and "fix:" in err and "Traceback" not in err
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2  # a directory without config.json
    err = capsys.readouterr().err
    assert "error:" in err and "config.json" in err and "fix:" in err


# ---------------------------------------------------------------- limits a client is held to (issue 27 §4), over raw sockets


def raw_exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and return everything the server sends until it closes or `wait` passes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return received


def test_a_wrong_key_is_refused_on_the_headers_before_any_body_is_read(server: Server) -> None:
    # The body is announced but never sent: a server that read it first would wait (here up to 10 s) for nothing.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    reply = raw_exchange(server.port, head)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert time.monotonic() - started < 5 and b"Connection: close" in reply
    # A client that sent its (small) body before reading still reads the 401, not a reset.
    body = json.dumps({"prompt": [1, 2], "max_tokens": 0}).encode()
    reply = raw_exchange(server.port, head.replace(b"100000", str(len(body)).encode()) + body)
    assert reply.startswith(b"HTTP/1.1 401 ") and b"AuthenticationError" in reply


@pytest.mark.parametrize("framing", [b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"])
def test_transfer_encoding_is_refused_and_the_connection_closed(server: Server, framing: bytes) -> None:
    chunk = json.dumps({"prompt": [1, 2], "max_tokens": 0}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n" + framing + b"\r\n"
               + f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n0\r\n\r\n"
               # a second request on the same stream must never be served: the first one's framing is unknown
               + b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n")
    reply = raw_exchange(server.port, request)
    assert reply.startswith(b"HTTP/1.1 501 "), reply[:200]
    assert b"Transfer-Encoding" in reply and b"Connection: close" in reply
    assert reply.count(b"HTTP/1.1 ") == 1  # the smuggled GET got no answer


def test_deeply_nested_json_gets_400_not_500(server: Server) -> None:
    # 40 levels parse but pass the limit of 32; 1500 exhaust the JSON parser's own recursion guard (a 500 before).
    for depth, words in ((40, "deeper than 32"), (1500, "deeper than 32")):
        raw = b'{"prompt": [1, 2], "max_tokens": 0, "note": ' + b"[" * depth + b"]" * depth + b"}"
        status, reply = call(server, "completions", raw=raw)
        assert status == 400 and words in reply["error"]["message"] and reply["error"]["param"] == "body", reply
    status, reply = call(server, "completions", raw=b'{"prompt": [1, 2], "temperature": NaN}')
    assert status == 400 and "not valid JSON" in reply["error"]["message"]  # NaN is not JSON


@pytest.mark.parametrize("body, field", [
    ({"prompt": [1, 2], "max_tokens": True}, "max_tokens"),  # JSON true is not the integer 1
    ({"prompt": [1, 2], "prompt_logprobs": True}, "prompt_logprobs"),
    ({"prompt": [1, 2], "n": True}, "n"),
    ({"prompt": [1, 2], "best_of": True}, "best_of"),
    ({"prompt": [1, 2], "logprobs": False}, "logprobs"),  # an integer in the completions API
    ({"prompt": [1, 2], "logprobs": 2}, "logprobs"),  # per-token log-probs of the completion: not served
    ({"prompt": [1, 2], "suffix": ""}, "suffix"),  # vLLM refuses any suffix
    ({"prompt": [1, 2], "stop": ["\n"]}, "stop"),  # would be ignored otherwise: the text would differ from vLLM's
    ({"prompt": [1, 2], "stop": 5}, "stop"),
    ({"prompt": [1, 2], "echo": True}, "echo"),
    ({"prompt": [1, 2], "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": [1, 2], "top_k": 5}, "top_k"),
    ({"prompt": [1, 2], "logit_bias": {"5": 10}}, "logit_bias"),
    ({"prompt": [1, 2], "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, 2], "user": 7}, "user"),
])
def test_fields_are_validated_as_vllm_does(server: Server, body: dict[str, Any], field: str) -> None:
    status, reply = call(server, "completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == field and reply["error"]["type"] == "BadRequestError"


def test_chat_fields_are_validated_and_defaults_pass(server: Server) -> None:
    user = [{"role": "user", "content": "Hi"}]
    for body, field in (({"messages": user, "logprobs": 1}, "logprobs"), ({"messages": user, "logprobs": True}, "logprobs"),
                        ({"messages": user, "max_completion_tokens": True}, "max_completion_tokens"),
                        ({"messages": user, "n": 2}, "n")):
        status, reply = call(server, "chat/completions", body)
        assert status == 400 and reply["error"]["param"] == field, reply
    # What the OpenAI clients send as defaults is accepted.
    defaults = {"stream": False, "n": 1, "logprobs": False, "top_logprobs": 0, "stop": [], "presence_penalty": 0, "frequency_penalty": 0.0,
                "top_k": -1, "logit_bias": {}, "user": "u"}
    status, reply = call(server, "chat/completions", {"messages": user, "max_completion_tokens": 2, "temperature": 0, **defaults})
    assert status == 200 and reply["usage"]["completion_tokens"] <= 2, reply
    assert reply["choices"][0]["stop_reason"] is None
    status, reply = call(server, "completions", {"prompt": [1, 2], "max_tokens": 1, "suffix": None, "echo": False, "best_of": 1,
                                                 **{k: v for k, v in defaults.items() if k not in ("logprobs", "top_logprobs")}})
    assert status == 200, reply
    assert all(choice["stop_reason"] is None and choice["finish_reason"] in ("stop", "length") for choice in reply["choices"])


@pytest.fixture(scope="module")
def limited(tiny_model: Path) -> Iterator[Any]:
    """A second server, in this process, with two connection slots and a 2-second request deadline."""
    import threading

    from opdistill.serve import ServeOptions, make_server

    instance = make_server(ServeOptions(model=str(tiny_model), port=0, precision="fp32", max_connections=2, request_timeout=2.0))
    threading.Thread(target=instance.serve_forever, daemon=True).start()
    yield instance
    instance.shutdown()
    instance.server_close()


def test_a_client_trickling_bytes_is_cut_off_at_the_request_deadline(limited: Any) -> None:
    import socket

    port = limited.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        closed_after = None
        for _ in range(20):  # one byte every 0.5 s: each read succeeds long before a per-read timeout would fire
            try:
                sock.sendall(b"{")
                time.sleep(0.5)
                sock.setblocking(False)
                try:
                    if sock.recv(4096) == b"":
                        closed_after = time.monotonic() - started
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
            except OSError:  # reset or broken pipe: the server shut the connection
                closed_after = time.monotonic() - started
                break
        assert closed_after is not None and 1.5 < closed_after < 4.5, closed_after


def test_connections_past_the_limit_get_503_and_a_freed_slot_serves_again(limited: Any) -> None:
    import socket

    port = limited.server_address[1]
    time.sleep(0.5)  # the previous test's connection is reaped and its slot freed
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]  # idle: they hold both slots
    try:
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            reply = third.recv(4096)  # sent at once, before this client says anything
        assert reply.startswith(b"HTTP/1.1 503 ") and b"--max-connections" in reply and b"Retry-After: 1" in reply
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@pytest.fixture(scope="module")
def ruled_out(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The tiny model with one token the model rules out everywhere: its log-prob is exactly -inf in fp32. Its output row
    is -inf on a hidden unit the final norm keeps (weight 1) and that the embeddings make positive; every other unit is
    zeroed by the norm, so the other logits stay finite (0)."""
    from opdistill.models import load_model

    model = load_model(str(tiny_model))
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.clone())
        model.model.embed_tokens.weight[:, 0] = 100.0  # unit 0 dominates the residual stream with a positive value
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        banned = 50
        model.lm_head.weight[banned, 0] = -float("inf")
    out = tmp_path_factory.mktemp("ruled_out") / "model"
    model.save_pretrained(out, safe_serialization=True)
    from opdistill.models import load_tokenizer

    load_tokenizer(str(tiny_model)).save_pretrained(out)
    return out, banned


def test_minus_infinity_log_probs_are_sent_as_minus_9999_and_the_scores_are_chunked(ruled_out: tuple[Path, int]) -> None:
    import threading

    from opdistill.serve import SCORE_CHUNK, ServeOptions, make_server

    path, banned = ruled_out
    instance = make_server(ServeOptions(model=str(path), port=0, precision="fp32"))
    threading.Thread(target=instance.serve_forever, daemon=True).start()
    try:
        assert instance.app.split_head  # a Llama's logits are its head over its backbone: scored in chunks
        prompt = [1, banned, 40] + [85, banned] * (SCORE_CHUNK // 2 + 5)  # longer than one chunk, so chunks meet
        request = urllib.request.Request(f"http://127.0.0.1:{instance.server_address[1]}/v1/completions",
                                         data=json.dumps({"prompt": prompt, "max_tokens": 0, "prompt_logprobs": 2}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            text = response.read().decode()
        assert "Infinity" not in text  # strict JSON
        entries = json.loads(text)["choices"][0]["prompt_logprobs"]
        assert len(entries) == len(prompt)
        for position, token in enumerate(prompt[1:], start=1):
            value = entries[position][str(token)]["logprob"]
            assert value == -9999.0 if token == banned else -9999.0 < value <= 0, (position, value)
    finally:
        instance.shutdown()
        instance.server_close()


# Last: it stops the module's server.
def test_sigterm_stops_cleanly_and_logs_hold_no_secrets(server: Server) -> None:
    assert call(server, "completions", {"prompt": MARKER, "max_tokens": 0})[0] == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    out, err = server.out.read_text(), server.err.read_text()
    assert f"listening on {server.url}" in out and server.url.startswith("http://127.0.0.1:")
    assert "POST /v1/completions 200" in err and "GET /v1/models 401" in err and "stopped" in err
    assert KEY not in out + err and MARKER not in out + err and "Bearer" not in out + err
