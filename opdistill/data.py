"""Prompt/response records: loading (JSONL, Parquet, `datasets` dir, built-in), validation, chat rendering, masks.

A record is a conversation that ends with a user turn (`messages`, or `prompt` with optional `system`)
and an optional teacher `response`; or, for the methods that accept it (`plain_text=True`: kd), a plain text
(`text` and neither `prompt` nor `messages`) trained on as a corpus, with no chat template. Every other field is
kept in `meta`. Validation collects every bad record and names the file, line and field of each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    import torch

from .errors import DataError, NothingToTrainOn
from .seeds import mix_seed

ROLES = ("system", "user", "assistant")
MAX_REPORTED = 20  # how many bad records one error message lists


@dataclass
class Record:
    """One prompt (a chat that ends with a user turn), an optional teacher response, and everything else."""

    messages: list[dict[str, str]]
    response: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:line", for messages
    text: str | None = None  # a plain-text record (no chat: `messages` is empty); trained on every token after the first

    @property
    def finished(self) -> bool:
        """Whether the teacher's response ended on its own. False when the record says the writer stopped at a token
        limit: a `finished: false` field, or `meta.finish_reason: length` (written by `opdistill collect`, and the
        OpenAI-style APIs' own value). Such a text never gains an EOS in training (response_ids)."""
        if isinstance(self.meta.get("finished"), bool):
            return self.meta["finished"]
        info = self.meta.get("meta")
        return not (isinstance(info, dict) and info.get("finish_reason") == "length")

    def with_system(self, system: str) -> list[dict[str, str]]:
        """The conversation as a privileged reader sees it: `system` first in the system prompt, followed by
        the record's own system prompt if it has one. An empty `system` leaves the conversation as it is."""
        if not system:
            return self.messages
        if self.messages[0]["role"] == "system":
            own = self.messages[0]["content"]
            return [{"role": "system", "content": f"{system}\n\n{own}" if own else system}, *self.messages[1:]]
        return [{"role": "system", "content": system}, *self.messages]


def teacher_messages(record: Record, system: str = "", template: str = "") -> list[dict[str, str]]:
    """The conversation a privileged teacher sees (context distillation): the record's own
    `teacher_messages` field when it has one; else its messages with `system` put first in the system
    prompt and the last user turn rewritten by `template`, where {prompt} stands for the original text."""
    own = record.meta.get("teacher_messages")
    if own is not None:
        messages = _check_messages(own, f"{record.source}: field `teacher_messages`")
        if messages[-1]["role"] != "user":
            raise DataError(f"{record.source}: field `teacher_messages` must end with a user turn")
        return messages
    messages = [dict(m) for m in record.with_system(system)]
    if template:
        messages[-1]["content"] = template.replace("{prompt}", messages[-1]["content"])
    return messages


# ---------------------------------------------------------------- loading

_SLICE = re.compile(r"^(?P<path>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_slice(spec: str) -> tuple[str, slice]:
    """'file.jsonl[10:20]' -> ('file.jsonl', slice(10, 20)); no brackets -> the whole file."""
    match = _SLICE.match(spec)
    if not match:
        return spec, slice(None)
    to_int = lambda text: int(text) if text else None  # noqa: E731
    return match["path"], slice(to_int(match["start"]), to_int(match["stop"]))


def _raw_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(line or row number starting at 1, decoded object) for every row of a file or datasets dir."""
    if path.is_dir():
        if not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
            raise DataError(f"{path} is a directory but not a saved `datasets` dataset", "pass a .jsonl or .parquet file, or a directory written by Dataset.save_to_disk")
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"{path} holds several splits ({', '.join(loaded)})", f"pass one split directory, e.g. {path}/{next(iter(loaded))}")
        yield from enumerate(loaded, start=1)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        yield from enumerate(table.to_pylist(), start=1)
    else:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    # utf-8-sig: tolerate a byte-order mark at the start of the file
                    yield number, json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
                except UnicodeDecodeError:
                    yield number, _BadLine("the line is not UTF-8 text (binary data?)")
                except json.JSONDecodeError as err:
                    yield number, _BadLine(f"not valid JSON ({err.msg} at column {err.colno})")
                except (ValueError, RecursionError) as err:  # absurd nesting or integers past Python's limit
                    yield number, _BadLine(f"not usable JSON ({type(err).__name__}: {str(err)[:80]})")


@dataclass
class _BadLine:
    reason: str


def parse_row(row: Any, where: str, require_response: bool = False, plain_text: bool = False) -> Record:
    """Validate one decoded row and make a Record; raises DataError naming `where` and the field. A row with `text` and
    neither `prompt` nor `messages` is a plain-text record: accepted only with `plain_text` (the method trains on it)."""
    if isinstance(row, _BadLine):
        raise DataError(f"{where}: {row.reason}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: a record must be a JSON object, got {type(row).__name__}")
    if row.get("text") is not None and row.get("messages") is None and row.get("prompt") is None:
        return _plain_text_record(row, where, plain_text)
    meta = {k: v for k, v in row.items() if k not in ("messages", "prompt", "system", "response")}
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field `system` must be a string, got {type(system).__name__}")
    response = row.get("response")
    if response is not None and not isinstance(response, str):
        raise DataError(f"{where}: field `response` must be a string, got {type(response).__name__}")
    if "messages" in row and row["messages"] is not None:
        messages = _check_messages(row["messages"], where)
        if messages[-1]["role"] == "assistant":
            if response is not None:
                raise DataError(f"{where}: the conversation ends with an assistant turn and the record also has `response`", "keep one of them")
            response = messages.pop()["content"]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: field `messages` must end with a user turn (optionally followed by the assistant response)")
    elif "prompt" in row and row["prompt"] is not None:
        prompt = row["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: field `prompt` must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise DataError(f"{where}: field `prompt` is empty")
        messages = [{"role": "user", "content": prompt}]
    else:
        fields = "`text`, `prompt` nor `messages`" if plain_text else "`messages` nor `prompt`"
        plain = " (or \"text\": \"...\" for a plain text)" if plain_text else ""
        raise DataError(f"{where}: the record has neither {fields}",
                        f"add \"prompt\": \"...\" or \"messages\": [{{\"role\": \"user\", \"content\": \"...\"}}]{plain}")
    if system is not None:
        if messages[0]["role"] == "system":
            raise DataError(f"{where}: the record has both `system` and a system message in `messages`", "keep one of them")
        messages = [{"role": "system", "content": system}, *messages]
    if response is not None and not response.strip():
        raise DataError(f"{where}: field `response` is empty")
    if require_response and response is None:
        raise DataError(f"{where}: the record has no `response` (teacher text), which training needs", "collect responses first with `opdistill collect`")
    return Record(messages=messages, response=response, meta=meta, source=where)


def _plain_text_record(row: dict[str, Any], where: str, plain_text: bool) -> Record:
    if not plain_text:
        raise DataError(f"{where}: a plain-text record (`text`, no `prompt` or `messages`), which this method cannot train on: "
                        "it needs a prompt (to sample from, or to render for a teacher)",
                        "train plain text with method: kd, or give the record a `prompt` (and a `response`)")
    text = row["text"]
    if not isinstance(text, str):
        raise DataError(f"{where}: field `text` must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where}: field `text` is empty")
    if row.get("response") is not None or row.get("system") is not None:
        raise DataError(f"{where}: a plain-text record (`text`) also has `response` or `system`, which only chat records use",
                        "keep `text` alone, or make it a chat record: `prompt` + `response`")
    return Record(messages=[], meta={k: v for k, v in row.items() if k != "text"}, source=where, text=text)


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: field `messages` must be a list of {{role, content}} objects, got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field `messages` is empty")
    checked = []
    for i, message in enumerate(messages):
        here = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{here} must be an object with `role` and `content`, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{here}.role is {role!r}", f"use one of: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{here}.content must be a string, got {type(content).__name__}")
        if role != "system" and not content.strip():
            raise DataError(f"{here}.content is empty")
        if role == "system" and i != 0:
            raise DataError(f"{here}: a system message may only come first")
        checked.append({"role": role, "content": content})
    return checked


def builtin_prompts_path() -> Path:
    return Path(str(resources.files("opdistill") / "prompts" / "builtin.jsonl"))


def load_records(spec: str, require_response: bool = False, built_by: str = "", plain_text: bool = False) -> list[Record]:
    """Load and validate records from `spec` (a path, `path[a:b]`, or builtin:train / builtin:heldout).

    Every bad record is reported (up to MAX_REPORTED) in one DataError. `built_by` is the command that makes the
    file (a config's `data_built_by`): a missing file's error says to run it. `plain_text` accepts plain-text records
    (`text`; a config's `accepts_plain_text()`); without it they are errors that name the method that trains on them.
    """
    path_text, rows = split_slice(spec)
    split = None
    if path_text.startswith("builtin:"):
        split = path_text.split(":", 1)[1]
        if split not in ("train", "heldout", "all"):
            raise DataError(f"unknown built-in prompt set {path_text!r}", "use builtin:train, builtin:heldout or builtin:all")
        path = builtin_prompts_path()
    else:
        path = Path(path_text)
    if not path.exists():
        if built_by:
            raise DataError(f"data file {path} does not exist; the config's `data_built_by` names the command that builds it",
                            f"run `{built_by}` first (from the repository root), or point `data` at an existing file")
        raise DataError(f"data file {path} does not exist", "pass a .jsonl, .parquet or saved datasets directory")
    records: list[Record] = []
    problems: list[str] = []
    for number, row in _raw_rows(path):
        if split not in (None, "all") and isinstance(row, dict) and row.get("split") != split:
            continue
        try:
            records.append(parse_row(row, f"{path}:{number}", require_response, plain_text))
        except DataError as err:
            specific = err.fix != DataError.default_fix  # the shared default is said once, below
            problems.append(err.message + (f" (fix: {err.fix})" if specific else ""))
    if problems:
        shown = "\n  ".join(problems[:MAX_REPORTED])
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} bad record(s) in {path}:\n  {shown}{more}", "fix or remove these records")
    records = records[rows]
    if not records:
        raise DataError(f"{spec}: no records", "pass a file with at least one record")
    return records


# ---------------------------------------------------------------- tokenising


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat up to and including the assistant header (the generation prompt)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def response_ids(tokenizer: Any, response: str, max_tokens: int, finished: bool = True) -> list[int]:
    """Response token ids, ending with EOS only when the response ended (`finished`) and fits max_tokens with it.

    A text the teacher stopped at its own limit, or one cut here, gets no EOS: training on it must not teach the
    student to stop where the teacher did not.
    """
    ids = tokenizer(response.strip(), add_special_tokens=False)["input_ids"]
    if finished:
        ids = ids + [tokenizer.eos_token_id]
    return ids[:max_tokens]


def ends_with_eos(ids: list[int], tokenizer: Any) -> bool:
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """A plain text's token ids. The tokenizer adds its special tokens as for any plain text (a BOS where the model
    has one); no chat template, and no EOS: a corpus text is not a turn that ends, and an instruct tokenizer's EOS
    is its end-of-turn token."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


@dataclass
class Example:
    """A tokenised training example: prompt ids then response ids; only the response is trained on."""

    prompt_ids: list[int]
    response_ids: list[int]


@dataclass
class TokenizeReport:
    total: int = 0
    truncated: int = 0  # over-long prompts cut
    skipped: int = 0  # over-long prompts dropped (overlong: skip)
    unfinished: int = 0  # responses without an EOS: the teacher stopped at its limit, or cut at max_response_tokens
    dropped: int = 0  # unfinished responses dropped (unfinished: drop)
    texts: int = 0  # plain-text records
    texts_cut: int = 0  # plain texts longer than max_response_tokens + 1 tokens, cut
    texts_short: int = 0  # plain texts of one token (nothing to predict), left out

    def summary(self) -> str:
        kept = "kept without EOS" if not self.dropped else "dropped"
        texts = (f"; {self.texts} plain texts, {self.texts_cut} cut at max_response_tokens, {self.texts_short} of one token "
                 "left out") if self.texts else ""
        return (f"{self.total} records, {self.truncated} over-long prompts truncated, {self.skipped} skipped, "
                f"{self.unfinished} responses that did not end within the limit {kept}{texts}")


def fit_prompt(ids: list[int], max_tokens: int, policy: str) -> list[int] | None:
    """Apply the over-long prompt policy: keep the last max_tokens (truncate) or drop the record (skip -> None).

    Keeping the end keeps the assistant header and the latest user turn, which the response depends on most.
    """
    if len(ids) <= max_tokens:
        return ids
    return ids[-max_tokens:] if policy == "truncate" else None


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], max_tokens: int, overlong: str) -> list[int] | None:
    """How an on-policy method turns a conversation into the prompt it samples or scores with: the tokenizer's chat
    template (render_prompt), then the over-long policy (fit_prompt); None when the policy drops it. tokenize_records
    (records with responses) applies the same two in turn, keeping the unfitted length for its report."""
    return fit_prompt(render_prompt(tokenizer, messages), max_tokens, overlong)


def tokenize_records(
    tokenizer: Any, records: list[Record], max_prompt_tokens: int, max_response_tokens: int, overlong: str, unfinished: str = "keep"
) -> tuple[list[Example], TokenizeReport]:
    """Records with responses -> Examples, applying the over-long prompt policy and the unfinished-response policy
    (keep: train on the text without an EOS; drop: leave the record out) and counting what they did. A plain-text
    record becomes its first token as the "prompt" and the rest as the trained "response" (text_ids)."""
    report = TokenizeReport(total=len(records))
    examples = []
    for record in records:
        if record.text is not None:
            ids = text_ids(tokenizer, record.text)
            report.texts += 1
            report.texts_cut += len(ids) > max_response_tokens + 1  # the first token is context, the rest are trained on
            ids = ids[: max_response_tokens + 1]
            if len(ids) < 2:
                report.texts_short += 1
                continue
            examples.append(Example(ids[:1], ids[1:]))
            continue
        if record.response is None:
            raise DataError(f"{record.source}: the record has no `response`", "collect teacher responses first")
        prompt = render_prompt(tokenizer, record.messages)
        fitted = fit_prompt(prompt, max_prompt_tokens, overlong)
        if fitted is None:
            report.skipped += 1
            continue
        response = response_ids(tokenizer, record.response, max_response_tokens, record.finished)
        if not ends_with_eos(response, tokenizer):
            report.unfinished += 1
            if unfinished == "drop":
                report.dropped += 1
                continue
        report.truncated += len(fitted) < len(prompt)
        examples.append(Example(fitted, response))
    if not examples:
        raise NothingToTrainOn(f"no record is left to train on ({report.summary()})",
                        "raise max_prompt_tokens or max_response_tokens, use overlong: truncate or unfinished: keep, "
                        "or collect with a larger max_tokens")
    return examples, report


def collate(examples: list[Example], pad_id: int, align_responses: bool = False) -> dict[str, torch.Tensor]:
    """Pad a micro-batch; `loss_mask` is 1 exactly on response tokens (the labels' positions).

    Default: right padding. align_responses=True left-pads the prompts so every response starts at the same
    index (the longest prompt's length) and right-pads after the response; the model then needs position ids
    from the attention mask, and only the last (longest response + 1) positions need logits.
    """
    import torch  # here, not at module level: prompt loading and API collection do not need torch

    offsets = [max(len(e.prompt_ids) for e in examples) - len(e.prompt_ids) if align_responses else 0 for e in examples]
    length = max(offset + len(e.prompt_ids) + len(e.response_ids) for offset, e in zip(offsets, examples))
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (offset, example) in enumerate(zip(offsets, examples)):
        ids = example.prompt_ids + example.response_ids
        input_ids[row, offset : offset + len(ids)] = torch.tensor(ids)
        attention[row, offset : offset + len(ids)] = 1
        loss_mask[row, offset + len(example.prompt_ids) : offset + len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}


def collated(examples: list[Example], size: int, pad_id: int, device: Any = None, align_responses: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """`examples` collated `size` at a time (and moved to `device`): the one loop behind every pass of a model over
    micro-batches outside the training backward (teachers, references, held-out NLL, discriminator scores, gradient
    statistics)."""
    for group in chunks(examples, size):
        batch = collate(group, pad_id, align_responses=align_responses)
        yield batch if device is None else {k: v.to(device) for k, v in batch.items()}


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- step order and micro-batches

@dataclass
class StepOrder:
    """Which records each step uses: a fresh seeded permutation per epoch, so a step number alone fixes
    the data position (exact resume needs nothing else). Each process takes its own slice of the batch."""

    n_records: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return self.n_records // self.batch_size

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        import torch  # here: prompt loading and API collection do not need torch

        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        order = torch.randperm(self.n_records, generator=generator).tolist()
        batch = order[position * self.batch_size : (position + 1) * self.batch_size]
        return batch[rank::world_size]


def data_order(config: Any, usable: int) -> StepOrder:
    """The seeded step order over `usable` records; fewer than one batch of them is a data error."""
    if usable < config.batch_size:
        raise DataError(f"{config.data}: {usable} usable records, fewer than batch_size {config.batch_size}",
                        "lower batch_size or add records")
    return StepOrder(usable, config.batch_size, config.seed)


def total_steps_for(config: Any, steps_per_epoch: int) -> int:
    """max_steps, else epochs x steps per epoch (at least 1)."""
    if config.max_steps:
        return config.max_steps
    return max(1, int(config.epochs * steps_per_epoch))


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    """Consecutive pieces of at most `size` items (micro-batches of a step's records)."""
    return [items[i : i + size] for i in range(0, len(items), size)]
