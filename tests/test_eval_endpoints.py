"""`opdistill eval` rows and teacher scores that come from endpoints: an API model as a row (generated through the
collect client with retries, its key from the environment and a durable cache) and the teacher log-prob through a
served white-box teacher (`opdistill serve` on 127.0.0.1), equal to the local teacher's."""

from __future__ import annotations

import json

import pytest

from opdistill.errors import OpdistillError
from opdistill.evaluate.run import EvalOptions, run_eval
from opdistill.serve import ServeOptions, make_server

QUESTIONS = [{"prompt": f"Question {i}: name a colour."} for i in range(4)]


def prompts_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
    return str(path)


def test_an_api_model_is_a_row_with_retries_its_key_and_a_durable_cache(judge_server, tiny_model, tmp_path, monkeypatch):
    url, state = judge_server(script=["500", "429"], expected_key="sk-row-key")
    monkeypatch.setenv("ROW_KEY", "sk-row-key")
    options = dict(models=[f"student={tiny_model}"], api_models=[f"teacher=gpt-stub@{url}"], api_key_envs=["teacher=ROW_KEY"],
                   teacher="teacher", prompts=[prompts_file(tmp_path)], out=str(tmp_path / "ev"), max_new_tokens=8,
                   embeddings=False, progress=False)
    metrics = run_eval(EvalOptions(**options))
    teacher = metrics["sets"]["q"]["models"]["teacher"]
    assert teacher["responses"] == 4 and teacher["eos_rate"] == 1.0
    assert "teacher" in metrics["sets"]["q"]["models"]["student"]["vs"]  # the API row is the overlap reference
    assert state.requests == 6 and state.auth_bad == 0  # 2 faults retried, the key sent as the bearer token
    rows = [json.loads(line) for line in (tmp_path / "ev" / "generations.jsonl").read_text().splitlines()]
    assert sum(r["model"] == "teacher" for r in rows) == 4
    assert "sk-row-key" not in (tmp_path / "ev" / "generations.jsonl").read_text() + (tmp_path / "ev" / "metrics.json").read_text()
    run_eval(EvalOptions(**options))
    assert state.requests == 6  # the rerun paid for nothing


def test_failed_api_requests_stop_with_a_rerun_hint_and_keep_what_arrived(judge_server, tmp_path):
    url, _ = judge_server(always_fail_substring="Question 2")
    options = EvalOptions(models=[], api_models=[f"api=gpt-stub@{url}"], prompts=[prompts_file(tmp_path)], out=str(tmp_path / "ev"),
                          api_max_attempts=2, embeddings=False, progress=False)
    with pytest.raises(OpdistillError, match="1 of 4 request") as caught:
        run_eval(options)
    assert "rerun" in caught.value.fix
    assert len((tmp_path / "ev" / "generations.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("spec", ["teacher=gpt-4o-mini", "teacher=@http://x/v1", "=m@http://x/v1", "t=m@ftp://x"])
def test_a_bad_api_model_spec_says_the_form(spec, tmp_path):
    with pytest.raises(OpdistillError, match="LABEL=MODEL@URL"):
        run_eval(EvalOptions(models=[], api_models=[spec], prompts=["builtin:heldout[:1]"], out=str(tmp_path)))


def test_teacher_not_a_row_says_how_to_evaluate_an_api_model(tiny_model, tmp_path):
    with pytest.raises(OpdistillError, match="--api-model LABEL=MODEL@URL"):
        run_eval(EvalOptions(models=[str(tiny_model)], teacher="gpt-4o-mini", prompts=["builtin:heldout[:1]"], out=str(tmp_path)))


def test_a_served_teacher_scores_the_same_log_prob_as_the_local_one(judge_server, tiny_model, tmp_path, monkeypatch):
    import threading

    monkeypatch.setenv("SERVE_KEY", "k-123")
    server = make_server(ServeOptions(model=str(tiny_model), port=0, precision="fp32", api_key_env="SERVE_KEY", model_name="tiny"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        api_url, _ = judge_server()  # the scored row answers with real text (the random tiny model's answers decode to nothing)
        common = dict(models=[f"t={tiny_model}"], api_models=[f"s=stub@{api_url}"], systems=["t=Be brief."], teacher="t", prompts=["builtin:heldout[:3]"],
                      max_new_tokens=8, precision="fp32", embeddings=False, progress=False)
        local = run_eval(EvalOptions(out=str(tmp_path / "local"), **common))
        served = run_eval(EvalOptions(out=str(tmp_path / "served"), teacher_url=url, teacher_model="tiny", teacher_api_key_env="SERVE_KEY", **common))
    finally:
        server.shutdown()
        server.server_close()
    a, b = local["sets"]["heldout"]["models"]["s"], served["sets"]["heldout"]["models"]["s"]
    assert a["teacher_scored_tokens"] == b["teacher_scored_tokens"] > 0
    assert b["teacher_logprob"] == pytest.approx(a["teacher_logprob"], abs=1e-4)
    assert (tmp_path / "served" / "served_teacher_cache.jsonl").is_file()
