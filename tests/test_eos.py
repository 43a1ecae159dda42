"""Responses that stop: a response that did not end never gains an EOS (SeqKD, GAD, OPD), `unfinished: drop`
leaves such teacher texts out, and GAD's `truncated_rollouts: mask` takes the policy loss off cut samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.data import Record, load_records, response_ids, tokenize_records
from opdistill.errors import ConfigError, DataError
from opdistill.methods import train
from opdistill.methods.opd import OPD
from opdistill.methods.seqkd import SeqKD
from opdistill.models import load_tokenizer

from test_gad import gad_overrides, metric_lines

ANSWER = "Paris is the capital of France."


def teacher_file(path: Path) -> Path:
    """Three collected answers: one that ended, one the teacher stopped at its token limit, one marked by hand."""
    rows = [{"prompt": "Capital of France?", "response": ANSWER, "meta": {"finish_reason": "stop"}},
            {"prompt": "Tell me about Paris.", "response": ANSWER, "meta": {"finish_reason": "length"}},
            {"prompt": "And Lyon?", "response": ANSWER, "finished": False}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_response_ids_end_with_eos_only_when_the_response_ended_and_fits(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    text = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert response_ids(tokenizer, ANSWER, 100) == text + [eos]
    assert response_ids(tokenizer, ANSWER, 100, finished=False) == text, "a text cut by the teacher's limit gets no EOS"
    assert response_ids(tokenizer, ANSWER, len(text)) == text, "cut here: no EOS either"
    assert response_ids(tokenizer, ANSWER, 3) == text[:3]


def test_records_know_whether_the_teacher_finished(tmp_path):
    records = load_records(str(teacher_file(tmp_path / "t.jsonl")))
    assert [r.finished for r in records] == [True, False, False]
    assert Record(messages=[{"role": "user", "content": "x"}], response="y").finished, "plain records are finished texts"


def test_seqkd_keeps_unfinished_texts_without_eos_or_drops_them(tiny_model, tmp_path):
    data = teacher_file(tmp_path / "t.jsonl")
    tokenizer = load_tokenizer(str(tiny_model))
    eos = tokenizer.eos_token_id
    overrides = [f"student={tiny_model}", f"data={data}", f"out_dir={tmp_path / 'out'}", "batch_size=1", "micro_batch_size=1"]
    kept = SeqKD(load_config(None, overrides), tokenizer)
    assert [e.response_ids[-1] == eos for e in kept.examples] == [True, False, False]
    dropped = SeqKD(load_config(None, [*overrides, "unfinished=drop"]), tokenizer)
    assert len(dropped.examples) == 1 and dropped.examples[0].response_ids[-1] == eos
    _, report = tokenize_records(tokenizer, load_records(str(data)), 512, 4, "truncate", "keep")
    assert (report.unfinished, report.dropped) == (3, 0), "at 4 tokens every answer is cut"
    with pytest.raises(DataError, match="no record is left"):
        tokenize_records(tokenizer, load_records(str(data)), 512, 4, "truncate", "drop")
    with pytest.raises(ConfigError, match="unfinished"):
        load_config(None, [*overrides, "unfinished=cut"])


def test_opd_off_policy_responses_follow_the_same_rule(tiny_model, tmp_path):
    data = teacher_file(tmp_path / "t.jsonl")
    tokenizer = load_tokenizer(str(tiny_model))
    overrides = ["method=opd", f"student={tiny_model}", f"teacher={tiny_model}", f"data={data}", f"out_dir={tmp_path / 'out'}",
                 "batch_size=1", "micro_batch_size=1", "on_policy_ratio=0"]
    opd = OPD(load_config(None, overrides), tokenizer)
    assert [r[-1] == tokenizer.eos_token_id for r in opd.responses] == [True, False, False]
    assert len(OPD(load_config(None, [*overrides, "unfinished=drop"]), tokenizer).responses) == 1
    on_policy = OPD(load_config(None, [*overrides[:-1], "unfinished=drop"]), tokenizer)
    assert len(on_policy.responses) == 3, "on-policy steps never read the data's responses, so nothing is dropped"


def generator_weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step-{step:06d}" / "model.safetensors"))


@pytest.mark.parametrize("policy", ["keep", "mask"])
def test_gad_masks_the_policy_loss_of_cut_samples(policy, tiny_model, selfinstruct, tmp_path):
    # One-token rollouts of a random 384-token model are all cut (no EOS). With the generator untouched in warm-up
    # (d_only_steps = warmup_steps, so AdamW has no momentum) and no KL, a masked adversarial step has a zero gradient.
    out = tmp_path / policy
    train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, max_response_tokens=1, d_only_steps=2, kl_coef=0,
                                          truncated_rollouts=policy, keep_checkpoints=4)))
    adversarial = [line for line in metric_lines(out) if line["stage"] == 1]
    assert adversarial and all(line["truncated"] == 1.0 for line in adversarial)
    before, after = generator_weights(out, 2), generator_weights(out, 4)
    unchanged = all(torch.equal(before[k], after[k]) for k in before)
    assert unchanged == (policy == "mask"), f"{policy}: the generator {'moved' if not unchanged else 'did not move'}"
