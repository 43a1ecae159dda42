"""Does a small local judge follow the score prompt? The current wording against the placeholder wording it replaced.

    python benchmarks/judge_prompt.py [--judge qwen2.5-coder-1.5b-instruct] [--requests 24]

Needs `./setup.sh --models` for the default judge and ../shared/data beside the checkout. Each request scores
text-davinci-003's Self-Instruct answer (Answer 1) against the human target, or against "I don't know." in every
third request (Answer 2). Greedy, 16 new tokens, as benchmarks/quality.py asks its judge. Prints one table row per
wording: replies that did not parse, the mean score of the human answers and of "I don't know.", and the seconds.
About 4 minutes per wording for 24 requests on a 2-core AVX2 CPU (docs/eval.md has the measured table).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from opdistill.evaluate import judge as J

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "selfinstruct_user_oriented_text-davinci-003.jsonl"
CURRENT_TAIL = J.SCORE_PROMPT.rsplit("\n", 1)[1]
# The wording before 2026-12-01: small judges copied its placeholder line literally.
PLACEHOLDER_TAIL = 'Reply with one line "Scores: S1 S2" (the scores of Answer 1 and Answer 2), then at most two sentences of explanation.'
BAD_ANSWER = "I don't know."


def cases(count: int) -> list[tuple[str, str, str]]:
    """(question, reference answer, judged answer); every third judged answer is BAD_ANSWER."""
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()][:count]
    return [(r["instruction"] + ("\n\n" + r["input"] if r.get("input") else ""), r["response"].strip(),
             BAD_ANSWER if i % 3 == 2 else r["target"]) for i, r in enumerate(rows)]


def mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", default="qwen2.5-coder-1.5b-instruct", help="a local or built-in chat model")
    parser.add_argument("--requests", type=int, default=24)
    args = parser.parse_args()
    judge = J.LocalJudge(args.judge, max_tokens=16)
    items = cases(args.requests)
    print("| wording | unparsed | mean score, human answer | mean score, \"I don't know.\" | seconds |\n|---|---:|---:|---:|---:|")
    # The library's own requests (what `opdistill eval` sends); the old wording differs only in its last line.
    current = J.score_requests(*map(list, zip(*items)))
    for name, tail in (("current", CURRENT_TAIL), ("placeholder (before)", PLACEHOLDER_TAIL)):
        requests = [[{**m, "content": m["content"].replace(CURRENT_TAIL, tail)} for m in messages] for messages in current]
        started = time.monotonic()
        parsed = [J.parse_scores(reply or "") for reply in judge.reply_all(requests, 0.0)]
        human = [p[1] for p, (_, _, a) in zip(parsed, items) if p and a != BAD_ANSWER]
        bad = [p[1] for p, (_, _, a) in zip(parsed, items) if p and a == BAD_ANSWER]
        print(f"| {name} | {sum(p is None for p in parsed)} of {len(parsed)} | {mean(human)} | {mean(bad)} "
              f"| {time.monotonic() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
