"""`opdistill check CONFIG`: the pre-flight check, also run at the start of every `train`.

Shared checks: the data loads (with teacher responses when the method trains on them: the config's
`needs_responses`), and prompts fit the limits. Then the method's own checks: the `preflight` hook of the
config class the registry names for the method (opdistill/registry.py), so no method is named here. The
helpers below are what those hooks use to catch the silent mismatches that wreck a white-box run without an
error: a teacher with another vocabulary (or the same one padded), another EOS token (the teacher then scores
the student's stop token as unlikely, and the student learns to never stop), another chat template (the
teacher reads the prompt in a format it was never trained on), records naming unknown teachers or domains.
Only tokenizers and model configs are loaded, never weights, so it takes seconds.
"""

from __future__ import annotations

from typing import Any

from .checkreport import CheckReport, Problem
from .config import RunConfig
from .data import Record, load_records, render_prompt
from .errors import OpdistillError

PROBE_REPLY = "OK."  # an assistant turn appended to the probe chat, so the templates' turn endings are compared too


def preflight(config: RunConfig, tokenizer: Any) -> CheckReport:
    """The shared checks (data, prompt lengths against the student's tokenizer and limits), then the method's own:
    `config.preflight`, the hook of the config class the registry names for config.method."""
    report = CheckReport()
    try:
        records = load_records(config.data, require_response=config.needs_responses(), built_by=config.data_built_by,
                               plain_text=config.accepts_plain_text())
    except OpdistillError as err:
        report.fail("data", err.message, err.fix)
        return report
    responses = "with teacher responses" if config.needs_responses() else "prompts (responses not needed)"
    chats = [r for r in records if r.text is None]  # plain-text records (kd) have no prompt; the method checks their lengths
    texts = f" ({len(records) - len(chats)} plain texts)" if len(chats) < len(records) else ""
    report.ok("data", f"{config.data}: {len(records)} records, {responses}{texts}")
    if chats:
        check_lengths(report, config, tokenizer, chats)
    config.preflight(report, tokenizer, records)
    return report


def check_lengths(report: CheckReport, config: RunConfig, tokenizer: Any, records: list[Record]) -> None:
    """Prompts over max_prompt_tokens, and the limits against the student's context window."""
    lengths = [len(render_prompt(tokenizer, r.messages)) for r in records]
    over = sum(length > config.max_prompt_tokens for length in lengths)
    detail = f"longest {max(lengths)} tokens, limit {config.max_prompt_tokens}; {over} over (overlong: {config.overlong})"
    if over == len(lengths) and config.overlong == "skip":
        report.fail("prompt lengths", f"every prompt is over-long (longer than max_prompt_tokens {config.max_prompt_tokens}): nothing to train on",
                    f"raise max_prompt_tokens to at least {min(lengths)}")
    elif over:
        report.note("prompt lengths", detail)
    else:
        report.ok("prompt lengths", detail)
    window = model_config_value(config.student, "max_position_embeddings", config.trust_remote_code)
    longest = min(max(lengths), config.max_prompt_tokens) + config.max_response_tokens
    if window and longest > window:  # a note, not an error: RoPE models run past it, with degraded quality
        report.note("context window", f"a prompt of {longest - config.max_response_tokens} tokens + max_response_tokens "
                    f"{config.max_response_tokens} exceed the student's max_position_embeddings {window}; lower max_prompt_tokens")


def model_config_value(name: str, key: str, trust_remote_code: bool) -> Any:
    """One field of a model's config.json (no weights loaded); None when it cannot be read."""
    from transformers import AutoConfig

    from .models import resolve_model

    try:
        config = AutoConfig.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, OpdistillError):
        return None
    return getattr(config, key, None) or getattr(config.get_text_config(), key, None)


