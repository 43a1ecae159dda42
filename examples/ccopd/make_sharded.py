"""Sharded multi-turn records for CCOPD from the Self-Instruct prompts (../shared/data, never copied here; docs/data.md
says where it comes from).

CCOPD (Lin et al., "Same Evidence, Different Answers: Canonical-Context On-Policy Distillation for
Multi-Turn Language Models", arXiv 2605.30251) trains a student that receives a task's evidence turn by
turn (RAW-SHARDED) to match a frozen teacher, the same base model, that reads the clean FULL prompt.
The paper does not publish how its intermediate turns are written, so this script makes its own rule:

- FULL prompt (the teacher's `teacher_messages`): the instruction, then a blank line and "Input: ..."
  when the record has an input. The Self-Instruct "Output:" completion cue is dropped: chat models
  answer after the assistant header.
- Shards (the student's user turns): the instruction split into sentences (at ., ! or ? followed by
  white space), then the input as one last shard "Input: ...". The instruction's last two sentences are
  merged, repeatedly, until there are at most --max-shards shards; the input is never split or merged.
  The shards carry exactly the FULL prompt's words, in the same order: the same evidence.
- Between shards, a fixed assistant acknowledgement (ACKNOWLEDGEMENT). It is neutral on purpose: it adds
  no assumption the student could anchor on. The paper's intermediate turns are model answers produced
  under partial information, which is where its "self-anchored drift" comes from; a fixed
  acknowledgement leaves that out and keeps the example cheap and reproducible.
- A record with fewer than 2 shards (a one-sentence instruction and no input) is left out: there is
  nothing to shard.
- The davinci `response` is dropped: CCOPD needs no teacher text, the teacher scores the student's own
  samples. `shards` (the number of user turns) is kept for reading the data.

    python examples/ccopd/make_sharded.py --out runs/ccopd/sharded.jsonl

The output rows are in the input's order; examples/ccopd.yaml trains on the first ones and
examples/ccopd/measure.py evaluates on the last ones.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Iterator

ACKNOWLEDGEMENT = "Got it. Please go on."
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "selfinstruct_user_oriented_text-davinci-003.jsonl"


def full_prompt(instruction: str, task_input: str) -> str:
    """The clean, single-turn prompt the teacher reads."""
    instruction, task_input = instruction.strip(), task_input.strip()
    return f"{instruction}\n\nInput: {task_input}" if task_input else instruction


def shards(instruction: str, task_input: str, max_shards: int) -> list[str]:
    """The instruction's sentences, then the input as one last shard; the instruction's last two sentences are
    merged (repeatedly) until there are at most max_shards shards. The input is never split or merged."""
    sentences = [s for s in SENTENCE_END.split(instruction.strip()) if s]
    budget = max_shards - 1 if task_input.strip() else max_shards
    while len(sentences) > budget:
        sentences[-2:] = [f"{sentences[-2]} {sentences[-1]}"]
    return sentences + ([f"Input: {task_input.strip()}"] if task_input.strip() else [])


def sharded_messages(pieces: list[str], acknowledgement: str = ACKNOWLEDGEMENT) -> list[dict[str, str]]:
    """user shard, assistant acknowledgement, user shard, ..., user shard (the student answers after the last)."""
    messages: list[dict[str, str]] = []
    for index, piece in enumerate(pieces):
        if index:
            messages.append({"role": "assistant", "content": acknowledgement})
        messages.append({"role": "user", "content": piece})
    return messages


def sharded_record(row: dict[str, Any], max_shards: int) -> dict[str, Any] | None:
    """One CCOPD record, or None when the prompt has fewer than two shards."""
    pieces = shards(row["instruction"], row.get("input", ""), max_shards)
    if len(pieces) < 2:
        return None
    return {"messages": sharded_messages(pieces),
            "teacher_messages": [{"role": "user", "content": full_prompt(row["instruction"], row.get("input", ""))}],
            "shards": len(pieces)}


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            for field in ("instruction", "input"):
                if not isinstance(row.get(field, ""), str):
                    raise SystemExit(f"{path}:{number}: field `{field}` must be a string")
            if not row.get("instruction", "").strip():
                raise SystemExit(f"{path}:{number}: field `instruction` is missing or empty")
            yield number, row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="Self-Instruct JSONL (instruction, input fields)")
    parser.add_argument("--out", type=Path, default=Path("runs/ccopd/sharded.jsonl"), help="where to write the records")
    parser.add_argument("--max-shards", type=int, default=4, help="most user turns per conversation (>= 2)")
    args = parser.parse_args(argv)
    if args.max_shards < 2:
        parser.error("--max-shards must be >= 2")
    if not args.source.is_file():
        raise SystemExit(f"{args.source} does not exist: pass --source PATH to the Self-Instruct JSONL "
                         "(docs/data.md says where it comes from)")
    records = [r for _, row in read_rows(args.source) if (r := sharded_record(row, args.max_shards)) is not None]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    counts = [r["shards"] for r in records]
    print(f"{args.out}: {len(records)} sharded records ({sum(counts) / len(counts):.2f} shards on average, "
          f"{max(counts)} at most) from {args.source}")


if __name__ == "__main__":
    main()
