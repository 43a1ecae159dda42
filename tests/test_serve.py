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


def test_sigterm_stops_cleanly_and_logs_hold_no_secrets(server: Server) -> None:
    assert call(server, "completions", {"prompt": MARKER, "max_tokens": 0})[0] == 200
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    out, err = server.out.read_text(), server.err.read_text()
    assert f"listening on {server.url}" in out and server.url.startswith("http://127.0.0.1:")
    assert "POST /v1/completions 200" in err and "GET /v1/models 401" in err and "stopped" in err
    assert KEY not in out + err and MARKER not in out + err and "Bearer" not in out + err
