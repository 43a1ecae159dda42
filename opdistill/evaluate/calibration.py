"""How often is the judge right? Pairs whose better answer is known without a reader, judged like any comparison.

Each item is (question, good answer, degraded answer), drawn deterministically (seeded) from the reference data:

| kind | good | degraded (why it is surely worse) |
|---|---|---|
| `gsm8k_wrong_answer` | a GSM8K test solution | the same solution with its final number (after "####") and that number's last mention in the text changed by +1…+9: the final answer is wrong |
| `humaneval_other_solution` | the HumanEval prompt with its canonical solution | the same prompt with another problem's canonical body: it computes something else or names variables the function does not have |
| `humaneval_stub` | as above | the body replaced by `return None` |
| `truncated` | a reference answer (Self-Instruct text-davinci-003, Vicuna-80 gpt-3.5, MT-Bench GPT-4 first turn) | its first half (cut at a word boundary): unfinished |
| `looped` | a reference answer | its first sentence repeated until it is at least as long as the answer: degenerate, and never shorter, so a judge cannot win this kind by preferring length |
| `off_topic` | a reference answer | the reference answer of another question (stands in for "another language": no fixed translation exists offline, and an answer to another question is as surely wrong while being fluent) |
| `refusal` | a reference answer | "I'm sorry, I can't help with that." |

The HumanEval degradations are assumed to fail their tests; nothing here runs code. Checked once when this was
written (each solution run against its problem's `check` in a subprocess): for seed 0 and all 164 problems, every
good answer passes and every `humaneval_stub` and `humaneval_other_solution` answer fails. Other seeds pair
problems differently and are assumed, not checked, to fail likewise.

Each pair is judged in both orders (pair_requests with X = good, Y = degraded). A local judge gives logit verdicts
(judge.LocalJudge.pair_probabilities, order-averaged), an API judge text verdicts through the usual reply/parse/
retry machinery; both go through the judge cache, so a rerun asks nothing twice. An item scores 1 when the
order-averaged preference for the good answer is above ½, ½ when it is exactly ½ (a tie, e.g. a judge that always
picks the first answer: chance), 0 below. A text verdict that does not parse after its retries scores 0 (the
judge gave no usable answer; counted as `unparsed`); a request the API failed is left out (counted as `failed`:
a rerun asks again). Accuracy is the mean score with a 95% Wilson interval, and `flag` is accuracy < 0.80.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .judge import JudgeCache, judge_pair_probabilities, judge_requests, order_outcome, pair_requests, parse_verdict, prompt_outcome
from .judge_stats import probability_outcomes
from .stats import wilson_interval

REFUSAL = "I'm sorry, I can't help with that."
REFERENCE_KINDS = ("truncated", "looped", "off_topic", "refusal")
KINDS = ("gsm8k_wrong_answer", "humaneval_other_solution", "humaneval_stub", *REFERENCE_KINDS)
FLAG_BELOW = 0.80


@dataclass(frozen=True)
class CalibrationItem:
    kind: str
    source: str  # file:line (0-based) of the good answer, e.g. "gsm8k_test.jsonl:17"
    question: str
    good: str
    bad: str


# ---------------------------------------------------------------- degradations (pure)


FINAL = re.compile(r"####\s*(-?[\d,]+)\s*$")


def wrong_final_answer(solution: str, delta: int) -> str | None:
    """The GSM8K solution with its final number raised by `delta` after "####" and at its last mention before it
    (so the worked steps end on the wrong number too); None when the final answer is not an integer."""
    match = FINAL.search(solution)
    if not match or not re.fullmatch(r"-?\d{1,3}(,\d{3})*|-?\d+", match[1]):
        return None
    value = int(match[1].replace(",", ""))
    commas = "," in match[1]
    wrong = f"{value + delta:,}" if commas else str(value + delta)
    body = solution[:match.start()]
    # The number as written in the steps: as after "####", or with/without thousands separators.
    spellings = {match[1], str(value), f"{value:,}"}
    mentions = [m for spelling in spellings for m in re.finditer(rf"(?<![\d.,]){re.escape(spelling)}(?![\d]|[.,]\d)", body)]
    if mentions:
        last = max(mentions, key=lambda m: m.start())
        body = body[:last.start()] + wrong + body[last.end():]
    return f"{body}#### {wrong}"


def sentences(text: str) -> list[str]:
    """Sentences and lines of `text` (a line break ends one too: list items and headings are units of their own)."""
    return [part.strip() for part in re.split(r"(?<=[.!?])\s+|\n+", text) if part.strip()]


def first_half(text: str) -> str:
    """The first half of `text` by characters, cut back to a word boundary."""
    half = len(text) // 2
    cut = text.rfind(" ", 0, half + 1)
    return text[:cut if cut > 0 else half].rstrip()


def looped(text: str) -> str:
    """The first sentence of at least three words, repeated until the result is at least as long as `text`."""
    first = next((s for s in sentences(text) if len(s.split()) >= 3), text.strip())
    copies = -(-len(text) // (len(first) + 1))  # ceiling division: never shorter than the answer
    return " ".join([first] * max(copies, 2))


# ---------------------------------------------------------------- reading the reference data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def reference_answers(data_dir: Path) -> list[tuple[str, str, str]]:
    """(source, question, answer) of every reference answer long enough to degrade visibly (2+ sentences, 30+ words)."""
    found: list[tuple[str, str, str]] = []
    name = "selfinstruct_user_oriented_text-davinci-003.jsonl"
    for i, row in enumerate(read_jsonl(data_dir / name)):
        question = re.sub(r"\s*Output:\s*$", "", row["prompt"]).strip()
        found.append((f"{name}:{i}", question, row["response"].strip()))
    questions = {row["question_id"]: row["text"] for row in read_jsonl(data_dir / "vicuna80_questions.jsonl")}
    name = "vicuna80_answers_gpt-3.5.jsonl"
    for i, row in enumerate(read_jsonl(data_dir / name)):
        found.append((f"{name}:{i}", questions[row["question_id"]], row["text"].strip()))
    questions = {row["question_id"]: row["turns"][0] for row in read_jsonl(data_dir / "mt_bench_questions.jsonl")}
    name = "mt_bench_reference_gpt-4.jsonl"
    for i, row in enumerate(read_jsonl(data_dir / name)):
        found.append((f"{name}:{i}", questions[row["question_id"]], row["choices"][0]["turns"][0].strip()))
    return [item for item in found if len(sentences(item[2])) >= 2 and len(item[2].split()) >= 30]


def kind_rng(seed: int, kind: str) -> random.Random:
    """One stream per kind (string seeds hash stably in `random`): changing one kind's count leaves the others."""
    return random.Random(f"calibration/{seed}/{kind}")


