"""The white-box teacher seam: given (teacher prompt, response) token rows, the teacher's next-token
distribution at every response position.

A teacher answers with full-vocabulary logits (a model in this process) or with the top-k log-probs per
position plus the log-prob of the response token itself (a remote server: providers cap k, often at 20).
Either way the result is flattened row-major over the response tokens, like `rollout.response_targets`,
so it lines up row for row with the student's `response_logits` for the same responses.

Implementations: `LocalTeacher` (a frozen model, bf16 under bf16 precision), `AdapterOffTeacher` (the
student's own base weights with its LoRA adapters switched off) and `teachers.remote.RemoteTeacher`.
`TeacherSet` routes each row to the teacher its record names.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator, TypeVar

import torch

from ..data import Example, collated
from ..errors import OpdistillError
from ..logprobs import logprobs_of, response_logits

T = TypeVar("T")


@dataclass(frozen=True)
class TeacherRow:
    """One scored row: the teacher's context (rendered by the client, privileged context included) and the
    response tokens whose next-token distributions are wanted."""

    prompt: list[int]
    response: list[int]


@dataclass
class TeacherScores:
    """The teacher's distributions at the response positions of some rows, one row per response token.

    `logits` (tokens, V): full-vocabulary logits. `top_ids`/`top_logprobs` (tokens, k): the k most likely
    tokens and their log-probs at temperature 1, most likely first. `token_logprobs` (tokens,): the log-prob
    of each response token itself, which a top-k answer carries because the token may be outside the k.
    """

    logits: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None
    token_logprobs: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device: torch.device) -> "TeacherScores":
        return replace(self, **{name: value.to(device) for name, value in self.tensors().items()})

    def top_k(self, k: int, temperature: float = 1.0) -> "TeacherScores":
        """The same scores restricted to the teacher's k most likely tokens (log-probs at `temperature`)."""
        if self.logits is not None:
            values, ids = torch.log_softmax(self.logits.float() / temperature, dim=-1).topk(min(k, self.logits.shape[-1]), dim=-1)
            return TeacherScores(top_ids=ids, top_logprobs=values)
        if self.top_ids is None or self.top_logprobs is None:
            raise OpdistillError("the teacher returned no distributions, only token log-probs", "set top_k: 0 and use k1, k3 or reward")
        if temperature != 1.0:
            raise OpdistillError(f"a top-k teacher's log-probs are at temperature 1; distill_temperature {temperature} needs full logits",
                                 "set distill_temperature: 1, or use a local teacher")
        if self.top_ids.shape[-1] < k:
            raise OpdistillError(f"the teacher returned {self.top_ids.shape[-1]} log-probs per position, fewer than top_k {k}",
                                 f"set top_k: {self.top_ids.shape[-1]} or less (providers cap it, often at 20)")
        return TeacherScores(top_ids=self.top_ids[:, :k], top_logprobs=self.top_logprobs[:, :k])

    def sampled(self, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """log p_T(y_t) of the response tokens `targets` (flattened like the rows)."""
        if self.logits is not None:
            return logprobs_of(self.logits, targets.to(self.logits.device), temperature)
        if self.token_logprobs is None:
            raise OpdistillError("the teacher's answer holds no log-probs of the response tokens")
        if temperature != 1.0:
            raise OpdistillError(f"a remote teacher's token log-probs are at temperature 1, not distill_temperature {temperature}",
                                 "set distill_temperature: 1, or use a local teacher")
        return self.token_logprobs

    def select(self, index: torch.Tensor) -> "TeacherScores":
        return replace(self, **{name: value.index_select(0, index.to(value.device)) for name, value in self.tensors().items()})

    @staticmethod
    def cat(parts: list["TeacherScores"]) -> "TeacherScores":
        names = [set(part.tensors()) for part in parts]
        if any(n != names[0] for n in names):
            raise OpdistillError("teachers of one batch answered in different forms (full logits and top-k)",
                                 "set top_k so every teacher is compared on its top-k tokens")
        return TeacherScores(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names[0]})


