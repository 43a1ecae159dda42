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


# ------------------------------------ limits a client is held to (issue 27 §4), over raw sockets; more in test_serve_limits.py


def raw_exchange(port: int, data: bytes, wait: float = 10.0) -> bytes:
    """Send `data` on a fresh connection and return everything the server sends until it closes or `wait` passes."""
    import socket

    from serve_clients import read_until_closed

    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        return read_until_closed(sock, wait)


def test_a_wrong_key_is_refused_on_the_headers_before_any_body_is_read(server: Server) -> None:
    # The body is announced but never sent: a server that read it first would wait (here up to 10 s) for nothing.
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    started = time.monotonic()
    reply = raw_exchange(server.port, head)
    assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
    assert time.monotonic() - started < 5 and b"connection: close" in reply.lower()  # header names are case-insensitive
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
    assert b"Transfer-Encoding" in reply and b"connection: close" in reply.lower()
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


# ---------------------------------------------------------------- batching concurrent requests into one forward pass


@pytest.fixture(scope="module")
def pair(tiny_model: Path) -> Iterator[tuple[Any, Any]]:
    """Two servers of the tiny model in this process: `batched` gathers up to 8 rows and lets the first wait up to 3 s
    for the others (so 8 requests sent at once surely share a pass, however slow this machine is), `alone` answers
    every row by itself (--max-batch-rows 1: the server before batching)."""
    import threading
    from types import SimpleNamespace

    from opdistill.serve import ServeOptions, make_server

    made = [make_server(ServeOptions(model=str(tiny_model), port=0, precision="fp32", model_name="tiny", max_batch_rows=rows,
                                     batch_wait_ms=wait)) for rows, wait in ((8, 3000.0), (1, 0.0))]
    for instance in made:
        threading.Thread(target=instance.serve_forever, daemon=True).start()
    yield tuple(SimpleNamespace(url=f"http://127.0.0.1:{i.server_address[1]}/v1", instance=i) for i in made)  # type: ignore[misc]
    for instance in made:
        instance.shutdown()
        instance.server_close()