def gsm8k_items(data_dir: Path, n: int, seed: int) -> Iterator[CalibrationItem]:
    name = "gsm8k_test.jsonl"
    rows = read_jsonl(data_dir / name)
    rng = kind_rng(seed, "gsm8k_wrong_answer")
    order = list(range(len(rows)))
    rng.shuffle(order)
    made = 0
    for i in order:
        if made == n:
            return
        good = re.sub(r"<<[^>]*>>", "", rows[i]["answer"])  # calculator annotations: noise to a reader, removed from both
        bad = wrong_final_answer(good, rng.randint(1, 9))
        if bad is not None:
            made += 1
            yield CalibrationItem("gsm8k_wrong_answer", f"{name}:{i}", rows[i]["question"], good, bad)


def humaneval_items(data_dir: Path, n: int, seed: int) -> Iterator[CalibrationItem]:
    name = "HumanEval.jsonl.gz"
    rows = read_jsonl(data_dir / name)
    for kind in ("humaneval_other_solution", "humaneval_stub"):
        rng = kind_rng(seed, kind)
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in order[:n]:
            prompt = rows[i]["prompt"]
            if kind == "humaneval_stub":
                body = "    return None\n"
            else:
                other = (i + 1 + rng.randrange(len(rows) - 1)) % len(rows)  # any problem but this one
                body = rows[other]["canonical_solution"]
            question = f"Complete the following Python function.\n\n```python\n{prompt}```"
            yield CalibrationItem(kind, f"{name}:{i}", question, f"```python\n{prompt}{rows[i]['canonical_solution']}```",
                                  f"```python\n{prompt}{body}```")


def reference_items(data_dir: Path, n: int, seed: int) -> Iterator[CalibrationItem]:
    pool = reference_answers(data_dir)
    rng = kind_rng(seed, "reference")
    rng.shuffle(pool)
    for k, kind in enumerate(REFERENCE_KINDS):
        stride = pool[k::len(REFERENCE_KINDS)]  # disjoint answers per kind: the kinds are not one sample's echo
        for j, (source, question, answer) in enumerate(stride[:n]):
            if kind == "truncated":
                bad = first_half(answer)
            elif kind == "looped":
                bad = looped(answer)
            elif kind == "off_topic":
                bad = stride[(j + 1) % len(stride)][2]  # the next answer of the stride: the same with any n
            else:
                bad = REFUSAL
            if bad != answer:
                yield CalibrationItem(kind, source, question, answer, bad)


def build_calibration_set(data_dir: str | Path, n_per_kind: int = 6, seed: int = 0) -> list[CalibrationItem]:
    """Up to `n_per_kind` items of each kind in KINDS (fewer only if the data runs out), the same for the same seed."""
    data_dir = Path(data_dir)
    builders: list[Callable[[Path, int, int], Iterator[CalibrationItem]]] = [gsm8k_items, humaneval_items, reference_items]
    return [item for build in builders for item in build(data_dir, n_per_kind, seed)]


