from __future__ import annotations

import torch

from opdistill.data import Example, collate, render_prompt
from opdistill.models import load_model, load_tokenizer
from opdistill.rollout import HFSampler, SamplingParams, token_logprobs


def test_n_samples_per_prompt_with_logprobs_matching_a_forward_pass(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi there", "How do I boil an egg quickly?")]
    torch.manual_seed(0)
    params = SamplingParams(temperature=0.8, top_p=1.0, max_new_tokens=12)
    samples = [s for batch in HFSampler(model, tokenizer, batch_size=4).iter_batches(prompts, params, n=3) for s in batch]
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


def test_sample_next_greedy_and_nucleus():
    from opdistill.rollout import sample_next

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]]))
    tokens, logprobs = sample_next(logits, SamplingParams(temperature=0.0, max_new_tokens=1))
    assert tokens.tolist() == [0, 3]
    torch.testing.assert_close(logprobs, torch.log(torch.tensor([0.5, 0.8])))
    torch.manual_seed(0)
    seen: set[tuple[int, int]] = set()
    for _ in range(300):
        tokens, logprobs = sample_next(logits, SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=1))
        seen.add(tuple(tokens.tolist()))
        # the reported log-prob is the untruncated policy's (what a forward pass gives), not the renormalised one
        torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1))
    # nucleus 0.7: row 0 keeps {0, 1} (0.5 + 0.3 reaches 0.7), row 1 keeps {3} only
    assert {t[0] for t in seen} == {0, 1} and {t[1] for t in seen} == {3}


def test_pack_jobs_keeps_a_prompts_samples_together_and_respects_the_batch_size():
    from opdistill.rollout import pack_jobs

    prompts = [[1] * 5, [1] * 2, [1] * 9]
    batches = pack_jobs(prompts, n=3, batch_size=4, skip=lambda p, s: (p, s) == (0, 1))
    assert batches == [[(1, [0, 1, 2])], [(0, [0, 2])], [(2, [0, 1, 2])]]
    assert pack_jobs(prompts, n=1, batch_size=4, skip=None) == [[(1, [0]), (0, [0]), (2, [0])]]
    # more samples than a batch holds: the prompt is split over batches
    assert pack_jobs([[1]], n=5, batch_size=2, skip=None) == [[(0, [0, 1])], [(0, [2, 3])], [(0, [4])]]


def test_greedy_sampling_matches_transformers_generate_with_left_padding(tiny_model):
    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    texts = ("Hi", "Write a long poem about the sea and the wind", "Why?", "List three colours")
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(temperature=0.0, max_new_tokens=10)
    ours = {s.prompt_index: s.response_ids for s in HFSampler(model, tokenizer, batch_size=4).sample(prompts, params)}
    from opdistill.rollout import left_pad

    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    with torch.no_grad():
        reference = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # both see the same rows; compare per prompt
    for i in order:
        expected = reference[i, ids.shape[1]:].tolist()
        assert ours[i] == expected[: len(ours[i])]
        assert len(ours[i]) == 10 or ours[i][-1] == tokenizer.eos_token_id


def test_draw_follows_the_distribution_and_never_picks_zero_mass():
    from opdistill.rollout import draw

    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    picks = draw(probs.expand(20000, -1).contiguous())
    frequencies = torch.bincount(picks, minlength=6).float() / len(picks)
    assert frequencies[1] == 0 and frequencies[5] == 0
    torch.testing.assert_close(frequencies, probs, atol=0.012, rtol=0)
    # unnormalised rows give the same distribution
    picks = draw((probs * 7).expand(20000, -1).contiguous())
    torch.testing.assert_close(torch.bincount(picks, minlength=6).float() / len(picks), probs, atol=0.012, rtol=0)


def test_rollouts_keep_each_response_with_its_prompt_and_data_row(tiny_model):
    """The one rollout type: prompt-major with n per prompt, each response's data row and prompt recoverable, the same
    samples whichever subset of rows is drawn with them (seeded by row), and micro-batches whose `row` indexes them."""
    import pytest

    from opdistill.rollout import Rollouts, data_rollouts, sample_rollouts

    tokenizer, model = load_tokenizer(str(tiny_model)), load_model(str(tiny_model))
    table = [render_prompt(tokenizer, [{"role": "user", "content": text}]) for text in ("Hi", "Name a fruit.", "Count to three, please.")]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6)
    sampler = HFSampler(model, tokenizer, batch_size=4)
    both = sample_rollouts(sampler, table, [2, 0], params, seed=3, step=5, n=2)
    assert both.rows == [2, 2, 0, 0] and len(both) == 4
    assert [e.prompt_ids for e in both.examples] == [table[2], table[2], table[0], table[0]]
    alone = sample_rollouts(sampler, table, [0], params, seed=3, step=5, n=2)
    assert alone.responses == both.responses[2:]  # row 0's samples do not depend on what else the step drew
    assert both.truncated == sum(not ended for ended in both.finished) / 4
    assert both.finished_mask().tolist() == [float(ended) for ended in both.finished]
    batches = both.micro_batches(3, tokenizer.pad_token_id)
    assert [b["rollout"].tolist() for b in batches] == [[0, 1, 2], [3]]
    assert int(sum(b["loss_mask"][:, 1:].sum() for b in batches)) == sum(both.lengths)
    given = data_rollouts(table, [1], [[5, 6, 7]], [False])
    assert given.prompts == [table[1]] and given.logprobs == [[]] and given.truncated == 1.0 and given.mean_length == 3.0
    with pytest.raises(ValueError, match="n=2"):
        Rollouts([0], [table[0]], [[1]], [True], [[]], n=2)


def test_micro_batches_of_finished_only_give_cut_responses_no_loss_token():
    from opdistill.rollout import Rollouts

    rollouts = Rollouts([0, 1, 2], [[1, 2], [3], [4, 5, 6]], [[7, 8, 9], [10, 11], [12]], [True, False, True], [[], [], []])
    everything = rollouts.micro_batches(2, pad_id=0)
    finished = rollouts.micro_batches(2, pad_id=0, finished_only=True)
    assert [b["rollout"].tolist() for b in finished] == [[0, 1], [2]]  # the cut response stays in its micro-batch
    per_response = [row.sum().item() for b in finished for row in b["loss_mask"][:, 1:]]
    assert per_response == [3, 0, 1]
    for a, b in zip(everything, finished):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_a_masked_cut_response_changes_nothing_for_its_neighbours_and_keeps_the_aligned_path(tiny_model):
    """A micro-batch with one finished and one masked (cut) response gives the finished one the same loss and gradients
    as a micro-batch of it alone, and still computes logits for the response positions only."""
    from opdistill.methods.common import response_nll_sum
    from opdistill.rollout import Rollouts

    model = load_model(str(tiny_model))
    rollouts = Rollouts([0, 1], [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21, 22], [30, 31, 32, 33]], [True, False], [[], []])
    mixed = rollouts.micro_batches(2, pad_id=0, finished_only=True)[0]
    alone = Rollouts([0], [[5, 6, 7]], [[20, 21, 22]], [True], [[]]).micro_batches(1, pad_id=0)[0]
    seen: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[1]))
    losses, grads = [], []
    for batch in (mixed, alone):
        model.zero_grad()
        loss = response_nll_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.embed_tokens.weight.grad.clone())
    hook.remove()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert seen[0] < mixed["input_ids"].shape[1], "only the response positions reach the LM head"
