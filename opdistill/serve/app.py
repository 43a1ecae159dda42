"""The endpoints: a request dict in, a response dict out.

An endpoint that needs the model is a generator of steps (`Steps`): it checks its request and tokenises it, yields its
prompts as batcher jobs (one per prompt), is sent their answers back, and returns its reply. The HTTP side (asgi.py)
runs each step in a small thread pool and awaits the answers without holding a thread, so a request waiting for the
model costs a coroutine, and it can give its jobs up (client gone, deadline passed) between steps. Only the model's
pass is shared between requests. The tokenizer is behind a lock (a fast tokenizer is not safe to call from two threads
at once); the model is used by the batcher's worker thread alone.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from typing import Any, Callable, Generator

from ..sampling import SamplingParams
from .batching import Batcher, GenerateJob, Generated, Job, Scored, ScoreJob
from .protocol import CHAT_OFF, COMMON_OFF, COMPLETIONS_OFF, RequestError, ServeOptions, floor, is_ids, number, off, show, typed


Steps = Generator[list[Job], list[Any], dict[str, Any]]  # yields jobs, is sent their answers, returns the reply


class ModelServer:
    """The model, its tokenizer and sampler, the batcher in front of them, and one method per endpoint."""

    def __init__(self, options: ServeOptions, log: Callable[[str], None] = print) -> None:
        from ..models import compute_dtype, default_device, load_model, load_tokenizer
        from ..rollout import eos_token_ids, make_sampler
        from .forward import ModelRunner

        self.options = options
        self.name = options.model_name or options.model
        self.tokenizer = load_tokenizer(options.model, chat_template=options.chat_template)
        self.tokenizer_lock = threading.RLock()
        # Frozen, so loaded in the precision it runs in (no fp32 copy beside a bf16 one); the sampler may pack it.
        model = load_model(options.model, dtype=compute_dtype(options.precision)).to(default_device()).eval()
        sampler = make_sampler("hf", model, self.tokenizer, precision=options.precision, batch_size=options.max_batch_rows,
                               owns_model=True)
        self.eos = eos_token_ids(self.tokenizer, model.generation_config)
        config = model.config
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or 2048)
        self.max_prompt_tokens = min(options.max_prompt_tokens or self.max_model_len, self.max_model_len)
        # Ids past the tokenizer (a padded embedding matrix) decode to nothing, so prompts may not use them.
        self.vocab = min(len(self.tokenizer), model.get_input_embeddings().num_embeddings)
        # decoded_token, cached: the same few thousand ids come back in every reply.
        self.decode = functools.lru_cache(maxsize=None)(lambda token: self._text([token], skip_special=False))
        self.created = int(time.time())
        runner = ModelRunner(model, sampler, self.tokenizer.pad_token_id, self.eos, self.vocab)
        self.split_head = runner.split_head
        self.batcher = Batcher(runner, options.max_batch_rows, options.max_batch_tokens, options.batch_wait_ms / 1000, log,
                               options.max_queue)

    def close(self) -> None:
        self.batcher.close()

    def check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is not None and model != self.name:  # vLLM's wording; an absent model means the served one
            raise RequestError(404, f"The model `{model}` does not exist.", "model", "NotFoundError")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created, "owned_by": "opdistill",
                                            "max_model_len": self.max_model_len}]}

    def stats(self) -> dict[str, Any]:
        """opdistill's own endpoint (vLLM has none like it): how well concurrent requests were batched."""
        return self.batcher.report()

    def _prompt(self, ids: list[int], field: str) -> list[int]:
        if not ids:
            raise RequestError(400, f"`{field}` must not be empty", field)
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(400, f"`{field}` has {len(ids)} tokens, more than the limit of {self.max_prompt_tokens}", field)
        bad = next((i for i in ids if not 0 <= i < self.vocab), None)
        if bad is not None:
            raise RequestError(400, f"`{field}` holds token id {bad}, outside the vocabulary [0, {self.vocab})", field)
        return ids

    def _tokens(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self.tokenizer_lock:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _prompts(self, value: Any) -> list[list[int]]:
        items = [value] if isinstance(value, str) or is_ids(value) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) or is_ids(i) for i in items):
            raise RequestError(400, "`prompt` must be a string, a list of strings, a list of token ids or a list of lists of token ids", "prompt")
        limit = self.options.max_prompts_per_request  # checked before tokenising: a 1 MiB body holds ~260k one-token prompts
        if len(items) > limit:
            raise RequestError(400, f"`prompt` holds {len(items)} prompts, more than the limit of {limit} per request "
                                    "(--max-prompts-per-request); send them in several requests", "prompt")
        # A text prompt gets the tokenizer's special tokens, as vLLM does; token ids are used exactly as sent.
        return [self._prompt(self._tokens(i) if isinstance(i, str) else i, "prompt") for i in items]

    def _messages(self, body: dict[str, Any]) -> list[int]:
        from ..data import Record, render_prompt

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "`messages` must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(400, f"`messages` item {i} must be an object with string `role` and `content`", "messages")
        # Record.with_system puts --system first in the system prompt, before the client's own system message.
        conversation = Record([{"role": m["role"], "content": m["content"]} for m in messages]).with_system(self.options.system)
        try:
            with self.tokenizer_lock:
                ids = render_prompt(self.tokenizer, conversation)
        except Exception as err:  # the chat template rejects the conversation (a template may raise anything, e.g. roles out of order)
            raise RequestError(400, f"`messages` cannot be rendered with the chat template: {str(err)[:200]}", "messages") from None
        return self._prompt(ids, "messages")

    def _sampling(self, body: dict[str, Any], longest: int, default_tokens: int | None,
                  max_name: str = "max_tokens") -> tuple[SamplingParams, int | None]:
        for name, kind, values in COMMON_OFF:
            off(body, name, kind, values)
        stop = body.get("stop")
        if not (stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(i, str) for i in stop))):
            raise RequestError(400, f"`stop` must be a string or a list of strings, got {show(stop)}", "stop")
        if stop:  # "" and [] stop nothing
            raise RequestError(400, "`stop` is not supported by opdistill serve (generation ends at EOS or max_tokens)", "stop")
        if body.get("stream_options") is not None:  # vLLM's check: it only applies to a stream
            raise RequestError(400, "`stream_options` can only be set when `stream` is true", "stream_options")
        typed(body, "user", "a string")
        room, cap = self.max_model_len - longest, self.options.max_new_tokens
        # The defaults (16 for completions, the rest of the context for chat, as vLLM) are capped too: one worker runs the
        # model, so a chat that asks for nothing must not hold it for the whole context.
        max_tokens = number(body, max_name, min(cap, room, room if default_tokens is None else default_tokens), 0, 2**31, True)
        if max_tokens > cap:
            raise RequestError(400, f"`{max_name}` = {max_tokens} is more than this server's limit of {cap} new tokens "
                                    "(--max-new-tokens)", max_name)
        if max_tokens > room:
            raise RequestError(400, f"`{max_name}` = {max_tokens} with a {longest}-token prompt exceeds the model's context of "
                                    f"{self.max_model_len} tokens", max_name)
        top_p = number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:  # an empty nucleus: nothing could be drawn
            raise RequestError(400, "`top_p` must be in (0, 1], got 0", "top_p")
        params = SamplingParams(temperature=number(body, "temperature", 1.0, 0.0, 100.0), top_p=top_p, max_new_tokens=max_tokens)
        return params, number(body, "seed", None, 0, 2**63 - 1, True)

    def _generate(self, prompts: list[list[int]], params: SamplingParams,
                  seed: int | None) -> Generator[list[Job], list[Any], list[tuple[list[int], str, str]]]:
        """(token ids, text, finish reason) per prompt, from the project's sampler loop; greedy at temperature 0."""
        if params.max_new_tokens == 0:
            return [([], "", "length") for _ in prompts]
        done: list[Generated] = yield [GenerateJob(p, params, seed) for p in prompts]
        # A completion's text is not stripped (a client may join it to the prompt), as in vLLM.
        return [(g.tokens, self._text(g.tokens), "stop" if g.finished else "length") for g in done]

    def _text(self, ids: list[int], skip_special: bool = True) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def _first_token(self, logits: Any, params: SamplingParams, seed: int | None) -> tuple[list[int], str, str]:
        """One token from the scoring pass's last logits, drawn as the sampler draws it (sample_next, the seed's first
        uniform): white-box clients send max_tokens 1 (older vLLM refuses 0), and this spares them a second prefill."""
        from ..rollout import row_uniforms, sample_next

        uniforms = None if seed is None else row_uniforms([seed], [0], 1)[:, 0]
        token = int(sample_next(logits.unsqueeze(0), params, uniforms)[0])
        return [token], self._text([token]), "stop" if token in self.eos else "length"

    def _prompt_logprobs(self, ids: list[int], scored: Scored) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's prompt_logprobs of one prompt: null for the first token, then the prompt token and the top-k."""
        entries: list[dict[str, dict[str, Any]] | None] = [None]
        columns = (scored.top_ids, scored.top_logprobs, scored.top_ranks, scored.token_logprobs, scored.token_ranks)
        for token, top_ids, top_lps, top_ranks, lp, rank in zip(ids[1:], *columns):
            # The prompt token first, as vLLM orders it; it appears once even when it is in the top-k.
            entry = {str(token): {"logprob": floor(lp), "rank": rank, "decoded_token": self.decode(token)}}
            for i, value, r in zip(top_ids, top_lps, top_ranks):
                entry.setdefault(str(i), {"logprob": floor(value), "rank": r, "decoded_token": self.decode(i)})
            entries.append(entry)
        return entries

    def completions(self, body: dict[str, Any]) -> Steps:
        self.check_model(body)
        if body.get("suffix") is not None:  # vLLM refuses it too, with this message
            raise RequestError(400, "suffix is not currently supported", "suffix")
        for name, kind, values in COMPLETIONS_OFF:
            off(body, name, kind, values)
        prompts = self._prompts(body.get("prompt"))
        k = body.get("prompt_logprobs")
        if k is not None:
            k = number(body, "prompt_logprobs", 0, 0, self.options.max_logprobs, True)
        params, seed = self._sampling(body, max(len(p) for p in prompts), 16)  # 16: the OpenAI API's default max_tokens
        one_token = params.max_new_tokens == 1
        scored: list[Scored] = (yield [ScoreJob(p, k, one_token) for p in prompts]) if k is not None else []
        if scored and one_token:
            outputs = [self._first_token(s.last, params, seed) for s in scored]
        else:
            outputs = yield from self._generate(prompts, params, seed)
        # stop_reason: the stop string or token that ended the text; null for EOS and length, the only ends here (vLLM).
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason, "stop_reason": None,
                    "prompt_logprobs": self._prompt_logprobs(prompts[i], scored[i]) if scored else None}
                   for i, (_, text, reason) in enumerate(outputs)]
        return self._reply("cmpl", "text_completion", choices, sum(map(len, prompts)), sum(len(o[0]) for o in outputs))

    def chat(self, body: dict[str, Any]) -> Steps:
        self.check_model(body)
        for name, kind, values in CHAT_OFF:
            off(body, name, kind, values)
        prompt = self._messages(body)
        # max_completion_tokens is the chat API's newer name for max_tokens; vLLM prefers it when both are given.
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        params, seed = self._sampling(body, len(prompt), None, name)  # vLLM's default, the rest of the context, capped
        ids, text, reason = (yield from self._generate([prompt], params, seed))[0]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason,
                  "stop_reason": None}
        return self._reply("chatcmpl", "chat.completion", [choice], len(prompt), len(ids))

    def _reply(self, prefix: str, kind: str, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": self.name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /tokenize. Messages are rendered as /v1/chat/completions renders them, --system included."""
        self.check_model(body)
        if "messages" in body:
            tokens = self._messages(body)
        elif isinstance(body.get("prompt"), str):
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise RequestError(400, "`add_special_tokens` must be true or false", "add_special_tokens")
            tokens = self._tokens(body["prompt"], special)
        else:
            raise RequestError(400, "`prompt` (a string) or `messages` is required", "prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.max_model_len}