# ---------------------------------------------------------------- judging it


def item_score(preference: float) -> float:
    """1 when the good answer is preferred (order-averaged preference > ½), ½ for an exact tie, else 0."""
    return 1.0 if preference > 0.5 else 0.5 if preference == 0.5 else 0.0


def accuracy_summary(scores: list[float]) -> dict[str, Any]:
    """Mean score with its 95% Wilson interval; a tie's half counts as half a success (the interval's formula
    needs only the proportion, so fractional counts are well defined)."""
    n = len(scores)
    low, high = wilson_interval(sum(scores), n)  # type: ignore[arg-type]  # stats.py types it int; halves are fine
    return {"n": n, "accuracy": sum(scores) / n if n else None, "ci_low": low, "ci_high": high}


def calibration_accuracy(judge: Any, items: list[CalibrationItem], cache: JudgeCache, *, method: str = "auto",
                         retries: int = 2, progress: bool = True, flag_below: float = FLAG_BELOW) -> dict[str, Any]:
    """The judge's accuracy on `items` overall and per kind (see the module docstring for the scoring rules).
    `method`: "logit" (local judges only), "text", or "auto" (logit when the judge has pair_probabilities)."""
    if method == "auto":
        method = "logit" if hasattr(judge, "pair_probabilities") else "text"
    if method not in ("logit", "text"):
        raise ValueError(f"method must be 'auto', 'logit' or 'text', not {method!r}")
    requests = pair_requests([i.question for i in items], [i.good for i in items], [i.bad for i in items])
    n = len(items)
    # Per item: the order-averaged preference for the good answer and whether both orders agree, or None (not judged).
    judged: list[tuple[float, bool] | None] = []
    unparsed = failed = 0
    if method == "logit":
        p_first = judge_pair_probabilities(judge, cache, requests, kind="calibration_logit", progress=progress)
        for preference, good_first, bad_first in zip(probability_outcomes(p_first), p_first[:n], p_first[n:]):
            judged.append((preference, (good_first > 0.5) == (bad_first < 0.5)))
    else:
        verdicts = judge_requests(judge, cache, requests, parse_verdict, retries=retries, kind="calibration", progress=progress)
        for good_first, bad_first in zip(verdicts[:n], verdicts[n:]):
            if good_first is None or bad_first is None:
                failed += 1
                judged.append(None)
            elif good_first.parsed is None or bad_first.parsed is None:
                unparsed += 1
                judged.append((0.0, False))  # no usable verdict: wrong, never a free half
            else:
                judged.append((prompt_outcome(good_first.parsed, bad_first.parsed),
                               order_outcome(good_first.parsed, True) == order_outcome(bad_first.parsed, False)))
    scores = {i: item_score(j[0]) for i, j in enumerate(judged) if j is not None}
    kept = sorted(scores)
    overall = accuracy_summary([scores[i] for i in kept])
    per_kind = {}
    for kind in dict.fromkeys(item.kind for item in items):
        chosen = [i for i in kept if items[i].kind == kind]
        per_kind[kind] = {**accuracy_summary([scores[i] for i in chosen]),
                          "mean_preference": sum(judged[i][0] for i in chosen) / len(chosen) if chosen else None}
    return {"method": method, "judge": judge.name, **overall,
            "flag": overall["accuracy"] is None or overall["accuracy"] < flag_below,
            "ties": sum(scores[i] == 0.5 for i in kept), "unparsed": unparsed, "failed": failed,
            "order_consistency": sum(judged[i][1] for i in kept) / len(kept) if kept else None,
            "mean_preference": sum(judged[i][0] for i in kept) / len(kept) if kept else None, "per_kind": per_kind}


def calibration_line(calibration: dict[str, Any] | None) -> str:
    """What every judged table is printed with: the judge's measured accuracy on pairs with a known better answer."""
    if not calibration:
        return "judge calibration: not measured (pass --data-dir; docs/eval.md, 'A judge whose error is measured')"
    if calibration["accuracy"] is None:
        return "judge calibration: nothing judged"
    kinds = ", ".join(f"{kind} {k['accuracy']:.2f}" for kind, k in calibration["per_kind"].items() if k.get("accuracy") is not None)
    flag = "  UNDER 80%: do not trust its verdicts" if calibration["flag"] else ""
    return (f"judge calibration ({calibration['method']}): chose the better answer on {calibration['accuracy']:.2f} "
            f"[{calibration['ci_low']:.2f}, {calibration['ci_high']:.2f}] of {calibration['n']} pairs{flag} ({kinds})")
