"""CCOPD as an OPD recipe: the sharding rule of examples/ccopd/make_sharded.py, and what the student and the teacher
actually read during a training step (the student the sharded conversation, the teacher the clean prompt, both
the same response tokens), observed at the models' forward calls."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from opdistill.config import load_config
from opdistill.data import load_records, render_prompt, teacher_messages
from opdistill.methods import train
from opdistill.models import load_tokenizer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ccopd" / "make_sharded.py"


def sharding_module():
    spec = importlib.util.spec_from_file_location("make_sharded", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sharding_rule_keeps_the_evidence_and_alternates_turns():
    m = sharding_module()
    instruction = "You get a list. Sort it! Then explain why? Keep it short."
    assert m.shards(instruction, "3, 1, 2", max_shards=4) == ["You get a list.", "Sort it!", "Then explain why? Keep it short.", "Input: 3, 1, 2"]
    assert m.shards(instruction, "", max_shards=2) == ["You get a list.", "Sort it! Then explain why? Keep it short."]
    assert m.shards("Only one sentence.", "", max_shards=4) == ["Only one sentence."]
    assert m.sharded_record({"instruction": "Only one sentence.", "input": ""}, 4) is None  # nothing to shard
    record = m.sharded_record({"instruction": instruction, "input": "3, 1, 2"}, 3)
    roles = [turn["role"] for turn in record["messages"]]
    assert roles == ["user", "assistant", "user", "assistant", "user"]
    assert all(turn["content"] == m.ACKNOWLEDGEMENT for turn in record["messages"] if turn["role"] == "assistant")
    # Same evidence: the shards carry exactly the clean prompt's words, in order.
    shard_words = " ".join(turn["content"] for turn in record["messages"] if turn["role"] == "user").split()
    assert shard_words == record["teacher_messages"][0]["content"].split()
    assert record["teacher_messages"] == [{"role": "user", "content": f"{instruction}\n\nInput: 3, 1, 2"}]


def test_the_student_reads_the_shards_and_the_teacher_the_clean_prompt_on_the_same_response_tokens(tiny_model, selfinstruct,
                                                                                                  tmp_path, monkeypatch):
    m = sharding_module()
    data, out = tmp_path / "sharded.jsonl", tmp_path / "run"
    m.main(["--source", str(selfinstruct), "--out", str(data), "--max-shards", "3"])
    records = load_records(f"{data}[:4]")
    tokenizer = load_tokenizer(str(tiny_model))
    sharded = [render_prompt(tokenizer, r.messages) for r in records]
    clean = [render_prompt(tokenizer, teacher_messages(r)) for r in records]
    assert all(s != c for s, c in zip(sharded, clean))

    calls = {"student": [], "teacher": []}

    def record_inputs(module, args, kwargs):
        ids, mask = kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask")
        if ids is None or mask is None or ids.shape != mask.shape:  # a cached decode step of the sampler
            return
        rows = [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]
        if module.training:  # the student's loss forward (the engine puts it in train mode)
            calls["student"].append(rows)
        elif not any(p.requires_grad for p in module.parameters()):  # the frozen teacher
            calls["teacher"].append(rows)

    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.forward

    def forward(self, *args, **kwargs):  # every forward of every tiny Llama in the run passes here
        record_inputs(self, args, kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    train(load_config(None, ["method=opd", f"student={tiny_model}", f"data={data}[:4]", f"out_dir={out}", "precision=fp32",
                             "max_response_tokens=6", "batch_size=4", "micro_batch_size=4", "max_steps=1", "checkpoint_every=0",
                             "max_prompt_tokens=1024"]))
    (student_rows,), (teacher_rows,) = calls["student"], calls["teacher"]
    assert len(student_rows) == len(teacher_rows) == 4
    for s_row, t_row in zip(student_rows, teacher_rows):
        s_prompt = next(p for p in sharded if s_row[: len(p)] == p)  # the student's context is a sharded conversation...
        t_prompt = next(p for p in clean if t_row[: len(p)] == p)  # ...the teacher's the clean prompt of the same record
        assert sharded.index(s_prompt) == clean.index(t_prompt)
        assert s_row[len(s_prompt):] == t_row[len(t_prompt):] and len(s_row) > len(s_prompt)  # the same sampled response
        decoded = tokenizer.decode(s_prompt)
        assert decoded.count("<|im_start|>user") >= 2 and "Got it. Please go on." in decoded
        assert tokenizer.decode(t_prompt).count("<|im_start|>user") == 1 and "Got it." not in tokenizer.decode(t_prompt)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["loss"] > 0