def probe_ids(tokenizer: Any, probe: Record) -> list[int]:
    """The probe (what the teacher reads for one record) plus a short assistant reply, rendered by `tokenizer`'s template."""
    messages = probe.messages + [{"role": "assistant", "content": PROBE_REPLY}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def eos_ids(tokenizer: Any, name: str, trust_remote_code: bool) -> set[int]:
    """The tokens that end a turn: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        from transformers import GenerationConfig

        from .models import resolve_model

        extra = GenerationConfig.from_pretrained(resolve_model(name)).eos_token_id
    except (OSError, ValueError, OpdistillError):
        extra = None
    return ids | set(extra if isinstance(extra, list) else [extra] if extra is not None else [])


def check_local(report: CheckReport, label: str, name: str, config: RunConfig, student: Any, probe: Record) -> None:
    """Vocabulary (ids and padded sizes), EOS and pad tokens, and the chat template of a local white-box teacher (or
    tutor) `name` against the student's tokenizer. `probe` is what the teacher reads for one record (Record with
    the teacher's messages): both templates render it."""
    from .models import load_tokenizer

    try:
        teacher = load_tokenizer(name, chat_template=config.chat_template, trust_remote_code=config.trust_remote_code)
    except OpdistillError as err:
        report.fail(label, err.message, err.fix)
        return
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(t for t in set(student_vocab) | set(teacher_vocab) if student_vocab.get(t) != teacher_vocab.get(t))
        report.fail(f"{label} vocabulary", f"{name} has a different vocabulary: it maps {len(differing)} token(s) differently from the student (e.g. {differing[0]!r}); "
                    f"{len(teacher_vocab)} vs {len(student_vocab)} tokens",
                    "token-level divergences need one tokenizer: pick a model of the student's family (a teacher of another "
                    "family: method: gad, which needs only its text)")
        return
    sizes = [model_config_value(n, "vocab_size", config.trust_remote_code) for n in (config.student, name)]
    padded = f"; output layers {sizes[0]} (student) and {sizes[1]} (teacher), sliced to the shared {min(sizes)}" \
        if all(sizes) and sizes[0] != sizes[1] else ""
    report.ok(f"{label} vocabulary", f"identical, {len(student_vocab)} tokens{padded}")
    student_eos, teacher_eos = eos_ids(student, config.student, config.trust_remote_code), eos_ids(teacher, name, config.trust_remote_code)
    if student.eos_token_id not in teacher_eos:
        report.fail(f"{label} EOS", f"the student ends answers with {student.eos_token!r} (id {student.eos_token_id}) but {name}'s EOS is "
                    f"{teacher.eos_token!r} (ids {sorted(teacher_eos)}): the teacher scores the student's stop as unlikely and the "
                    "student learns not to stop", "use a teacher whose tokenizer/generation_config ends turns with the student's EOS")
    else:
        report.ok(f"{label} EOS", f"{student.eos_token!r} (id {student.eos_token_id}); pad {student.pad_token!r} / {teacher.pad_token!r}"
                  + ("" if student_eos == teacher_eos else f"; teacher also stops on {sorted(teacher_eos - student_eos)}"))
    ours, theirs = probe_ids(student, probe), probe_ids(teacher, probe)
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        report.fail(f"{label} chat template", f"{name}'s chat template renders {probe.source} differently from the student's "
                    f"from token {at}: student {student.decode(ours[at:at + 8])!r}, teacher {teacher.decode(theirs[at:at + 8])!r}",
                    "the teacher scores the rendering of the student's template: give both the same chat_template, or pick a "
                    "teacher of the student's family")
    else:
        report.ok(f"{label} chat template", f"same rendering of {probe.source} ({len(ours)} tokens)")


def check_alignment(report: CheckReport, label: str, name: str, config: RunConfig, student: Any, records: list[Record]) -> None:
    """cross_tokenizer: teacher `name`'s tokenizer against the student's on the data's own text (its responses, else its
    prompts): how much of the student's token boundaries the teacher shares, the mean span length, the end-token
    mapping, and the two chat templates' renderings of the first record. A pair whose decodings disagree on the text
    itself cannot be aligned: one error with its fix."""
    from .models import load_tokenizer
    from .teachers.alignment import alignment_stats, cross_tokenize, end_of_turn_id, same_vocabulary

    try:  # the teacher keeps its own chat template: `chat_template:` overrides the student's
        teacher = load_tokenizer(name, trust_remote_code=config.trust_remote_code)
    except OpdistillError as err:
        report.fail(label, err.message, err.fix)
        return
    kind = "responses" if any(r.response for r in records) else "prompts"
    texts = [r.response if kind == "responses" else r.messages[-1]["content"] for r in records if (r.response or kind == "prompts")][:64]
    try:
        end_id = end_of_turn_id(teacher)
        alignments = [cross_tokenize(student, teacher, student(t.strip(), add_special_tokens=False)["input_ids"] + [student.eos_token_id], True,
                                     teacher_end_id=end_id) for t in texts]
    except OpdistillError as err:
        report.fail(f"{label} alignment", err.message, err.fix)
        return
    stats = alignment_stats(alignments)
    vocabulary = "the same vocabulary: every span is one token" if same_vocabulary(student, teacher) else "another vocabulary"
    report.ok(f"{label} tokenizer", f"{name}: {len(teacher)} tokens against the student's {len(student)}, {vocabulary}")
    report.ok(f"{label} alignment", f"{len(texts)} {kind} of the data: {stats['shared_boundaries']:.1%} of the student's token boundaries "
              f"are shared, {stats['one_to_one_chars']:.1%} of characters in one-to-one spans; a span holds "
              f"{stats['mean_student_tokens']:.2f} student and {stats['mean_teacher_tokens']:.2f} teacher tokens on average")
    report.ok(f"{label} end token", f"student {student.eos_token!r} (id {student.eos_token_id}) maps to the teacher's end of turn "
              f"{teacher.convert_ids_to_tokens(end_id)!r} (id {end_id}, from its chat template); a response cut by the horizon gets no end span")
    messages = records[0].messages
    try:
        theirs = teacher.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as err:  # noqa: BLE001 - a tokenizer without a usable template raises any of several types
        report.fail(f"{label} chat template", f"{name} cannot render {records[0].source} with its chat template: {err}",
                    "pick a teacher whose tokenizer has a chat template (`chat_template:` applies to the student only)")
        return
    ours = student.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    same = "the same text" if ours == theirs else f"student ends {ours[-40:]!r}, teacher ends {theirs[-40:]!r}"
    report.ok(f"{label} chat template", f"each side renders its own around the same messages ({same})")


def check_remote(report: CheckReport, label: str, url: str, model: str, config: Any, tokenizer: Any, probe: Record) -> None:
    """The server serves `model`, accepts top_k prompt log-probs and (when it has /tokenize) tokenises like the student.
    Requests go through the training client's retry policy, so a flaky server fails the check only as it would fail a step."""
    import asyncio
    import os

    from .teachers.api import ApiClient, RequestFailed, RetryPolicy

    key = os.environ.get(config.teacher_api_key_env) if config.teacher_api_key_env else None
    base, k = url.rstrip("/"), max(config.top_k, 1)
    ids = probe_ids(tokenizer, probe)

    async def ask() -> Any:
        client = ApiClient(base, key, RetryPolicy(max_attempts=config.teacher_max_attempts, timeout=config.teacher_timeout),
                           key_hint=f"the environment variable {config.teacher_api_key_env}")
        root = ApiClient(base.removesuffix("/v1"), key, RetryPolicy(max_attempts=2, timeout=config.teacher_timeout))
        try:
            await client.post("/completions", {"model": model, "prompt": ids, "max_tokens": 1, "prompt_logprobs": k, "temperature": 0.0},
                              lambda body: body)
            try:  # vLLM's /tokenize lives at the server root, not under /v1
                tokens, _ = await root.post("/tokenize", {"model": model, "prompt": tokenizer.decode(ids), "add_special_tokens": False},
                                            lambda body: body["tokens"])
            except (RequestFailed, KeyError, TypeError):
                tokens = None
            return tokens
        finally:
            await client.close()
            await root.close()

    try:
        tokens = asyncio.run(ask())
    except RequestFailed as err:
        report.fail(label, f"{base} did not answer a prompt log-prob request for {model!r} with k = {k}: {err.reason}",
                    "start the server, fix teacher_url / teacher_model, or lower top_k to the server's cap (often 20)")
        return
    except OpdistillError as err:  # refused credentials
        report.fail(label, err.message, err.fix)
        return
    report.ok(label, f"{base} serves {model!r} and answers prompt log-probs with k = {k}")
    if tokens is None:
        report.note(f"{label} tokenizer", "the server has no /tokenize: vocabulary and EOS not compared (log-prob requests carry ids)")
    elif tokens != ids:
        report.fail(f"{label} tokenizer", f"the server tokenises the rendered probe differently from the tokenizer the client renders "
                    f"with ({base}/tokenize)", "same-tokenizer OPD: serve a model of the student's family; cross_tokenizer: point "
                    "teacher_tokenizer at a copy of the served model's tokenizer")
    else:
        report.ok(f"{label} tokenizer", f"same token ids for the rendered probe ({len(ids)} tokens)")


def check_domains(report: CheckReport, records: list[Record], known: dict[str, str], per_step: int) -> None:
    """Every record's `domain` field is a key of `known` (domain value -> the config key that names it and what it
    means, for the messages), and each domain has at least `per_step` records (a step draws that many of one domain)."""
    found: dict[str, int] = {}
    for record in records:
        found[repr(record.meta.get("domain"))] = found.get(repr(record.meta.get("domain")), 0) + 1
    seen = ", ".join(f"{value} ({n})" for value, n in found.items())
    wrong = [f"{r.source}: `domain` is {r.meta.get('domain')!r}" for r in records if r.meta.get("domain") not in known]
    if wrong:
        more = f"; ... and {len(wrong) - 3} more" if len(wrong) > 3 else ""
        report.fail("domains", f"{len(wrong)} record(s) name no configured domain ({'; '.join(wrong[:3])}{more}); the records' "
                    f"domains: {seen}", "give every record \"domain\": " + " or ".join(f"{d!r} ({meaning})" for d, meaning in known.items())
                    + ", or set those config keys to the records' values")
        return
    short = {domain: found.get(repr(domain), 0) for domain in known if found.get(repr(domain), 0) < per_step}
    if short:
        report.fail("domains", f"fewer records than batch_size {per_step} (one step's draw) in domain(s) "
                    + ", ".join(f"{d!r} ({n})" for d, n in short.items()),
                    f"lower batch_size to at most {min(found.get(repr(d), 0) for d in known)}, or add records of "
                    + ", ".join(map(repr, short)))
        return
    report.ok("domains", seen)