class LogProbTeacher(ABC):
    """A white-box teacher. `name` identifies it in caches and messages; `remote` teachers answer top-k only."""

    name: str = "teacher"
    remote: bool = False

    @abstractmethod
    def score(self, rows: list[TeacherRow]) -> TeacherScores:
        """The teacher's distributions at every response position of `rows`, flattened row-major."""

    def score_step(self, rows: list[TeacherRow], step: int) -> TeacherScores:
        """`score` on behalf of training step `step` (a remote teacher's cache remembers it; see RemoteTeacher.compact)."""
        return self.score(rows)

    def token_logprobs(self, rows: list[TeacherRow], temperature: float = 1.0, step: int = -1) -> torch.Tensor:
        """log p_T of each row's own response tokens, flattened row-major, (tokens,): all a sampled-token estimator reads."""
        return self.score_step(rows, step).sampled(_response_tokens(rows), temperature)

    def close(self) -> None:
        """Release what the teacher holds (connections, caches)."""


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """`model` in eval mode (dropout off) for the block, then each submodule back in the mode it had: a teacher that
    is also trained (a CoD peer, the LoRA student behind AdapterOffTeacher) scores deterministically and still
    trains with its own dropout."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class LocalTeacher(LogProbTeacher):
    """A model in this process. `vocab` keeps the first columns only: a teacher that pads its output layer
    beyond the tokenizer has unused columns the student lacks (see models.shared_vocabulary_size)."""

    def __init__(self, model: Any, pad_id: int, vocab: int | None = None, name: str = "local", micro_batch_size: int = 8) -> None:
        self.model = model
        self.pad_id = pad_id
        self.vocab = vocab
        self.name = name
        self.micro_batch_size = micro_batch_size

    @contextlib.contextmanager
    def scoring_model(self) -> Iterator[Any]:
        yield self.model

    def micro_batch_logits(self, rows: list[TeacherRow]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, their response tokens) of each micro-batch of `rows`, in order, without gradient: one micro-batch's
        (tokens, vocab) logits exist at a time."""
        with torch.no_grad(), self.scoring_model() as model, eval_mode(model):
            device = next(model.parameters()).device
            examples = [Example(r.prompt, r.response) for r in rows]
            # Responses aligned at one index, so only response positions get logits (see response_logits).
            for start, batch in zip(range(0, len(rows), self.micro_batch_size),
                                    collated(examples, self.micro_batch_size, self.pad_id, device, align_responses=True)):
                logits = response_logits(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])[:, : self.vocab]
                yield logits, _response_tokens(rows[start:start + self.micro_batch_size])

    def score(self, rows: list[TeacherRow]) -> TeacherScores:
        return TeacherScores(logits=torch.cat([logits for logits, _ in self.micro_batch_logits(rows)]))

    def token_logprobs(self, rows: list[TeacherRow], temperature: float = 1.0, step: int = -1) -> torch.Tensor:
        # Reduced micro-batch by micro-batch: the full logits never exist for the whole step.
        parts = [logprobs_of(logits, tokens.to(logits.device), temperature).float() for logits, tokens in self.micro_batch_logits(rows)]
        return torch.cat(parts) if parts else torch.zeros(0)


def _response_tokens(rows: list[TeacherRow]) -> torch.Tensor:
    return torch.tensor([token for row in rows for token in row.response], dtype=torch.long)


class AdapterOffTeacher(LocalTeacher):
    """The student's own starting weights: the LoRA student with its adapters switched off (no second copy).
    `get_model` returns the current (unwrapped) student, so the teacher follows engine restores."""

    def __init__(self, get_model: Callable[[], Any], pad_id: int, micro_batch_size: int = 8) -> None:
        super().__init__(None, pad_id, None, name="student-base", micro_batch_size=micro_batch_size)
        self.get_model = get_model

    @contextlib.contextmanager
    def scoring_model(self) -> Iterator[Any]:
        student = self.get_model()
        with student.disable_adapter():
            yield student


class StepScores:
    """The teachers' full-vocabulary (or top-k) answers for one step's rows, for the full-vocabulary divergences.

    Every remote teacher is asked for all the step's rows at once, all teachers in flight together (each bounded by its
    concurrency), so the step waits about one round trip; its answer is top-k (k <= 20 or so), small whatever the
    batch. A local teacher's full-vocabulary logits (tokens x vocab, e.g. 4096 x 151936 x 2 bytes = 1.2 GB for a step of
    8 x 512 tokens) are computed per micro-batch instead: `micro_batch` is the engine's `score` hook, which the step
    passes to engine.backward_token_mean. The sampled-token estimators need none of this: TeacherSet.token_logprobs.
    """

    def __init__(self, teachers: "TeacherSet", rows: list[TeacherRow], names: list[str], top_k: int = 0, temperature: float = 1.0,
                 step: int = -1) -> None:
        self.teachers, self.rows, self.names, self.top_k, self.temperature = teachers, rows, names, top_k, temperature
        # name -> (its rows' scores, row index -> first token of that row in them)
        self.eager: dict[str, tuple[TeacherScores, dict[int, int]]] = {}
        remote = {name: members for name, members in _groups(names, range(len(rows))).items() if teachers.pick(name).remote}
        answers = teachers.ask(remote, lambda teacher, members: teacher.score_step([rows[i] for i in members], step))
        for name, members in remote.items():
            lengths = [len(rows[i].response) for i in members]
            self.eager[name] = (self.restrict(answers[name]), dict(zip(members, [0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]])))

    def restrict(self, scores: TeacherScores) -> TeacherScores:
        # With top_k every teacher's answer is restricted to its top-k tokens (the form a remote teacher gives), so teachers
        # of both kinds mix in one batch.
        return scores.top_k(self.top_k, self.temperature) if self.top_k else scores

    def micro_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teachers' answers for one collated micro-batch (its `rollout` rows), as `teacher_*` tensors to add to it:
        the engine's `score` hook (Engine.backward_token_mean)."""
        return {f"teacher_{name}": value for name, value in self.select(batch["rollout"].tolist()).tensors().items()}

    def select(self, group: list[int]) -> TeacherScores:
        """The scores of rows `group` (indices into the step's rows), flattened in the group's order."""
        parts, owners = [], []
        for name, members in _groups([self.names[i] for i in group], group).items():
            if name in self.eager:
                scores, starts = self.eager[name]
                parts.append(scores.select(torch.cat([torch.arange(starts[i], starts[i] + len(self.rows[i].response)) for i in members])))
            else:
                parts.append(self.restrict(self.teachers.pick(name).score([self.rows[i] for i in members])))
            owners.extend(members)
        if len(parts) == 1 and owners == group:
            return parts[0]
        # Token offsets of each row inside the concatenated group answers, then gather them back in the group's order.
        lengths = [len(self.rows[i].response) for i in owners]
        starts = dict(zip(owners, torch.tensor([0] + lengths[:-1]).cumsum(0).tolist()))
        order = torch.cat([torch.arange(starts[i], starts[i] + len(self.rows[i].response)) for i in group])
        return TeacherScores.cat(parts).select(order)


