"""Build a run's white-box teachers from its config: local models, remote servers, the student's own weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..config import RunConfig, TeacherOptions, teacher_spec
from ..data import Record
from ..errors import DataError
from ..models import load_model, load_tokenizer, shared_vocabulary_size
from .api import RetryPolicy
from .logprob import AdapterOffTeacher, LocalTeacher, LogProbTeacher, TeacherSet
from .remote import RemoteTeacher



def record_teacher(record: Record, teachers: dict[str, str]) -> str:
    """The name of the teacher a record asks for ("" for the default), checked against the config's `teachers`."""
    name = record.meta.get("teacher") or ""
    if not isinstance(name, str):
        raise DataError(f"{record.source}: field `teacher` must be a string naming one of the config's teachers")
    if name and name not in teachers:
        known = ", ".join(sorted(teachers)) or "none are configured"
        raise DataError(f"{record.source}: the record names teacher {name!r}, which the config's `teachers` lacks ({known})",
                        f"add `teachers: {{{name}: <model or URL#model>}}` to the config, or fix the record")
    return name


def cache_path(config: TeacherOptions, out_dir: Path, rank: int, world_size: int, name: str) -> Path:
    """Where a remote teacher's scored rows are kept: one file per teacher and per process (each scores its own rows)."""
    base = Path(config.teacher_cache) if config.teacher_cache else out_dir / "teacher_cache.jsonl"
    suffix = (f".{name}" if name else "") + (f".rank{rank}" if world_size > 1 else "")
    return base.with_name(base.stem + suffix + base.suffix) if suffix else base


def build_teachers(config: TeacherOptions, tokenizer: Any, get_student: Callable[[], Any], student_vocab: int, dtype: torch.dtype,
                   device: torch.device, out_dir: Path, rank: int = 0, world_size: int = 1, needs_default: bool = True,
                   teacher_tokenizers: dict[str, Any] | None = None) -> TeacherSet:
    """The default teacher (when some record uses it) and every named one. `teacher_tokenizers` (cross-tokenizer runs:
    teacher name -> its tokenizer) lets a teacher keep its own vocabulary: it scores its own token ids."""
    cross = teacher_tokenizers or {}

    def build(model: str, url: str, name: str) -> LogProbTeacher:
        if url:
            policy = RetryPolicy(max_attempts=config.teacher_max_attempts, timeout=config.teacher_timeout)
            # Another vocabulary's ids need no bound by the student's: only each actual token's log-prob is read.
            vocab = 2**31 - 1 if name in cross else student_vocab
            return RemoteTeacher(url, model, k=max(config.top_k, 1), vocab=vocab, api_key_env=config.teacher_api_key_env,
                                 policy=policy, concurrency=config.teacher_concurrency, seed=config.seed,
                                 cache_path=cache_path(config, out_dir, rank, world_size, name), run_dir=out_dir,
                                 cache_max_bytes=config.teacher_cache_max_bytes)
        if name in cross:
            return own_vocabulary_teacher(model, config, cross[name], dtype, device)
        return local_teacher(model, config, tokenizer, student_vocab, dtype, device)

    default: LogProbTeacher | None = None
    if needs_default:
        if config.teacher_url:
            default = build(config.teacher_model, config.teacher_url, "")
        elif "" in cross and default_teacher_model(config):  # a local teacher keeping its own vocabulary
            default = build(default_teacher_model(config), "", "")
        else:
            default = default_local_teacher(config, tokenizer, get_student, student_vocab, dtype, device)
    named = {name: build(*teacher_spec(spec, f"teachers.{name}"), name) for name, spec in config.teachers.items()}
    return TeacherSet(default, named)


def default_teacher_model(config: Any) -> str:  # any config with teacher, lora_r and student (OPD's, KD's)
    """The model a run's default local teacher loads: `teacher:`, else the student's own starting weights, which with
    LoRA need no load at all ("": the student with its adapters switched off, AdapterOffTeacher)."""
    if config.teacher:
        return config.teacher
    return "" if config.lora_r else config.student


def default_local_teacher(config: Any, tokenizer: Any, get_student: Callable[[], Any], student_vocab: int, dtype: torch.dtype,
                          device: torch.device) -> LocalTeacher:
    """The default local teacher (`default_teacher_model`): a frozen model, or the LoRA student's own base weights."""
    model = default_teacher_model(config)
    if not model:
        return AdapterOffTeacher(get_student, tokenizer.pad_token_id, config.micro_batch_size)
    return local_teacher(model, config, tokenizer, student_vocab, dtype, device)


def local_teacher(name: str, config: RunConfig, tokenizer: Any, student_vocab: int, dtype: torch.dtype, device: torch.device) -> LocalTeacher:
    """A frozen local model in `dtype` that shares the student's tokenizer (checked)."""
    teacher_tokenizer = load_tokenizer(name, chat_template=config.chat_template, trust_remote_code=config.trust_remote_code)
    model = load_model(name, dtype=dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    vocab = shared_vocabulary_size(tokenizer, teacher_tokenizer, student_vocab, model.get_output_embeddings().weight.shape[0], name)
    return LocalTeacher(model.to(device).eval().requires_grad_(False), tokenizer.pad_token_id, vocab, name=name,
                        micro_batch_size=config.micro_batch_size)


def own_vocabulary_teacher(name: str, config: RunConfig, teacher_tokenizer: Any, dtype: torch.dtype, device: torch.device) -> LocalTeacher:
    """A frozen local model that keeps its own tokenizer (cross_tokenizer): its pad id, every column of its output layer."""
    model = load_model(name, dtype=dtype, trust_remote_code=config.trust_remote_code, allow_pickle=config.allow_pickle)
    return LocalTeacher(model.to(device).eval().requires_grad_(False), teacher_tokenizer.pad_token_id, None, name=name,
                        micro_batch_size=config.micro_batch_size)
