"""Held-out check for CCOPD: does a model that reads the sharded conversation answer as the teacher does
when it reads the clean FULL prompt ("same evidence, same answer")?

For every held-out record and every --model M (greedy decoding):
- kl_to_full: the mean per-token reverse KL(p_M(. | sharded conversation) || p_teacher(. | FULL prompt)) on
  M's own sharded answer: the quantity CCOPD minimises, on prompts it never trained on;
- f1_vs_full: word-unigram F1 between M's sharded answer and the teacher's FULL answer;
- same_as_full: the share of sharded answers identical to the teacher's FULL answer;
- full_kl_to_teacher, full_f1_vs_teacher: the same two numbers for M's own answer to the FULL prompt (0 and
  1.0 for the teacher itself): how far training on sharded conversations moved the single-prompt behaviour.
The answers themselves go into --out beside the numbers, for reading.

    python examples/ccopd/measure.py --data 'runs/ccopd/sharded.jsonl[180:]' \
        --model base=smollm2-135m-instruct --model ccopd=runs/ccopd/student --out runs/ccopd/measure.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from opdistill.data import Example, collate, load_records, render_prompt, teacher_messages
from opdistill.evaluate.metrics import ngram_f1
from opdistill.models import load_model, load_tokenizer
from opdistill.objectives.divergences import per_token
from opdistill.rollout import SamplingParams, make_sampler, response_logits


def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], max_new_tokens: int, precision: str) -> list[list[int]]:
    sampler = make_sampler("hf", model, tokenizer, precision=precision, batch_size=16)
    return [s.response_ids for s in sampler.sample(prompts, SamplingParams(0.0, 1.0, max_new_tokens))]


@torch.no_grad()
def mean_kl(student: Any, teacher: Any, pad_id: int, student_prompts: list[list[int]], teacher_prompts: list[list[int]],
            responses: list[list[int]]) -> float:
    """Token-mean reverse KL of the student (its context) to the teacher (its context) on the same responses."""
    total, tokens = 0.0, 0
    for start in range(0, len(responses), 8):
        rows = [i for i in range(start, min(start + 8, len(responses))) if responses[i]]
        if not rows:
            continue
        s = collate([Example(student_prompts[i], responses[i]) for i in rows], pad_id, align_responses=True)
        t = collate([Example(teacher_prompts[i], responses[i]) for i in rows], pad_id, align_responses=True)
        s_logits = response_logits(student, s["input_ids"], s["attention_mask"], s["loss_mask"]).float()
        t_logits = response_logits(teacher, t["input_ids"], t["attention_mask"], t["loss_mask"]).float()
        kl = per_token(s_logits, t_logits, "rkl")
        total, tokens = total + float(kl.sum()), tokens + kl.numel()
    return total / max(tokens, 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="sharded records (make_sharded.py output), with a [a:b] row slice")
    parser.add_argument("--model", action="append", required=True, help="LABEL=MODEL (repeat)")
    parser.add_argument("--teacher", default="smollm2-135m-instruct", help="the frozen teacher (CCOPD: the base model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--precision", default="fp32", help="sampling precision: fp32, bf16 or auto")
    parser.add_argument("--out", type=Path, default=None, help="write the metrics here as JSON")
    args = parser.parse_args(argv)
    records = load_records(args.data)
    tokenizer = load_tokenizer(args.teacher)
    sharded = [render_prompt(tokenizer, r.messages) for r in records]
    full = [render_prompt(tokenizer, teacher_messages(r)) for r in records]
    teacher = load_model(args.teacher).eval()
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    reference = [decode(ids) for ids in greedy(teacher, tokenizer, full, args.max_new_tokens, args.precision)]
    results: dict[str, dict[str, float]] = {}
    answers_by_model: dict[str, dict[str, list[str]]] = {}
    for spec in args.model:
        label, _, name = spec.partition("=")
        model = load_model(name).eval()
        answers = greedy(model, tokenizer, sharded, args.max_new_tokens, args.precision)
        texts = [decode(ids) for ids in answers]
        own_full_ids = greedy(model, tokenizer, full, args.max_new_tokens, args.precision)
        own_full = [decode(ids) for ids in own_full_ids]
        answers_by_model[label] = {"sharded": texts, "full": own_full}
        results[label] = {
            "kl_to_full": mean_kl(model, teacher, tokenizer.pad_token_id, sharded, full, answers),
            "f1_vs_full": sum(ngram_f1(a, b, 1) for a, b in zip(texts, reference)) / len(records),
            "same_as_full": sum(a.strip() == b.strip() for a, b in zip(texts, reference)) / len(records),
            "full_kl_to_teacher": mean_kl(model, teacher, tokenizer.pad_token_id, full, full, own_full_ids),
            "full_f1_vs_teacher": sum(ngram_f1(a, b, 1) for a, b in zip(own_full, reference)) / len(records),
        }
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[label].items()), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        answers = [{"teacher_full": reference[i], **{f"{label}_{view}": texts[view][i] for label, texts in answers_by_model.items()
                                                     for view in ("sharded", "full")}} for i in range(len(records))]
        args.out.write_text(json.dumps({"data": args.data, "records": len(records), "models": results, "answers": answers},
                                       indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
