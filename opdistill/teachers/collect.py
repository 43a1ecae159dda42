"""`opdistill collect`: gather teacher responses for a prompt set into a durable, resumable store."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ..data import Record, load_records
from ..errors import OpdistillError
from ..sampling import SamplingParams
from .api import ChatCompletionsTeacher, RequestFailed, RetryPolicy
from .store import ResponseStore, record_key


@dataclass
class CollectOptions:
    prompts: str
    out: str
    teacher_model: str
    teacher_url: str = ""  # empty: teacher_model is a local / built-in model
    api_key_env: str = "OPENAI_API_KEY"
    system: str = ""  # privileged system prompt, seen by the teacher only
    n: int = 1
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 256
    concurrency: int = 8
    max_attempts: int = 6
    retry_base_delay: float = 0.5  # first back-off in seconds, doubled each retry
    timeout: float = 120.0
    batch_size: int = 16  # local teacher
    precision: str = "auto"  # local teacher: auto, bf16 or fp32
    engine: str = "auto"  # local teacher: auto (vLLM where installed and worth it), hf or vllm (rollout.generation_sampler)
    seed: int = 0
    progress: bool = True


@dataclass
class CollectSummary:
    total: int  # prompts x n
    already_stored: int
    stored: int  # new this run
    failed: int
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    first_failure: str = ""  # the reason of the first request that failed for good (refused, DNS, timed out, HTTP ...)
    interrupted: bool = False

    def lines(self) -> list[str]:
        return [
            f"responses: {self.already_stored + self.stored}/{self.total} stored ({self.stored} new, {self.already_stored} from earlier runs), {self.failed} failed",
            f"requests sent: {self.requests} ({self.retries} retries); tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion",
            f"time: {self.seconds:.1f} s" + (f"; errors: {self.errors}" if self.errors else ""),
        ] + ([f"first failure: {self.first_failure}"] if self.first_failure else [])


def _validate(opts: CollectOptions) -> None:
    if opts.n < 1:
        raise OpdistillError(f"--n must be >= 1, got {opts.n}")
    if opts.concurrency < 1:
        raise OpdistillError(f"--concurrency must be >= 1, got {opts.concurrency}")
    if opts.max_attempts < 1:
        raise OpdistillError(f"--max-attempts must be >= 1, got {opts.max_attempts}")
    if opts.retry_base_delay < 0 or opts.timeout <= 0:
        raise OpdistillError("--retry-base-delay must be >= 0 and --timeout > 0")
    if not 0 < opts.top_p <= 1:
        raise OpdistillError(f"--top-p must be in (0, 1], got {opts.top_p}")
    if opts.temperature < 0:
        raise OpdistillError(f"--temperature must be >= 0, got {opts.temperature}")
    if not opts.out.endswith(".jsonl"):
        raise OpdistillError(f"--out {opts.out} must be a .jsonl file")


def output_record(record: Record, key: str, teacher: str, sampling: dict[str, Any], sample_index: int,
                  system: str, text: str, extra: dict[str, Any]) -> dict[str, Any]:
    """The stored line: the student-visible prompt, the response, the teacher and everything needed to audit it."""
    meta = {**record.meta, "key": key, "sample_index": sample_index, "sampling": sampling, "source": record.source, **extra}
    if system:
        meta["teacher_system"] = system
    return {"messages": record.messages, "response": text, "teacher": teacher, "meta": meta}


def collect(opts: CollectOptions) -> CollectSummary:
    """Collect n responses per prompt; resumes from whatever `opts.out` already holds."""
    _validate(opts)
    records = load_records(opts.prompts)
    params = SamplingParams(opts.temperature, opts.top_p, opts.max_tokens)
    sampling = params.as_dict()
    teacher = opts.teacher_model
    store = ResponseStore(opts.out)
    keys = [[record_key(r.with_system(opts.system), teacher, sampling, s) for s in range(opts.n)] for r in records]
    total = len(records) * opts.n
    summary = CollectSummary(total=total, already_stored=sum(k in store for row in keys for k in row), stored=0, failed=0)
    start = time.monotonic()
    bar = tqdm(total=total, initial=summary.already_stored, desc="collect", unit="resp", disable=not opts.progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        if opts.teacher_url:
            asyncio.run(_collect_api(opts, records, keys, sampling, store, summary, bar))
        else:
            _collect_local(opts, records, keys, params, sampling, store, summary, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        store.close()
        summary.seconds = time.monotonic() - start
    return summary


async def _collect_api(opts: CollectOptions, records: list[Record], keys: list[list[str]], sampling: dict[str, Any],
                       store: ResponseStore, summary: CollectSummary, bar: tqdm) -> None:
    api_key = os.environ.get(opts.api_key_env) or None
    if api_key is None:
        print(f"collect: ${opts.api_key_env} is not set; sending requests without an Authorization header", file=sys.stderr)
    policy = RetryPolicy(max_attempts=opts.max_attempts, base_delay=opts.retry_base_delay, timeout=opts.timeout)
    client = ChatCompletionsTeacher(opts.teacher_url, opts.teacher_model, api_key, policy, seed=opts.seed)
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for p, row in enumerate(keys):
        for s, key in enumerate(row):
            if key not in store:
                queue.put_nowait((p, s))

    async def worker() -> None:
        while not queue.empty():
            p, s = queue.get_nowait()
            record = records[p]
            try:
                done = await client.complete(record.with_system(opts.system), sampling)
            except RequestFailed as failure:
                summary.failed += 1
                summary.first_failure = summary.first_failure or failure.reason
                store.add_failure({"key": keys[p][s], "source": record.source, "sample_index": s,
                                   "reason": failure.reason, "attempts": failure.attempts, "time": time.time()})
            else:
                extra = {"finish_reason": done.finish_reason, "usage": done.usage, "attempts": done.attempts}
                if store.add(output_record(record, keys[p][s], opts.teacher_model, sampling, s, opts.system, done.text, extra)):
                    summary.stored += 1
                    bar.update(1)
            bar.set_postfix(failed=summary.failed, retries=client.stats.retries, refresh=False)

    try:
        await asyncio.gather(*(worker() for _ in range(opts.concurrency)))
    finally:
        await client.close()
        stats = client.stats
        summary.requests, summary.retries, summary.errors = stats.requests, stats.retries, dict(stats.errors)
        summary.prompt_tokens, summary.completion_tokens = stats.prompt_tokens, stats.completion_tokens


def _collect_local(opts: CollectOptions, records: list[Record], keys: list[list[str]], params: SamplingParams,
                   sampling: dict[str, Any], store: ResponseStore, summary: CollectSummary, bar: tqdm) -> None:
    from ..seeds import mix_seed
    from .local import LocalTextTeacher

    missing = sum(key not in store for row in keys for key in row)
    teacher = LocalTextTeacher(opts.teacher_model, system=opts.system, precision=opts.precision, batch_size=opts.batch_size,
                               engine=opts.engine, new_tokens=missing * opts.max_tokens, seed=opts.seed)
    print(f"collect: generating with the {teacher.sampler.name} engine ({teacher.sampler.why})", file=sys.stderr)
    # One random stream per prompt, from the seed and the prompt's first response key (its content): a resumed or
    # re-batched collection draws what an uninterrupted one would, on either engine.
    seeds = [mix_seed(opts.seed, int(row[0][:15], 16)) for row in keys]
    try:
        batches = teacher.generate(records, params, opts.n, skip=lambda p, s: keys[p][s] in store, seeds=seeds)
        store_local_batches(opts, records, keys, sampling, store, summary, bar, batches)
    finally:
        teacher.close()


def store_local_batches(opts: CollectOptions, records: list[Record], keys: list[list[str]], sampling: dict[str, Any], store: ResponseStore,
                        summary: CollectSummary, bar: tqdm, batches: Any) -> None:
    for batch in batches:
        for sample in batch:
            p, s = sample.prompt_index, sample.sample_index
            usage = {"prompt_tokens": 0, "completion_tokens": len(sample.response_ids)}
            extra = {"finish_reason": "stop" if sample.finished else "length", "usage": usage}
            if store.add(output_record(records[p], keys[p][s], opts.teacher_model, sampling, s, opts.system, sample.text, extra)):
                summary.stored += 1
                summary.completion_tokens += usage["completion_tokens"]
                summary.requests += 1
        bar.update(len(batch))
