"""Rows of concurrent requests gathered into batches, one batch in the model at a time.

Requests `submit` jobs (one per prompt) and wait on their futures; one worker thread takes the oldest job and every
later one that can share its pass (the same `key`) up to `max_rows` rows and `max_tokens` padded tokens, waiting up to
`wait_seconds` after the oldest job arrived for more to join (jobs that arrived while the model was busy never wait),
runs them, and hands each job its own answer. A batch whose pass fails is run again one row at a time, so a row that
breaks the pass (or out-of-memory at the batch's size) fails its own request only. Torch-free: the model's side is
forward.ModelRunner, passed in as `runner`.

The queue is bounded (`max_queue` rows waiting): a request that would pass it is refused with 429 at once, so a burst
costs memory and waiting time in proportion to the bound, not to what clients send. A request that is given up (its
client left, or its deadline passed) `cancel`s its jobs: the queued ones leave the queue at once, and a batch whose
rows were all given up stops at its next model call (the runner asks `abandoned()` before each one).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Union

from ..sampling import SamplingParams
from .protocol import RequestError

if TYPE_CHECKING:
    import torch

SCORE_CHUNK = 256  # prompt positions whose full-vocabulary logits exist at once when scoring a prompt


@dataclass(frozen=True)
class ScoreJob:
    """One prompt to score: the top-k log-probs at each position (vLLM's prompt_logprobs) and, with `keep_last`, the
    logits after its last token (for a one-token completion drawn from the same pass)."""

    ids: list[int]
    k: int
    keep_last: bool = False
    padded = False  # rows are packed (forward.py): a pass costs the sum of their lengths

    def key(self) -> tuple[Any, ...]:
        return ("score",)  # any two prompts can share a pass: k only changes what is read from each row's logits

    def cost(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class GenerateJob:
    """One prompt to continue. Rows share a pass only with rows of the same sampling parameters (one decode loop)."""

    ids: list[int]
    params: SamplingParams
    seed: int | None
    padded = True  # left-padded: every row of the pass costs the longest

    def key(self) -> tuple[Any, ...]:
        return ("generate", self.params.temperature, self.params.top_p, self.params.max_new_tokens)

    def cost(self) -> int:
        return len(self.ids) + self.params.max_new_tokens  # the KV cache the decode loop allocates for the row


Job = Union[ScoreJob, GenerateJob]


@dataclass
class Scored:
    """A scored prompt: per position 1.. (one list each) the top-k ids, their log-probs and ranks, the prompt token's
    log-prob and rank; and the last position's logits when the job kept them."""

    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    top_ranks: list[list[int]]
    token_logprobs: list[float]
    token_ranks: list[int]
    last: torch.Tensor | None


@dataclass
class Generated:
    tokens: list[int]  # up to and including EOS when the model stopped
    finished: bool  # EOS within max_new_tokens


class Abandoned(Exception):
    """Raised by a runner between model calls when `abandoned()` says no row of its batch is wanted any more."""


class Runner(Protocol):
    def run(self, jobs: list[Any], abandoned: Callable[[], bool]) -> list[Any]: ...


@dataclass(eq=False)  # compared by identity: two equal jobs are still two requests
class Pending:
    job: Job
    arrived: float
    future: Future = field(default_factory=Future)
    cancelled: bool = False  # its request was given up; set under the batcher's lock, read by the worker without it


def stopping() -> RequestError:
    return RequestError(503, "the server is stopping", kind="ServiceUnavailableError", retry_after=1)


def given_up() -> RequestError:  # read by no one: the request that gave the row up no longer waits for it
    return RequestError(499, "the request was given up", kind="CancelledError")


@dataclass
class BatchStats:
    """What `GET /stats` reports: how many model calls answered how many rows."""

    batches: int = 0  # model calls: a scoring pass, or a generation's prefill and decode loop (a failed one included)
    rows: int = 0  # rows (prompts) answered
    largest_batch: int = 0
    split_batches: int = 0  # batches whose pass failed and were run again row by row
    refused_rows: int = 0  # rows of requests refused with 429: the queue was full
    cancelled_rows: int = 0  # rows given up (client left, deadline passed) before or during their pass
    abandoned_batches: int = 0  # batches stopped part-way because every one of their rows was given up


class Batcher:
    def __init__(self, runner: Runner, max_rows: int, max_tokens: int, wait_seconds: float, log: Callable[[str], None],
                 max_queue: int = 256) -> None:
        self.runner, self.max_rows, self.max_tokens, self.wait_seconds, self.log = runner, max_rows, max_tokens, wait_seconds, log
        self.max_queue = max_queue
        self.pending: deque[Pending] = deque()
        self.running: list[Pending] = []  # the batch in the model
        self.changed = threading.Condition()  # guards pending, running, closed and stats
        self.closed = False
        self.stats = BatchStats()
        self.worker = threading.Thread(target=self._work, name="opdistill-serve-batcher", daemon=True)
        self.worker.start()

    def submit(self, jobs: list[Job]) -> list[Pending]:
        """Queue `jobs` (all or none) and return them; each one's future gets its answer or its error. 429 when the
        queue would pass `max_queue` rows, 503 once the server is stopping."""
        now = time.monotonic()
        items = [Pending(job, now) for job in jobs]
        with self.changed:
            if self.closed:
                raise stopping()
            if len(self.pending) + len(items) > self.max_queue:
                self.stats.refused_rows += len(items)
                raise RequestError(429, f"the server is busy: {len(self.pending)} rows are waiting for the model and this request "
                                        f"adds {len(items)}, past the limit of {self.max_queue} (--max-queue); retry later",
                                   kind="RateLimitError", retry_after=1)
            self.pending.extend(items)
            self.changed.notify()
        return items

    def answers(self, jobs: list[Job]) -> list[Any]:
        """Each job's answer, waited for in this thread; a job's failure is raised here."""
        return [item.future.result() for item in self.submit(jobs)]

    def cancel(self, items: Iterable[Pending]) -> None:
        """Give up `items` (their request will not read them): queued ones leave the queue now; one in the model marks
        its batch, which stops at its next model call once none of its rows is wanted."""
        with self.changed:
            given_up = [item for item in items if not item.cancelled and not item.future.done()]
            for item in given_up:
                item.cancelled = True
            self.stats.cancelled_rows += len(given_up)
            if given_up:
                self.pending = deque(item for item in self.pending if not item.cancelled)

    def report(self) -> dict[str, Any]:
        with self.changed:
            return {**asdict(self.stats), "max_batch_rows": self.max_rows, "max_batch_tokens": self.max_tokens,
                    "batch_wait_ms": self.wait_seconds * 1000, "max_queue": self.max_queue, "queued_rows": len(self.pending)}

    def close(self) -> None:
        """Stop taking jobs; the queued ones are answered 503, the batch in the model stops at its next model call (its
        rows get 503 too), then the worker ends."""
        with self.changed:
            self.closed = True
            left, self.pending = list(self.pending), deque()
            self.changed.notify_all()
        for item in left:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(stopping())
        # Wait for the worker to leave: a thread still inside torch while the interpreter shuts down can abort the
        # process (seen once as SIGABRT on SIGTERM).
        if self.worker.is_alive() and threading.current_thread() is not self.worker:
            self.worker.join(timeout=120)

    def _abandoned(self) -> bool:
        """Whether the batch in the model may stop: the server is stopping, or every one of its rows was given up."""
        return self.closed or all(item.cancelled for item in self.running)

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[Pending] | None:
        with self.changed:
            while not self.closed:
                if not self.pending:
                    self.changed.wait()
                    continue
                batch, full = self._fitting()
                wait = self.pending[0].arrived + self.wait_seconds - time.monotonic()
                if full or wait <= 0:
                    taken = set(map(id, batch))
                    self.pending = deque(item for item in self.pending if id(item) not in taken)
                    return batch
                self.changed.wait(wait)  # woken early by each new job, to see whether the batch is full
            return None

    def _fitting(self) -> tuple[list[Pending], bool]:
        """The oldest job and the later ones that may share its pass, in arrival order; and whether no more could join.
        A job too long for what is left of the token budget is passed over (it leads a later batch), not the rest."""
        first = self.pending[0].job
        batch: list[Pending] = []
        longest = total = 0

        def tokens(rows: int, longest: int, total: int) -> int:
            return rows * longest if first.padded else total

        for item in self.pending:
            if len(batch) == self.max_rows:
                break
            cost = item.job.cost()
            if item.job.key() != first.key() or (batch and tokens(len(batch) + 1, max(longest, cost), total + cost) > self.max_tokens):
                continue
            batch.append(item)
            longest, total = max(longest, cost), total + cost
        # Full: no more rows, or not even a row as long as the shortest taken would fit.
        shortest = min(item.job.cost() for item in batch)
        full = len(batch) == self.max_rows or tokens(len(batch) + 1, longest, total + shortest) > self.max_tokens
        return batch, full

    def _run(self, batch: list[Pending]) -> None:
        with self.changed:
            # Rows given up since they were queued are dropped. The others' futures are marked running, so a waiter that
            # cancels its future from now on (asyncio's wrap_future does) cannot make the answer below fail to be set.
            batch = [item for item in batch if not item.cancelled and item.future.set_running_or_notify_cancel()]
        if batch:
            self._pass(batch)

    def _pass(self, batch: list[Pending]) -> None:
        with self.changed:
            self.stats.batches += 1
            self.running = batch
        try:
            answers = self.runner.run([item.job for item in batch], self._abandoned)
        except Abandoned:
            with self.changed:
                self.stats.abandoned_batches += 1
            why = "the server is stopping" if self.closed else "every row's request was given up"
            self.log(f"a batch of {len(batch)} rows stopped part-way: {why}")
            for item in batch:
                item.future.set_exception(stopping() if self.closed else given_up())
            return
        except Exception as err:  # noqa: BLE001 - whatever broke the pass, each request gets its own answer or error
            if len(batch) == 1:
                batch[0].future.set_exception(err)
                return
            self.log(f"error in a batch of {len(batch)} rows ({type(err).__name__}: {str(err)[:200]}); running them one by one")
            with self.changed:
                self.stats.split_batches += 1
            for item in batch:
                if item.cancelled:
                    item.future.set_exception(given_up())
                else:
                    self._pass([item])
            return
        finally:
            with self.changed:
                self.running = []
        with self.changed:
            self.stats.rows += len(batch)
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for item, answer in zip(batch, answers):
            item.future.set_result(answer)