def _groups(names: list[str], indices: Any) -> dict[str, list[int]]:
    """indices grouped by their teacher's name (names[j] is the name of indices[j]), first appearance first."""
    groups: dict[str, list[int]] = {}
    for name, index in zip(names, indices):
        groups.setdefault(name, []).append(index)
    return groups


class TeacherSet:
    """The run's teachers: a default one, and named ones that a record picks with its `teacher` field."""

    def __init__(self, default: LogProbTeacher | None, named: dict[str, LogProbTeacher] | None = None) -> None:
        self.default = default
        self.named = dict(named or {})

    def all(self) -> list[LogProbTeacher]:
        return ([self.default] if self.default is not None else []) + list(self.named.values())

    def pick(self, name: str) -> LogProbTeacher:
        if name:
            return self.named[name]
        if self.default is None:
            raise OpdistillError("a record names no teacher and the config has no default teacher",
                                 "give every record a `teacher` field or set teacher: / teacher_url:")
        return self.default

    def for_step(self, rows: list[TeacherRow], names: list[str], top_k: int = 0, temperature: float = 1.0, step: int = -1) -> StepScores:
        """Ask every remote teacher once for all of a step's rows; local ones answer per micro-batch (StepScores)."""
        return StepScores(self, rows, names, top_k, temperature, step)

    def ask(self, groups: dict[str, list[int]], question: Callable[[LogProbTeacher, list[int]], T]) -> dict[str, T]:
        """`question(teacher, members)` for each teacher name of `groups`: the remote teachers all at once, one thread
        each (each bounded by its own concurrency), so the caller waits about one round trip whatever their number; the
        local ones in this thread meanwhile."""
        remote = [name for name in groups if self.pick(name).remote]
        with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            pending = {name: pool.submit(question, self.pick(name), groups[name]) for name in remote}
            answers = {name: question(self.pick(name), members) for name, members in groups.items() if name not in pending}
            answers.update({name: future.result() for name, future in pending.items()})
        return answers

    def token_logprobs(self, rows: list[TeacherRow], names: list[str], temperature: float = 1.0, step: int = -1) -> list[torch.Tensor]:
        """Each row's log p_T of its response tokens, (len(response),) per row, every teacher asked once for all of its
        rows, the remote ones all at once (`ask`)."""
        groups = _groups(names, range(len(rows)))
        answers = self.ask(groups, lambda teacher, members: teacher.token_logprobs([rows[i] for i in members], temperature, step))
        out: list[torch.Tensor] = [torch.zeros(0)] * len(rows)
        for name, members in groups.items():
            for i, part in zip(members, torch.split(answers[name].float().cpu(), [len(rows[i].response) for i in members])):
                out[i] = part
        return out

    def score(self, rows: list[TeacherRow], names: list[str], top_k: int = 0, temperature: float = 1.0) -> TeacherScores:
        """Score each row with its teacher; the answer is in the rows' order. With top_k every teacher's answer is
        restricted to its top-k tokens (the form a remote teacher gives), so teachers of both kinds mix."""
        return StepScores(self, rows, names, top_k, temperature).select(list(range(len(rows))))

    def remote(self) -> list[LogProbTeacher]:
        return [teacher for teacher in self.all() if teacher.remote]

    def close(self) -> None:
        for teacher in self.all():
            teacher.close()
