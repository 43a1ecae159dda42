from __future__ import annotations

import torch

from opdistill.data import Example, collate, render_prompt
from opdistill.models import load_model, load_tokenizer
from opdistill.rollout import SamplingParams, iter_samples, token_logprobs


def test_n_samples_per_prompt_with_logprobs_matching_a_forward_pass(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi there", "How do I boil an egg quickly?")]
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.8, top_p=1.0, max_new_tokens=12)
    samples = [s for batch in iter_samples(model, tokenizer, prompts, params, n=3, batch_size=4) for s in batch]
    assert sorted((s.prompt_index, s.sample_index) for s in samples) == [(p, i) for p in range(2) for i in range(3)]
    for sample in samples:
        assert 1 <= len(sample.response_ids) <= 12 and len(sample.logprobs) == len(sample.response_ids)
        assert sample.finished == (sample.response_ids[-1] == tokenizer.eos_token_id)
    # the sampling log-probs are the policy's own log-probs at the same temperature (left-padded generation
    # vs a right-padded forward: equal up to float error)
    examples = [Example(prompts[s.prompt_index], s.response_ids) for s in samples]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature=0.8)
    for row, sample in enumerate(samples):
        start = len(prompts[sample.prompt_index]) - 1
        recomputed = lp[row, start : start + len(sample.response_ids)]
        torch.testing.assert_close(recomputed, torch.tensor(sample.logprobs), rtol=1e-4, atol=1e-4)
