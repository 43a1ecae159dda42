"""Models and tokenizers: loading, refusing what should not load, atomic saving, LoRA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from opdistill.errors import ModelError
from opdistill.models import apply_lora, load_model, load_tokenizer, save_pretrained_atomic

from conftest import CHATML


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_load_model_and_tokenizer(tiny_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model))
    assert tokenizer.chat_template
    assert tokenizer.pad_token_id is not None
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    out = logits(model, tokenizer("hello world")["input_ids"])
    assert out.shape[-1] == model.config.vocab_size and torch.isfinite(out).all()


def test_load_model_dtype(tiny_model: Path) -> None:
    model = load_model(str(tiny_model), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_save_pretrained_atomic_roundtrip(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    model = load_model(str(tiny_model))
    with torch.no_grad():  # make the weights differ from the fixture's so we know what was written
        for p in model.parameters():
            p.add_(0.01)
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    assert not (tmp_path / "saved.tmp").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    same_weights(model, loaded)
    ids = tokenizer("the quick brown fox")["input_ids"]
    assert torch.equal(logits(model, ids), logits(loaded, ids))
    reloaded_tok = AutoTokenizer.from_pretrained(str(out))
    assert reloaded_tok("the quick brown fox")["input_ids"] == ids
    assert reloaded_tok.chat_template == tokenizer.chat_template
    # opdistill's own loaders accept the saved directory too
    same_weights(model, load_model(str(out)))


def test_save_pretrained_atomic_replaces_existing(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    target = tmp_path / "student"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    model = load_model(str(tiny_model))
    save_pretrained_atomic(model, None, target)
    assert not (target / "stale.txt").exists()
    same_weights(model, AutoModelForCausalLM.from_pretrained(str(target)))


def test_directory_without_config_is_not_a_model(tmp_path: Path) -> None:
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")
    for loader in (load_model, load_tokenizer):
        with pytest.raises(ModelError) as info:
            loader(str(empty))
        assert "is not a model" in str(info.value)
        assert str(empty) in str(info.value)


def test_missing_path_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ModelError):
        load_model(str(tmp_path / "missing.gguf"))


def copy_without_chat_template(tiny_model: Path, dest: Path) -> Path:
    shutil.copytree(tiny_model, dest)
    config_path = dest / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    for jinja in dest.glob("*.jinja"):
        jinja.unlink()
    (dest / "chat_template.json").unlink(missing_ok=True)
    return dest


def test_tokenizer_without_chat_template(tiny_model: Path, tmp_path: Path) -> None:
    bare = copy_without_chat_template(tiny_model, tmp_path / "bare")
    with pytest.raises(ModelError) as info:
        load_tokenizer(str(bare))
    assert "chat template" in str(info.value)
    assert "chat_template" in (info.value.fix or "")

    messages = [{"role": "user", "content": "hi"}]
    expected = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    from_text = load_tokenizer(str(bare), chat_template=CHATML)
    assert from_text.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected

    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML, encoding="utf-8")
    from_file = load_tokenizer(str(bare), chat_template=str(template_file))
    assert from_file.chat_template == CHATML
    assert from_file.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_supplied_chat_template_overrides_existing(tiny_model: Path) -> None:
    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    tokenizer = load_tokenizer(str(tiny_model), chat_template=template)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    assert text == "[user]x[assistant]"


def test_pickle_checkpoint_refused_unless_allowed(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    pickled = tmp_path / "pickled"
    original.save_pretrained(pickled)
    # transformers 5 always writes safetensors, so make the pickle-only checkpoint by hand
    for weights in pickled.glob("*.safetensors"):
        weights.unlink()
    torch.save(original.state_dict(), pickled / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny_model / name).exists():
            shutil.copy(tiny_model / name, pickled / name)
    assert (pickled / "pytorch_model.bin").is_file()
    assert not list(pickled.glob("*.safetensors"))

    with pytest.raises(ModelError) as info:
        load_model(str(pickled))
    assert str(pickled) in str(info.value)
    assert "allow_pickle" in (info.value.fix or "")

    loaded = load_model(str(pickled), allow_pickle=True)
    same_weights(original, loaded)


def test_apply_lora_and_merge_on_save(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(str(tiny_model))
    base = load_model(str(tiny_model))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    assert all("lora_" in name for name in trainable), trainable
    assert not any("lora_" in name for name in frozen)
    # all-linear wraps the attention and MLP projections
    assert any("q_proj" in name for name in trainable) and any("down_proj" in name for name in trainable)

    # make the adapters non-zero so merging changes the weights
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = tokenizer("merge the adapters please")["input_ids"]
    expected = logits(model, ids)

    out = save_pretrained_atomic(model, tokenizer, tmp_path / "merged")
    assert not (out / "adapter_config.json").exists()
    assert not (out / "adapter_model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert not any("lora" in name for name in loaded.state_dict())
    assert set(loaded.state_dict()) == set(base_state)
    assert torch.allclose(logits(loaded, ids), expected, atol=1e-5)
    changed = [k for k in base_state if not torch.equal(base_state[k], loaded.state_dict()[k])]
    assert any("q_proj" in k for k in changed)


def test_apply_lora_with_module_list(tiny_model: Path) -> None:
    model = apply_lora(load_model(str(tiny_model)), r=2, alpha=4, dropout=0.0, target_modules="q_proj, v_proj")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all("lora_" in n and ("q_proj" in n or "v_proj" in n) for n in trainable)
    assert any("v_proj" in n for n in trainable)


def test_bf16_counts_as_fast_only_where_the_cpu_multiplies_it_natively() -> None:
    """oneDNN says yes on any AVX-512 CPU; without AVX512-BF16 or AMX its bf16 matmul is emulated and slower than fp32
    (measured 3x on an AVX-512 Xeon), so `auto` precision must pick fp32 there."""
    from opdistill.models import cpu_flags, native_bf16

    avx512_only = {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
    assert not native_bf16(True, avx512_only)
    assert native_bf16(True, avx512_only | {"avx512_bf16"})
    assert native_bf16(True, {"avx2", "amx_bf16", "amx_tile"})
    assert not native_bf16(False, {"avx512_bf16"})
    assert native_bf16(True, None)  # no /proc/cpuinfo (macOS, Windows): oneDNN's answer stands
    flags = cpu_flags()
    assert flags is None or all(flag and " " not in flag for flag in flags)  # the real file parses into single flags


def test_bf16_counts_as_fast_only_where_it_measures_clearly_faster_than_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU can list avx512_bf16 and still run bf16 slower than fp32 (a Xeon VM with AMX hidden: 1.4x slower), so
    where the flags allow bf16 a probe times both and bf16 must win by a quarter."""
    from opdistill import models
    from opdistill.models import bf16_is_fast, bf16_pays_off, compute_dtype, matmul_seconds, resolve_precision

    assert bf16_pays_off(fp32_seconds=1.0, bf16_seconds=0.4)  # native bf16, as on an AMD EPYC
    assert bf16_pays_off(fp32_seconds=1.0, bf16_seconds=0.75)
    assert not bf16_pays_off(fp32_seconds=1.0, bf16_seconds=0.9)  # a near tie keeps fp32's precision
    assert not bf16_pays_off(fp32_seconds=1.0, bf16_seconds=1.4)

    # matmul_seconds reports the fastest timed repeat, the warm-up untimed: a fake clock gives repeats of 3, 1, 2 s.
    with monkeypatch.context() as patch:
        clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])  # exactly two readings per timed repeat, none for the warm-up
        patch.setattr(models.time, "perf_counter", lambda: next(clock))
        assert matmul_seconds(torch.float32, size=(2, 3, 4), repeats=3) == 1.0

    # bf16_is_fast's decision follows the probe's numbers (injected here, so no wall clock is involved), on the CPU
    # path even on a GPU machine, and the probe runs once per process: every stage of a run gets the same answer.
    timings: dict[torch.dtype, float] = {}
    flags: set[str] = set()
    probed: list[torch.dtype] = []

    def probe(dtype: torch.dtype, *args: object, **kwargs: object) -> float:
        probed.append(dtype)
        return timings[dtype]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # oneDNN says yes, as on any AVX-512 CPU (raising=False: a torch build without the op has nothing to replace)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(models, "cpu_flags", lambda: flags)
    monkeypatch.setattr(models, "matmul_seconds", probe)
    try:
        for fp32, bf16, flag, fast in [(1.0, 0.5, "avx512_bf16", True), (1.0, 0.9, "avx512_bf16", False), (1.0, 0.5, "avx512f", False)]:
            bf16_is_fast.cache_clear()
            timings.update({torch.float32: fp32, torch.bfloat16: bf16})
            flags.clear()
            flags.add(flag)
            probed.clear()
            assert bf16_is_fast() is fast, (fp32, bf16, flag)
            # without a native bf16 flag there is nothing to measure; with one, both dtypes are timed once
            assert probed == ([torch.float32, torch.bfloat16] if flag == "avx512_bf16" else []), (fp32, bf16, flag)
            timings.update({torch.float32: 1.0, torch.bfloat16: 0.1 if not fast else 5.0})  # a later probe would flip it
            assert bf16_is_fast() is fast and resolve_precision("auto") == ("bf16" if fast else "fp32")
            assert compute_dtype("auto") == (torch.bfloat16 if fast else torch.float32)
            assert len(probed) == (2 if flag == "avx512_bf16" else 0), "measured once per process, not once per call"
    finally:
        bf16_is_fast.cache_clear()  # the injected answer must not outlive this test: the next caller measures for real
