"""On-policy co-distillation (method cod) on tiny random models: the gate and anchor math in float64, the
contexts each peer reads, which peer gets gradient from which records, and a kill + resume of both peers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opdistill.config import load_config
from opdistill.data import render_prompt
from opdistill.errors import ConfigError, DataError
from opdistill.methods import train
from opdistill.methods.cod import CoD, problem_free_messages
from opdistill.models import load_model, load_tokenizer
from opdistill.objectives.codistill import anchored_logits, cognizance_gate, response_means

from conftest import build_tiny_model


# ---------------------------------------------------------------- the math (pure functions, float64)


def test_anchored_logits_is_problem_guidance_on_log_probs():
    torch.manual_seed(0)
    problem, free = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    assert anchored_logits(problem, free, 0.0) is problem  # γ = 0: no anchoring at all
    log_x, log_free = torch.log_softmax(problem, -1), torch.log_softmax(free, -1)
    for gamma in (0.5, 2.0):
        expected = log_x + gamma * (log_x - log_free)
        torch.testing.assert_close(anchored_logits(problem, free, gamma), expected)
        # Only log-prob differences matter: shifting either side's logits per row changes nothing.
        torch.testing.assert_close(anchored_logits(problem + 3.0, free - 7.0, gamma), expected)
    # What the problem explains is sharpened: the token the problem favours most over the no-problem view gains mass.
    target = torch.softmax(anchored_logits(problem, free, 1.0), -1)
    favoured = (log_x - log_free).argmax(-1)
    assert (target.gather(-1, favoured[:, None]) > torch.softmax(problem, -1).gather(-1, favoured[:, None])).all()


def test_anchored_logits_keeps_impossible_tokens_impossible_and_stays_finite():
    problem = torch.tensor([[0.0, 1.0, -float("inf"), 2.0]], dtype=torch.float64)
    free = torch.tensor([[0.5, -float("inf"), -float("inf"), 1.0]], dtype=torch.float64)
    out = anchored_logits(problem, free, 1.0)
    assert out[0, 2] == -float("inf")
    assert torch.isfinite(out[0, [0, 1, 3]]).all()  # token 1 is impossible only without the problem: difference counted as 0
    with pytest.raises(ValueError, match=">= 0"):
        anchored_logits(problem, free, -0.1)


def test_cognizance_gate_is_the_mean_log_ratio_per_response_against_the_margin():
    learner = torch.tensor([-1.0, -1.0, -2.0, -0.5, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    tutor = torch.tensor([-2.0, -3.0, -2.0, -0.5, -1.5, -3.0], dtype=torch.float64)
    lengths = torch.tensor([2, 1, 3])  # responses: tokens 0-1, token 2, tokens 3-5
    gate, disagreement = cognizance_gate(learner, tutor, lengths, margin=0.0)
    torch.testing.assert_close(disagreement, torch.tensor([1.5, 0.0, 1.0 / 3.0], dtype=torch.float64))
    assert gate.tolist() == [1.0, 0.0, 1.0]  # strictly above the margin: a response the tutor rates as likely gets none
    assert cognizance_gate(learner, tutor, lengths, margin=0.5)[0].tolist() == [1.0, 0.0, 0.0]
    assert not gate.requires_grad and not disagreement.requires_grad
    torch.testing.assert_close(response_means(torch.arange(6.0), lengths), torch.tensor([0.5, 2.0, 4.0]))


# ---------------------------------------------------------------- data, contexts, config


def write_records(path: Path, n: int = 24, extra: dict | None = None) -> Path:
    """Built-in prompts alternating between domain "x" (peer A strong) and "y" (peer B strong)."""
    rows = [json.loads(line) for line in (Path(__file__).parents[1] / "opdistill/prompts/builtin.jsonl").read_text().splitlines()][:n]
    with open(path, "w", encoding="utf-8") as handle:
        for i, row in enumerate(rows):
            handle.write(json.dumps({"prompt": row["prompt"], "domain": "x" if i % 2 == 0 else "y", **(extra or {})}) + "\n")
    return path


@pytest.fixture(scope="module")
def peer_b(tmp_path_factory) -> Path:
    """Same tokenizer as tiny_model (same build), other random weights."""
    return build_tiny_model(tmp_path_factory.mktemp("peer") / "model", seed=7)


def cod_overrides(student: Path, peer: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"method": "cod", "student": str(student), "peer": str(peer), "data": str(data), "out_dir": str(out), "lr": "3e-3",
              "precision": "fp32", "max_response_tokens": 6, "seed": 1, "batch_size": 4, "micro_batch_size": 2, "max_steps": 2,
              "checkpoint_every": 0, "lr_schedule": "constant", "warmup_ratio": 0, "peer_a_domain": "x", "peer_b_domain": "y", **extra}
    return [f"{k}={v}" for k, v in values.items()]


def test_each_peer_learns_on_the_other_peers_domain_and_the_tutor_reads_the_problem(tiny_model, peer_b, tmp_path):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": "How do I boil pasta?", "domain": "x"}, {"prompt": "What is 2+2?", "domain": "y"},
            {"messages": [{"role": "user", "content": "Part one."}, {"role": "assistant", "content": "Go on."},
                          {"role": "user", "content": "Part two."}],
             "teacher_messages": [{"role": "user", "content": "Part one. Part two."}], "domain": "y"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, cod_overrides(tiny_model, peer_b, data, tmp_path / "out", batch_size=1, micro_batch_size=1,
                                             peer_a_system="Tutor A.", peer_b_system="Tutor B."))
    tokenizer = load_tokenizer(str(tiny_model))
    method = CoD(config, tokenizer)
    render = lambda messages: render_prompt(tokenizer, messages)  # noqa: E731
    assert method.owner == ["a", "b", "b"]
    assert method.pool == {"a": [1, 2], "b": [0]}  # A learns where B is strong, B where A is strong
    # The learner reads its own conversation; the tutor the problem (canonical teacher_messages when given), its
    # privileged system prompt first; the "without the problem" side keeps the system prompt and drops the problem.
    assert method.learner_prompts[2] == render(rows[2]["messages"])
    assert method.tutor_prompts[0] == render([{"role": "system", "content": "Tutor A."}, {"role": "user", "content": "How do I boil pasta?"}])
    assert method.tutor_prompts[2] == render([{"role": "system", "content": "Tutor B."}, {"role": "user", "content": "Part one. Part two."}])
    assert method.free_prompts["b"] == render(problem_free_messages("Tutor B.")) == render(
        [{"role": "system", "content": "Tutor B."}, {"role": "user", "content": ""}])
    assert "pasta" not in tokenizer.decode(method.free_prompts["a"])


def test_records_must_name_a_peers_domain(tiny_model, peer_b, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "domain": "x"}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n"
                    + json.dumps({"prompt": "Yo", "domain": "z"}) + "\n")
    config = load_config(None, cod_overrides(tiny_model, peer_b, data, tmp_path / "out", batch_size=1, micro_batch_size=1))
    with pytest.raises(DataError, match=r"bad.jsonl:2: field `domain` is None(.|\n)*bad.jsonl:3: field `domain` is 'z'"):
        CoD(config, load_tokenizer(str(tiny_model)))


def test_cod_config_checks():
    base = ["method=cod", "data=x.jsonl"]
    with pytest.raises(ConfigError, match="`peer` is empty"):
        load_config(None, base)
    with pytest.raises(ConfigError, match="two different"):
        load_config(None, base + ["peer=p", "peer_a_domain=m", "peer_b_domain=m"])
    with pytest.raises(ConfigError, match="`gate`"):
        load_config(None, base + ["peer=p", "gate=sometimes"])
    with pytest.raises(ConfigError, match="`divergence`"):
        load_config(None, base + ["peer=p", "divergence=k3"])  # the gate and the anchor need full distributions
    with pytest.raises(ConfigError, match="lora_r"):
        load_config(None, base + ["peer=p", "lora_r=4"])
    with pytest.raises(ConfigError, match="anchor"):
        load_config(None, base + ["peer=p", "anchor=-1"])
    assert load_config(None, base + ["peer=p"]).anchor == 0.5


# ---------------------------------------------------------------- gradients go where intended


def test_gradient_flows_only_from_the_learners_records_into_the_learner(tiny_model, peer_b, tmp_path, monkeypatch):
    data = write_records(tmp_path / "data.jsonl")
    seen = []
    original = CoD.learn

    def spy(self, engine, learner_name, rollouts):
        learner, tutor = (self.unwrapped(p, engine) for p in (learner_name, "b" if learner_name == "a" else "a"))
        before = {name: None if p.grad is None else p.grad.clone() for name, p in tutor.named_parameters()}
        out = original(self, engine, learner_name, rollouts)
        seen.append((learner_name, {self.owner[i] for i in rollouts.indices}))
        # the tutor scored under no_grad: its gradients are exactly what they were before the learner's backward
        for name, p in tutor.named_parameters():
            assert (p.grad is None and before[name] is None) or torch.equal(p.grad, before[name]), name
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
        return out

    monkeypatch.setattr(CoD, "learn", spy)
    out = tmp_path / "run"
    train(load_config(None, cod_overrides(tiny_model, peer_b, data, out, gate="always")))
    assert seen == [("a", {"b"}), ("b", {"a"})] * 2  # A learns on B's domain from B, and the reverse, every step
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["gate_a"] == line["gate_b"] == 1.0 for line in lines)
    start_a, start_b = load_model(str(tiny_model)), load_model(str(peer_b))
    end_a, end_b = load_model(str(out / "student")), load_model(str(out / "peer"))
    for start, end in ((start_a, end_a), (start_b, end_b)):
        assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), end.parameters()))


def test_a_closed_gate_leaves_both_peers_unchanged(tiny_model, peer_b, tmp_path):
    data = write_records(tmp_path / "data.jsonl")
    out = tmp_path / "closed"
    # No response can exceed a margin of 1e6 nats per token: no feedback, zero gradients, and AdamW moves nothing.
    train(load_config(None, cod_overrides(tiny_model, peer_b, data, out, gate_margin=1e6)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(line["gate_a"] == line["gate_b"] == 0.0 and line["loss_a"] == line["loss_b"] == 0.0 for line in lines)
    assert all(line["divergence_a"] > 0 and line["divergence_b"] > 0 for line in lines)  # there was something to teach
    for start, end in ((tiny_model, out / "student"), (peer_b, out / "peer")):
        assert all(torch.equal(p, q) for p, q in zip(load_model(str(start)).parameters(), load_model(str(end)).parameters()))


# ---------------------------------------------------------------- checkpoints: a kill and a resume continue both peers


def test_kill_and_resume_continue_both_peers_exactly(tiny_model, peer_b, tmp_path, monkeypatch):
    data = write_records(tmp_path / "data.jsonl")
    settings = dict(max_steps=4, checkpoint_every=1, anchor=1.0)
    straight = tmp_path / "straight"
    train(load_config(None, cod_overrides(tiny_model, peer_b, data, straight, **settings)))

    resumed = tmp_path / "resumed"
    original = CoD.step

    def killed_at_step_2(self, engine, step):
        if step == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, engine, step)

    monkeypatch.setattr(CoD, "step", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 2"):
        train(load_config(None, cod_overrides(tiny_model, peer_b, data, resumed, **settings)))
    checkpoint = resumed / "checkpoints" / "step-000002"
    assert (checkpoint / "model_1.safetensors").is_file() and (checkpoint / "optimizer_1.bin").is_file()  # peer B and its AdamW
    monkeypatch.setattr(CoD, "step", original)
    summary = train(load_config(None, cod_overrides(tiny_model, peer_b, data, resumed, **settings)))
    assert summary["steps"] == 4
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for name in ("student", "peer"):  # both peers end exactly where the uninterrupted run ends
        for p, q in zip(load_model(str(straight / name)).parameters(), load_model(str(resumed / name)).parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [round(x["loss_b"], 6) for x in a] == [round(x["loss_b"], 6) for x in b]


# ---------------------------------------------------------------- issue 27 §4: what the gate reads, how tutors score


def test_the_gate_reads_the_tutors_own_log_probs_not_the_anchored_target(tiny_model, tmp_path):
    """Both peers are the same weights and read the same context (no privileged prompts, no teacher_messages): the tutor's
    own log-prob of every sampled token equals the learner's, so the disagreement is 0 and the gate stays closed. The
    anchored target differs from both (anchor 1.0 pushes it away from the problem-free view), so gating on it would
    report a disagreement far from 0 and open the gate."""
    data = write_records(tmp_path / "data.jsonl")
    out = tmp_path / "same"
    train(load_config(None, cod_overrides(tiny_model, tiny_model, data, out, max_steps=1, anchor=1.0, gate_margin=1e-4)))
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(line["disagreement_a"]) < 1e-5 and abs(line["disagreement_b"]) < 1e-5, line
    assert line["gate_a"] == line["gate_b"] == 0.0 and line["loss_a"] == line["loss_b"] == 0.0
    assert line["divergence_a"] > 1e-5  # the learner differs from the anchored target: only the gate kept it still


def test_tutors_and_adapter_off_teachers_score_in_eval_mode_and_the_trained_model_stays_in_train_mode(tiny_model):
    from opdistill.models import apply_lora
    from opdistill.teachers.logprob import AdapterOffTeacher, LocalTeacher, TeacherRow

    torch.manual_seed(0)
    model = load_model(str(tiny_model))
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    ids = torch.tensor([[1, 40, 85, 91, 307, 71]])
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is live in train mode
    rows = [TeacherRow([1, 40, 85], [91, 307, 71]), TeacherRow([1, 87], [85, 264])]
    pad = load_tokenizer(str(tiny_model)).pad_token_id
    tutor = LocalTeacher(model, pad)
    first, second = tutor.score(rows).logits, tutor.score(rows).logits
    assert torch.equal(first, second)
    assert all(module.training for module in model.modules())  # back in train mode for its own update
    student = apply_lora(model, 4, 8, 0.5, "q_proj,v_proj")
    student.train()
    kept = next(name for name, _ in student.named_modules() if name.endswith("layers.0.mlp"))
    student.get_submodule(kept).eval()  # a submodule kept in eval mode by its owner stays in eval mode
    modes = {name: module.training for name, module in student.named_modules()}
    teacher = AdapterOffTeacher(lambda: student, pad)
    first, second = teacher.score(rows).logits, teacher.score(rows).logits
    assert torch.equal(first, second)
    torch.testing.assert_close(first, tutor.score(rows).logits)  # adapters off: the base model
    assert {name: module.training for name, module in student.named_modules()} == modes and not modes[kept]
