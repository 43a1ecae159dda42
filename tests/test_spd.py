"""SPD (arXiv 2605.22675): the subspace math in float64, the answer tokens, hooks that exist only while sampling, a few
steps lowering the loss, the plain self-distillation baseline at strength 0, exact resume after kill -9, the config."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from opdistill.config import load_config
from opdistill.data import Example, collate
from opdistill.errors import ConfigError
from opdistill.methods import train
from opdistill.methods.common import response_nll_sum, response_tokens
from opdistill.methods.spd import SPD, answer_span, parse_layers
from opdistill.models import load_model, load_tokenizer
from opdistill.objectives.subspace import gradient_gram, project, subspace_angles, top_subspace
from opdistill.rollout import HFSampler, SamplingParams, rollout_seeds
from opdistill.rollout.projection import captured_kv, kv_modules, projected_kv

from test_engine import assert_same_weights, cli_train, kill_9_then_resume


def spd_overrides(student: Path, data: Path, out: Path, rows: int = 32, **extra) -> list[str]:
    values = {"method": "spd", "student": str(student), "data": f"{data}[:{rows}]", "out_dir": str(out), "lr": "1e-3", "precision": "fp32",
              "max_response_tokens": 16, "batch_size": 4, "micro_batch_size": 2, "rank": 4, "subspace_prompts": 6,
              "answer_tail_tokens": 4, "warmup_ratio": 0, "seed": 5, "truncated_rollouts": "keep",
              **extra}  # the tiny model writes no marker (its last tokens define correctness) and seldom an EOS (keep its cut samples)
    return [f"{k}={v}" for k, v in values.items()]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def orthonormal(d: int, r: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    return q


# ---------------------------------------------------------------- the math (float64)

def test_a_known_subspace_is_recovered_from_gradients_that_lie_in_it():
    basis = orthonormal(24, 3, seed=0)
    scales = torch.tensor([5.0, 3.0, 2.0], dtype=torch.float64)
    coefficients = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * scales
    noise = 1e-3 * torch.randn(500, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = coefficients @ basis.T + noise
    # Accumulated over "micro-batches" it is the same Gram as over all rows at once.
    gram = gradient_gram(grads[:200]) + gradient_gram(grads[200:].reshape(10, 30, 24))
    torch.testing.assert_close(gram, grads.T @ grads, rtol=1e-12, atol=1e-9)
    found, energy = top_subspace(gram, 3)
    assert found.dtype == torch.float64 and found.shape == (24, 3)
    torch.testing.assert_close(found.T @ found, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert subspace_angles(found, basis).max() < 1e-3
    assert energy > 0.9999
    # The top-r of a larger extraction are its first r columns (the benchmark slices one extraction to several ranks).
    wide, _ = top_subspace(gram, 5)
    torch.testing.assert_close(wide[:, :3], found, rtol=0, atol=1e-10)


def test_the_basis_is_deterministic_and_the_rank_is_capped_at_the_dimension():
    gram = gradient_gram(torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    a, _ = top_subspace(gram, 4)
    b, _ = top_subspace(gram.clone(), 4)
    assert torch.equal(a, b)
    assert (a.gather(0, a.abs().argmax(dim=0, keepdim=True)) > 0).all(), "each column's largest entry is positive"
    full, energy = top_subspace(gram, 99)
    assert full.shape == (6, 6) and energy == pytest.approx(1.0)
    with pytest.raises(ValueError):
        top_subspace(gram, 0)


def test_the_projection_is_idempotent_at_strength_1_and_the_identity_at_strength_0():
    basis = orthonormal(16, 4, seed=4)
    h = torch.randn(3, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    once = project(h, basis, 1.0)
    torch.testing.assert_close(project(once, basis, 1.0), once, rtol=0, atol=1e-12)
    torch.testing.assert_close(once, h @ basis @ basis.T, rtol=0, atol=1e-12)
    assert project(h, basis, 0.0) is h
    half = project(h, basis, 0.5)
    torch.testing.assert_close(half, 0.5 * h + 0.5 * once, rtol=0, atol=1e-12)
    # What the projection removes is orthogonal to the subspace; what it keeps lies in it.
    torch.testing.assert_close((h - once) @ basis, torch.zeros(3, 7, 4, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- answer tokens and config

def test_the_answer_tokens_follow_the_last_marker_and_exclude_eos(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    eos = {tokenizer.eos_token_id}
    ids = tokenizer("So 3 + 4 = 7 apples.\n#### 7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    start, end = answer_span(tokenizer, ids, eos, ["####", "The answer is"], 16, 0)
    assert tokenizer.decode(ids[start:end]).strip() == "7" and end == len(ids) - 1
    assert tokenizer.decode(ids[:start]).endswith("####")
    plain = tokenizer("no marker here", add_special_tokens=False)["input_ids"]
    assert answer_span(tokenizer, plain, eos, ["####"], 16, 0) is None
    assert answer_span(tokenizer, plain, eos, ["####"], 16, 2) == (len(plain) - 2, len(plain))
    assert answer_span(tokenizer, tokenizer("ends with ####", add_special_tokens=False)["input_ids"], eos, ["####"], 16, 0) is None


def test_config_checks_name_the_field():
    assert parse_layers("all") is None and parse_layers("0-2, 5") == [0, 1, 2, 5]
    assert parse_layers("middle,last", list(range(24))) == [12, 23] and parse_layers("middle,last", [0, 1]) == [1]
    assert parse_layers("0,last", list(range(30))) == [0, 29] and parse_layers("middle", [0, 3, 5, 7]) == [5]  # of the K/V layers
    for bad, field in (("projection_strength=1.5", "projection_strength"), ("rank=0", "rank"), ("layers=3-1", "layers"),
                       ("layers=x", "layers"), ("kv=q", "kv"), ("rollout_engine=vllm", "rollout_engine"),
                       ("subspace_refresh_every=-1", "subspace_refresh_every")):
        with pytest.raises(ConfigError, match=field):
            load_config(None, ["data=x.jsonl", bad], method="spd")
    config = load_config(None, ["data=x.jsonl", "rollout_engine=vllm", "project=false"], method="spd")
    assert not config.projects() and not config.needs_responses()


def test_help_config_lists_spds_keys(capsys):
    from opdistill.cli import main

    assert main(["train", "--method", "spd", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SPDConfig:")
    for key in ("project", "projection_strength", "rank", "layers", "kv", "subspace_prompts", "subspace_refresh_every",
                "answer_markers", "answer_max_tokens", "answer_tail_tokens", "temperature", "rollout_batch_size"):
        assert f"  {key} (" in out, key


# ---------------------------------------------------------------- hooks

def test_projection_hooks_exist_only_inside_the_block_and_are_removed_on_errors(tiny_model):
    model = load_model(str(tiny_model)).eval()
    modules = kv_modules(model)
    assert sorted(modules) == ["0.k", "0.v", "1.k", "1.v"]
    dim = modules["0.k"].out_features
    bases = {name: orthonormal(dim, 2, seed=i).float() for i, name in enumerate(modules)}
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model(input_ids=ids).logits
    with projected_kv(model, bases, 1.0), captured_kv(model, ["0.k"]) as seen:  # hooks run in order: capture after projection
        assert all(len(m._forward_hooks) >= 1 for m in modules.values())
        projected = model(input_ids=ids).logits
    assert torch.allclose(seen["0.k"][0] @ bases["0.k"] @ bases["0.k"].T, seen["0.k"][0], atol=1e-5), "the keys lie in the subspace"
    assert not torch.allclose(plain, projected)
    assert all(not m._forward_hooks for m in modules.values())
    with pytest.raises(RuntimeError, match="boom"):
        with projected_kv(model, bases, 1.0):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in modules.values())
    torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)


def test_training_forward_passes_never_run_through_the_hooks(tiny_model, selfinstruct, tmp_path, monkeypatch):
    from opdistill.engine import Engine

    seen: list[int] = []
    original = Engine.backward_token_mean

    def checked(self, batches, loss_sum, tokens, *args, **kwargs):
        hooks = [m for m in kv_modules(self.accelerator.unwrap_model(self.model)).values() if m._forward_hooks]
        seen.append(len(hooks))
        return original(self, batches, loss_sum, tokens, *args, **kwargs)

    monkeypatch.setattr(Engine, "backward_token_mean", checked)
    train(load_config(None, spd_overrides(tiny_model, selfinstruct, tmp_path / "run", max_steps=2)))  # fp32: the sampler's model is the student
    assert seen == [0, 0]


# ---------------------------------------------------------------- training

def test_a_few_steps_lower_the_loss_and_save_the_subspace(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "run"
    # Near-greedy samples of two prompts: the (projected) samples repeat, so the student learns them. At temperature 1 a
    # random model's samples are near uniform noise, and its own unprojected samples carry no expected gradient at all.
    summary = train(load_config(None, spd_overrides(tiny_model, selfinstruct, out, max_steps=6, batch_size=2, micro_batch_size=2,
                                                    rows=2, temperature=0.05, lr="1e-2")))
    losses = [line["loss"] for line in metric_lines(out)]
    assert len(losses) == 6 and losses[-1] < losses[0] * 0.8, losses
    from safetensors.torch import load_file

    saved = load_file(summary["spd_subspace"])
    # the default layers, middle and last, are both layer 1 of a 2-layer model
    assert sorted(saved) == ["1.k", "1.v"] and saved["1.k"].shape[1] == 4
    assert all(0 < line["subspace_energy"] <= 1 for line in metric_lines(out))


def test_strength_0_is_plain_self_distillation_on_unprojected_samples(tiny_model, selfinstruct, tmp_path):
    runs = {}
    for name, extra in (("off", {"project": "false"}), ("zero", {"projection_strength": 0}), ("on", {})):
        runs[name] = tmp_path / name
        train(load_config(None, spd_overrides(tiny_model, selfinstruct, runs[name], max_steps=1, lr_schedule="constant", **extra)))
    assert_same_weights(runs["off"], runs["zero"])
    assert not (runs["off"] / "spd_subspace.safetensors").exists()
    first = metric_lines(runs["off"])[0]
    # By hand: the step's prompts, sampled unprojected from the starting weights with the step's seeds, their response NLL.
    config = load_config(None, spd_overrides(tiny_model, selfinstruct, tmp_path / "x"))
    tokenizer = load_tokenizer(str(tiny_model))
    method, model = SPD(config, tokenizer), load_model(str(tiny_model))
    indices = method.order.indices(0)
    samples = HFSampler(model, tokenizer).sample([method.prompts[i] for i in indices], SamplingParams(1.0, 1.0, 16),
                                                 seeds=rollout_seeds(config.seed, 0, indices))
    batch = collate([Example(method.prompts[i], s.response_ids) for i, s in zip(indices, samples)], tokenizer.pad_token_id, align_responses=True)
    with torch.no_grad():
        assert first["loss"] == pytest.approx(float(response_nll_sum(model, batch)) / response_tokens(batch), rel=1e-5)
    # The projection has teeth: projected samples train the student elsewhere.
    assert metric_lines(runs["on"])[0]["loss"] != pytest.approx(first["loss"], rel=1e-6)


def test_kill_9_then_resume_with_a_refreshed_subspace_gives_the_same_weights(tiny_model, selfinstruct, tmp_path):
    settings = dict(max_steps=8, checkpoint_every=2, keep_checkpoints=2, subspace_refresh_every=3)
    straight = tmp_path / "straight"
    subprocess.run(cli_train(spd_overrides(tiny_model, selfinstruct, straight, **settings)), check=True, capture_output=True, timeout=300)
    out = tmp_path / "killed"
    # Killed after step 4's checkpoint: the resume needs step 3's subspace, extracted from weights it no longer has.
    kill_9_then_resume(cli_train(spd_overrides(tiny_model, selfinstruct, out, **settings)), out, step=4)
    assert_same_weights(straight, out)
    assert metric_lines(out) == [{**a, "step_seconds": b["step_seconds"], "rollout_seconds": b["rollout_seconds"]}
                                 for a, b in zip(metric_lines(straight), metric_lines(out))], "the same metrics, each step once"
    assert [line["step"] for line in metric_lines(out)] == list(range(1, 9))


def test_a_resume_refuses_a_subspace_of_other_layers(tiny_model, selfinstruct, tmp_path):
    """A run started with `layers: all` (the default of an earlier release) and resumed with `middle,last` would project
    other layers than the saved subspace covers: refused, naming the settings that resume it."""
    from types import SimpleNamespace

    from opdistill.errors import CheckpointError
    from opdistill.methods.spd import save_subspace, subspace_path

    config = load_config(None, spd_overrides(tiny_model, selfinstruct, tmp_path, layers="middle,last", subspace_refresh_every=0), method="spd")
    method = SPD(config, load_tokenizer(str(tiny_model)))
    method.names = ["1.k", "1.v"]  # what setup resolves middle,last to on the 2-layer model
    bases = {name: torch.eye(8)[:, :4] for name in ("0.k", "0.v", "1.k", "1.v")}
    save_subspace(subspace_path(tmp_path, 0), bases, {**method.metadata(0), "layers": "all"})
    with pytest.raises(CheckpointError, match="(?s)layers .all. at rank 4.*resume with layers=all rank=4"):
        method.on_resume(SimpleNamespace(step=2, out_dir=tmp_path))
    save_subspace(subspace_path(tmp_path, 0), {name: bases[name] for name in method.names}, method.metadata(0))
    method.on_resume(SimpleNamespace(step=2, out_dir=tmp_path))  # the same layers and rank: loaded
    assert sorted(method.bases) == ["1.k", "1.v"]


def test_masked_cut_samples_train_nothing_and_the_run_goes_on(tiny_model, selfinstruct, tmp_path, capsys):
    out = tmp_path / "masked"
    train(load_config(None, spd_overrides(tiny_model, selfinstruct, out, project="false", truncated_rollouts="mask", max_steps=2,
                                          max_response_tokens=3, lr="1e-2")))
    lines = metric_lines(out)
    assert [line["truncated"] for line in lines] == [1.0, 1.0]  # the tiny model stops within 3 tokens in none of its samples
    assert [line["loss"] for line in lines] == [0.0, 0.0] and [line["skipped"] for line in lines] == [1.0, 1.0]
    assert "every sample was cut at max_response_tokens=3; no update" in capsys.readouterr().out
    trained, start = load_model(str(out / "student")).state_dict(), load_model(str(tiny_model)).state_dict()
    assert all(torch.equal(trained[name], start[name]) for name in start)
    # The same run keeping its cut samples does move the weights.
    train(load_config(None, spd_overrides(tiny_model, selfinstruct, tmp_path / "kept", project="false", max_steps=2,
                                          max_response_tokens=3, lr="1e-2")))
    kept = load_model(str(tmp_path / "kept" / "student")).state_dict()
    assert any(not torch.equal(kept[name], start[name]) for name in start)