def at_once(server: Any, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
    """(status, reply) of each request, all sent together from threads of their own."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    start = threading.Barrier(len(requests))

    def one(request: tuple[str, dict[str, Any]]) -> tuple[int, Any]:
        start.wait()
        return call(server, *request, key=None)

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def stats(server: Any) -> dict[str, Any]:
    status, body = call(server, "/stats", key=None)
    assert status == 200, body
    return body


def assert_same_answer(batched: dict[str, Any], alone: dict[str, Any]) -> None:
    """The same reply but for id and time: texts, ends and usage equal, prompt log-probs to 1e-5 with the same tokens."""
    assert batched["usage"] == alone["usage"]
    for got, expected in zip(batched["choices"], alone["choices"], strict=True):
        assert {k: v for k, v in got.items() if k != "prompt_logprobs"} == {k: v for k, v in expected.items() if k != "prompt_logprobs"}
        if expected.get("prompt_logprobs") is None:
            assert got.get("prompt_logprobs") is None
            continue
        for entry, reference in zip(got["prompt_logprobs"], expected["prompt_logprobs"], strict=True):
            if reference is None:
                assert entry is None
                continue
            assert entry.keys() == reference.keys()  # the same top-k token ids, and the prompt token
            for token, item in entry.items():
                assert item["rank"] == reference[token]["rank"] and item["decoded_token"] == reference[token]["decoded_token"]
                assert item["logprob"] == pytest.approx(reference[token]["logprob"], abs=1e-5, rel=0)


def scoring_requests(count: int) -> list[tuple[str, dict[str, Any]]]:
    """What a remote teacher sends (max_tokens 1, greedy), with other lengths, k and a seeded draw mixed in."""
    requests = []
    for i in range(count):
        prompt = [1 + (7 * i + 13 * j) % 300 for j in range(3 + 5 * i)]  # 3 to 38 tokens: rows of one batch differ in length
        body = {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": i % 6, "temperature": 0.0 if i % 2 else 1.0, "seed": i}
        requests.append(("completions", body))
    return requests


def test_concurrent_scoring_requests_share_one_pass_and_get_their_own_answers(pair: tuple[Any, Any]) -> None:
    batched, alone = pair
    requests = scoring_requests(8)
    before = stats(batched)
    replies = at_once(batched, requests)
    after = stats(batched)
    assert after["batches"] - before["batches"] == 1 and after["rows"] - before["rows"] == 8 and after["largest_batch"] == 8
    for (status, reply), request in zip(replies, requests):
        assert status == 200, reply
        expected_status, expected = call(alone, *request, key=None)
        assert expected_status == 200
        assert_same_answer(reply, expected)
    assert stats(alone)["largest_batch"] == 1


def test_one_bad_request_in_a_batch_gets_its_400_and_the_others_their_answers(pair: tuple[Any, Any]) -> None:
    batched, alone = pair
    bad = ("completions", {"prompt": [1, 2, 100000], "max_tokens": 1, "prompt_logprobs": 3})  # outside the vocabulary
    requests = scoring_requests(8)
    before = stats(batched)
    replies = at_once(batched, requests[:4] + [bad] + requests[4:])
    status, reply = replies.pop(4)
    assert status == 400 and reply["error"]["param"] == "prompt" and "100000" in reply["error"]["message"]
    for (status, reply), request in zip(replies, requests):
        assert status == 200, reply
        assert_same_answer(reply, call(alone, *request, key=None)[1])
    assert stats(batched)["batches"] - before["batches"] == 1  # the 8 good rows still shared their pass


def test_concurrent_generation_is_batched_and_each_gets_its_answer_alone(pair: tuple[Any, Any]) -> None:
    batched, alone = pair
    # 8 sampled completions with seeds of their own (one decode loop) and 8 greedy chats (another): each row's draws
    # come from its own seed's stream, so its text is the one it gets alone.
    sampled = [("completions", {"prompt": [1 + (11 * i + j) % 300 for j in range(2 + 3 * i)], "max_tokens": 8, "temperature": 1.0,
                                "seed": 100 + i}) for i in range(8)]
    greedy = [("chat/completions", {"messages": [{"role": "user", "content": f"Name {i + 1} colours of the sea."}], "max_tokens": 6,
                                    "temperature": 0}) for i in range(8)]
    before = stats(batched)
    replies = at_once(batched, sampled + greedy)
    assert stats(batched)["batches"] - before["batches"] == 2
    for (status, reply), request in zip(replies, sampled + greedy):
        assert status == 200, reply
        assert_same_answer(reply, call(alone, *request, key=None)[1])
    texts = {reply["choices"][0]["text"] for _, reply in replies[:8]}
    assert len(texts) > 1  # the seeds differ, so do the samples: no row was handed another's answer


def test_a_client_that_disconnects_does_not_break_the_batch(pair: tuple[Any, Any]) -> None:
    import socket
    import threading

    batched, alone = pair
    port = batched.instance.server_address[1]
    requests = scoring_requests(8)

    def hang_up(body: dict[str, Any]) -> None:
        data = json.dumps({"model": "tiny", **body}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # sends the whole request, leaves at once
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)

    before = stats(batched)
    quitters = [threading.Thread(target=hang_up, args=(body,)) for _, body in requests[:3]]
    for thread in quitters:
        thread.start()
    replies = at_once(batched, requests[3:])
    for thread in quitters:
        thread.join()
    for (status, reply), request in zip(replies, requests[3:]):
        assert status == 200, reply
        assert_same_answer(reply, call(alone, *request, key=None)[1])
    after = stats(batched)
    # A quitter's row is dropped when the server sees it leave, unless the batch it joined was already in the model.
    assert 5 <= after["rows"] - before["rows"] <= 8 and after["queued_rows"] == 0
    assert call(batched, *requests[0], key=None)[0] == 200  # and the server goes on


def test_a_batch_whose_pass_fails_is_answered_row_by_row() -> None:
    """The batcher alone, with a runner that cannot run a batch holding a poisoned row (as a row that breaks the pass,
    or out-of-memory at the batch's size): the other rows still get their answers, the poisoned one its own error."""
    import threading

    from opdistill.serve import Batcher
    from opdistill.serve.batching import ScoreJob

    class Runner:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def run(self, jobs: list[ScoreJob], abandoned: Any) -> list[int]:
            self.calls.append(len(jobs))
            if any(-1 in job.ids for job in jobs):
                raise RuntimeError("poisoned row")
            return [sum(job.ids) for job in jobs]

    runner, logged = Runner(), []
    batcher = Batcher(runner, max_rows=4, max_tokens=1000, wait_seconds=5.0, log=logged.append)
    results: dict[int, Any] = {}

    def ask(number: int, ids: list[int]) -> None:
        try:
            results[number] = batcher.answers([ScoreJob(ids, 1)])[0]
        except RuntimeError as err:
            results[number] = str(err)

    threads = [threading.Thread(target=ask, args=(n, ids)) for n, ids in enumerate(([1, 2], [3, -1], [5], [7, 8]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    batcher.close()
    assert results == {0: 3, 1: "poisoned row", 2: 5, 3: 15}
    assert runner.calls == [4, 1, 1, 1, 1] and "running them one by one" in logged[0]
    assert batcher.report()["split_batches"] == 1


def test_batching_options_are_checked_and_stats_need_the_key(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "unused", "--port", "0", "--max-batch-rows", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch-rows" in err and "fix:" in err
    assert call(server, "/stats", key=None)[0] == 401
    assert call(server, "completions", {"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2})[0] == 200
    status, body = call(server, "/stats")
    assert status == 200 and body["max_batch_rows"] == 16 and body["batches"] >= 1 and body["rows"] >= 1


# Last: it stops the module's server.
def test_sigterm_stops_cleanly_and_logs_hold_no_secrets(server: Server) -> None:
    assert call(server, "completions", {"prompt": MARKER, "max_tokens": 0})[0] == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    out, err = server.out.read_text(), server.err.read_text()
    assert f"listening on {server.url}" in out and server.url.startswith("http://127.0.0.1:")
    assert "POST /v1/completions 200" in err and "GET /v1/models 401" in err and "stopped" in err
    assert KEY not in out + err and MARKER not in out + err and "Bearer" not in out + err
