"""Quality benchmark results: the flat per-row scores, the markdown tables and the sample answers side by side.

Used by benchmarks/quality.py (run that); kept apart so that script reads as its stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def number(value: Any, digits: int = 2) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def row_result(set_result: dict[str, Any], label: str) -> dict[str, Any]:
    """One row's scores on one prompt set, flat, from the evaluation's metrics.json."""
    values = set_result["models"][label]
    vs = values.get("vs", {}).get("teacher", {})
    judge = values.get("judge", {})
    pair = next((p for p in set_result.get("pairwise", []) if p["x"] == label and p["y"] == "teacher"), {})
    return {"win_rate_vs_teacher": pair.get("win_rate"), "win_ci": [pair.get("ci_low"), pair.get("ci_high")],
            "pairwise_n": pair.get("n"), "pairwise_unparsed": pair.get("unparsed"), "order_consistency": pair.get("order_consistency"),
            "judge_ratio": judge.get("judge_ratio"), "judged": judge.get("judged"), "judge_unparsed": judge.get("unparsed"),
            "teacher_logprob": values.get("teacher_logprob"), "f1_1": vs.get("f1_1"), "f1_2": vs.get("f1_2"),
            "rouge_l": vs.get("rouge_l"), "embedding_cosine": vs.get("embedding_cosine"), "mean_tokens": values.get("mean_tokens"),
            "eos_rate": values.get("eos_rate"), "repetition_4": values.get("repetition_4"), "distinct_2": values.get("distinct_2")}


TABLE_HEADER = ("| model | win rate vs teacher [95% CI] (n) | judge ratio (judged) | teacher log-prob / token | F1-1 / F1-2 | ROUGE-L "
                "| embedding cos | mean tokens | EOS rate | repetition-4 | distinct-2 |\n|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|")


def table_line(label: str, r: dict[str, Any]) -> str:
    if label == "teacher":
        win, ratio, overlap = "(reference)", "(reference)", "–"
    else:
        low, high = r["win_ci"]
        win = (f"{number(r['win_rate_vs_teacher'])} [{number(low)}, {number(high)}] ({r['pairwise_n']})"
               if r["pairwise_n"] else f"– (0 judged, {r['pairwise_unparsed']} unparsed)")
        ratio = f"{number(r['judge_ratio'])} ({r['judged']})"
        overlap = f"{number(r['f1_1'])} / {number(r['f1_2'])}"
    return (f"| {label} | {win} | {ratio} | {number(r['teacher_logprob'], 3)} | {overlap} | {number(r['rouge_l'])} "
            f"| {number(r['embedding_cosine'])} | {number(r['mean_tokens'], 1)} | {number(r['eos_rate'])} | {number(r['repetition_4'])} "
            f"| {number(r['distinct_2'])} |")


def results_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# Quality benchmark ({s['size']} size)", "",
             f"Teacher {s['teacher']} (system prompt: {s['teacher_system']!r}); training limit {s['train_tokens']} tokens, "
             f"evaluation greedy at {s['eval_tokens']} new tokens; judge: {s['teacher']} (local), pairwise against the teacher "
             "in both orders (an order-dependent verdict is a tie) and its score ratio against the teacher's answer. "
             "Overlap columns are against the teacher's answer.", ""]
    if host := results.get("machine"):
        lines += [f"Measured on {host['cpu']} ({host['cores']} cores, {host['torch_threads']} torch threads"
                  + (f", GPU {host['gpu']}" if host["gpu"] else "") + f"), native bf16: {'yes' if host['native_bf16'] else 'no'}, "
                  f"precision {host['precision']}.", ""]
    for family, sets in results["tables"].items():
        title = {"blackbox": f"Black-box, cross-family: student {s['blackbox_student']}",
                 "whitebox": f"White-box, same family: student {s['whitebox_student']} ({s['whitebox_tuning']})"}[family]
        lines += [f"## {title}", ""]
        for set_name, rows in sets.items():
            lines += [f"**{set_name}** ({results['prompts'][set_name]} prompts)", "", TABLE_HEADER]
            lines += [table_line(label, r) for label, r in rows.items()] + [""]
    lines += ["## Training (compute matching)", "", "| run | generator updates | prompts / update | sequences trained | seconds in steps |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {t['generator_updates']} | {t['prompts_per_update']} | {t['generator_sequences']} | {t['step_seconds']:.0f} |"
              for name, t in results["training"].items()]
    lines += ["", "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in results["stage_seconds"].items()]
    lines += [f"| total | {sum(results['stage_seconds'].values()):.0f} |", ""]
    lines += sample_answers(results)
    return "\n".join(lines)


def clip(text: str, words: int = 60) -> str:
    """One table cell: the first `words` words on one line, pipes escaped."""
    parts = text.split()
    short = " ".join(parts[:words]) + (" …" if len(parts) > words else "")
    return short.replace("|", "\\|")


def sample_answers(results: dict[str, Any], per_set: int = 2) -> list[str]:
    """The first `per_set` prompts of each set with every row's answer side by side (the full texts are in
    eval/generations.jsonl); `finished` says whether the answer ended within the evaluation's token limit."""
    path = Path(results["files"]["generations"])
    if not path.is_file():
        return []
    answers = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = list(dict.fromkeys(label for sets in results["tables"].values() for rows in sets.values() for label in rows))
    lines = ["## Sample answers", ""]
    for set_name in results["prompts"]:
        for index in range(per_set):
            here = {a["model"]: a for a in answers if a["set"] == set_name and a["index"] == index}
            if not here:
                continue
            lines += [f"**{set_name} #{index}**: {clip(next(iter(here.values()))['prompt'], 80)}", "",
                      "| model | tokens | ended | answer |", "|---|---:|---|---|"]
            lines += [f"| {label} | {here[label]['tokens']} | {'yes' if here[label]['finished'] else 'no'} | {clip(here[label]['response'])} |"
                      for label in labels if label in here]
            lines.append("")
    return lines
