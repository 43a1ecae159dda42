"""LoRA for the student and the discriminator: training continues past GAD's reference save, adapter-only
saving reloads onto the base, and the discriminator is saved merged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.discriminator import WEIGHTS, load_discriminator
from opdistill.errors import CheckpointError
from opdistill.methods import train
from opdistill.models import load_model

from conftest import SELFINSTRUCT


def run(method: str, model: Path, out: Path, **extra) -> dict:
    values = {"method": method, "student": str(model), "data": f"{SELFINSTRUCT}[:16]", "out_dir": str(out), "lr": "1e-2",
              "precision": "fp32", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "micro_batch_size": 4,
              "checkpoint_every": 0, "lora_r": 4, **extra}
    return train(load_config(None, [f"{k}={v}" for k, v in values.items()]))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_gad_with_lora_student_and_discriminator(tiny_model, tmp_path):
    out = tmp_path / "gad"
    summary = run("gad", tiny_model, out, d_lr="1e-2", n_samples=2, warmup_steps=2, d_only_steps=1, max_steps=2, d_lora_r=4,
                  micro_batch_size=8, rollout_batch_size=8, lora_save="both")
    assert set(summary) >= {"student", "student-adapter", "discriminator"}
    merged = load_file(str(out / "student" / "model.safetensors"))
    reference = load_file(str(out / "reference" / "model.safetensors"))
    base = load_file(str(tiny_model / "model.safetensors"))
    # The adapters kept training after the reference (end of warm-up) was saved from them.
    assert max_difference(merged, reference) > 1e-4 and max_difference(reference, base) > 1e-4
    # The adapter alone, put back on its base, is the merged student.
    adapter_files = {p.name for p in (out / "student-adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= adapter_files and "config.json" not in adapter_files
    reloaded = {k: v for k, v in load_model(str(out / "student-adapter")).state_dict().items() if k in merged}
    assert max_difference(merged, reloaded) < 1e-5
    # The discriminator is saved merged: plain backbone keys, a trained head, and it reloads.
    state = load_file(str(out / "discriminator" / WEIGHTS))
    assert not any("lora" in k for k in state) and float(state["head.weight"].abs().sum()) > 0
    disc = load_discriminator(str(out / "discriminator"))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(disc(ids, torch.ones_like(ids))).all()


def test_seqkd_and_opd_save_adapter_only_when_asked(tiny_model, tmp_path):
    run("seqkd", tiny_model, tmp_path / "seqkd", max_steps=2, lora_save="adapter")
    student = tmp_path / "seqkd" / "student"
    assert (student / "adapter_config.json").is_file() and not (student / "config.json").exists()
    assert json.loads((student / "adapter_config.json").read_text())["r"] == 4
    model = load_model(str(student))  # merged onto the base named in adapter_config.json
    assert not hasattr(model, "peft_config")
    run("opd", tiny_model, tmp_path / "opd", max_steps=2, teacher_system="Be brief.", temperature=1.0, rollout_batch_size=4)
    assert (tmp_path / "opd" / "student" / "config.json").is_file()  # default: merged


def test_bf16_sampling_copy_of_a_lora_student_follows_the_adapters(tiny_model, tmp_path):
    """Under bf16 the sampler samples from a bf16 copy of the PEFT model; after training steps it must hold the
    trained adapters (sync copies only what trains: the LoRA weights), and the frozen base stays as loaded. At the end
    the student itself is merged (no copy of its base is made to save it), so the saved adapter is the reference."""
    from conftest import build_tiny_model
    from opdistill.engine import Engine
    from opdistill.methods import load_student
    from opdistill.methods.opd import OPD
    from opdistill.models import load_tokenizer

    teacher = build_tiny_model(tmp_path / "teacher", seed=7)  # other weights: a real divergence to reduce
    config = load_config(None, [f"{k}={v}" for k, v in {
        "method": "opd", "student": str(tiny_model), "teacher": str(teacher), "data": f"{SELFINSTRUCT}[:16]", "out_dir": str(tmp_path / "opd"), "lr": "1e-2",
        "precision": "bf16", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "micro_batch_size": 4, "checkpoint_every": 0,
        "lora_r": 4, "max_steps": 2, "lora_save": "both"}.items()])
    tokenizer = load_tokenizer(config.student)
    method = OPD(config, tokenizer)
    engine = Engine(config, load_student(config), tokenizer, method.total_steps)
    engine.fit(method)
    student = engine.accelerator.unwrap_model(engine.model)
    copy = engine.sampler.policy
    assert engine.sampler.owns_copy and copy is not student
    assert not any("lora_" in n for n, _ in student.named_parameters()), "the student was merged in place to be saved"
    trained = load_file(str(tmp_path / "opd" / "student-adapter" / "adapter_model.safetensors"))  # fp32, as trained
    assert trained and all("lora_" in n for n in trained)
    mine = {n.replace(".default", ""): p for n, p in copy.named_parameters() if "lora_" in n}
    assert mine.keys() == trained.keys()
    for name, parameter in trained.items():
        assert mine[name].dtype == torch.bfloat16
        torch.testing.assert_close(mine[name], parameter.to(torch.bfloat16), rtol=0, atol=0)
    assert any(float(p.abs().max()) > 0 for n, p in trained.items() if "lora_B" in n), "the adapters trained"


def test_a_lora_checkpoint_holds_only_the_trained_weights_and_resumes_exactly(tiny_model, selfinstruct, tmp_path):
    from conftest import build_tiny_model
    from test_engine import assert_same_weights, cli_train, kill_9_then_resume, seqkd_overrides

    settings = dict(max_steps=6, batch_size=4, micro_batch_size=2, checkpoint_every=2, keep_checkpoints=2, lora_r=4, lr="1e-2")
    straight = tmp_path / "straight"
    subprocess.run(cli_train(seqkd_overrides(tiny_model, selfinstruct, straight, **settings)), check=True, capture_output=True, timeout=300)
    # The base weights are frozen, so the checkpoint leaves them out: only adapter weights are written.
    saved = load_file(str(straight / "checkpoints" / "step-000006" / "model.safetensors"))
    assert saved and all("lora_" in name for name in saved)
    out = tmp_path / "killed"
    kill_9_then_resume(cli_train(seqkd_overrides(tiny_model, selfinstruct, out, **settings)), out, step=2)
    assert_same_weights(straight, out)
    # Other base weights under the same adapters are refused: the checkpoint no longer carries the base.
    other_base = build_tiny_model(tmp_path / "other-base", seed=9)
    with pytest.raises(CheckpointError, match="frozen weights"):
        train(load_config(None, seqkd_overrides(other_base, selfinstruct, straight, **{**settings, "max_steps": 8})))
    # A full-weight run cannot resume from adapters alone: the error names what is missing.
    with pytest.raises(CheckpointError, match="model.safetensors missing"):
        train(load_config(None, seqkd_overrides(tiny_model, selfinstruct, straight, **{**settings, "lora_r": 0, "max_steps": 8})))
