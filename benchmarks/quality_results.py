"""Quality benchmark results: the flat per-row scores, the markdown tables and the sample answers side by side.

Used by benchmarks/quality.py (run that); kept apart so that script reads as its stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def number(value: Any, digits: int = 2) -> str:
    return "–" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def p_value(value: Any) -> str:
    return "–" if value is None else f"{value:.2g}"


def row_result(set_result: dict[str, Any], label: str) -> dict[str, Any]:
    """One row's scores on one prompt set, flat, from the evaluation's metrics.json."""
    values = set_result["models"][label]
    vs = values.get("vs", {}).get("teacher", {})
    pair = next((p for p in set_result.get("pairwise", []) if p["x"] == label and p["y"] == "teacher"), {})
    suite = values.get("suite", {})
    return {"win_rate_vs_teacher": pair.get("win_rate"), "win_ci": [pair.get("ci_low"), pair.get("ci_high")],
            "lc_win_rate": pair.get("lc_win_rate"), "lc_ci": [pair.get("lc_ci_low"), pair.get("lc_ci_high")],
            "pairwise_n": pair.get("n"), "order_consistency": pair.get("order_consistency"),
            "accuracy": suite.get("accuracy"), "accuracy_ci": [suite.get("ci_low"), suite.get("ci_high")], "items": suite.get("n"),
            "instruction_strict": suite.get("instruction_strict", {}).get("accuracy"),
            "prompt_loose": suite.get("prompt_loose", {}).get("accuracy"),
            "teacher_logprob": values.get("teacher_logprob"), "f1_1": vs.get("f1_1"), "rouge_l": vs.get("rouge_l"),
            "mean_tokens": values.get("mean_tokens"), "eos_rate": values.get("eos_rate"), "repetition_4": values.get("repetition_4")}


def sameness(x: list[str], y: list[str]) -> dict[str, int]:
    """How many of x's answers are identical to y's for the same prompt, or a prefix of it (or it of x): two students
    that learned the same thing, or one that stops where the other goes on."""
    identical = sum(a == b for a, b in zip(x, y))
    prefix = sum(a != b and (a.startswith(b) or b.startswith(a)) for a, b in zip(x, y))
    return {"identical": identical, "prefix": prefix}


def answer_sameness(answers: list[dict[str, Any]], set_name: str, labels: list[str]) -> list[dict[str, Any]]:
    """Every pair of rows on one set: identical answers and prefixes (sameness), over the items both answered.
    `answers`: the rows of the part's generations.jsonl."""
    by_row: dict[str, dict[int, str]] = {label: {} for label in labels}
    for row in answers:
        if row.get("set") == set_name and row.get("model") in by_row:
            by_row[row["model"]][row["index"]] = row["response"]
    pairs = []
    for i, x in enumerate(labels):
        for y in labels[i + 1:]:
            items = sorted(set(by_row[x]) & set(by_row[y]))
            pairs.append({"x": x, "y": y, "items": len(items),
                          **sameness([by_row[x][k] for k in items], [by_row[y][k] for k in items])})
    return pairs


def interval(value: Any, bounds: list[Any]) -> str:
    return f"{number(value)} [{number(bounds[0])}, {number(bounds[1])}]" if isinstance(value, (int, float)) else "–"


SHARED_COLUMNS = "teacher log-prob / token | mean tokens | EOS rate | repetition-4 |"


def shared_cells(r: dict[str, Any]) -> str:
    return f"{number(r['teacher_logprob'], 3)} | {number(r['mean_tokens'], 1)} | {number(r['eos_rate'])} | {number(r['repetition_4'])} |"


def suite_table(table: dict[str, Any]) -> list[str]:
    """A program-checked suite: accuracy with its 95% Wilson interval per row (IFEval: prompt-level strict, with
    prompt-level loose and instruction-level strict beside it), then McNemar's exact test of every trained row
    against its base and against SeqKD."""
    ifeval = table["suite"] == "ifeval"
    extra = " prompt loose | instruction strict |" if ifeval else ""
    lines = [f"| model | {'prompt strict' if ifeval else 'accuracy'} [95% CI] |{extra} {SHARED_COLUMNS}",
             "|---|---|" + ("---:|---:|" if ifeval else "") + "---:|---:|---:|---:|"]
    for label, r in table["rows"].items():
        cells = f" {number(r['prompt_loose'])} | {number(r['instruction_strict'])} |" if ifeval else ""
        lines.append(f"| {label} | {interval(r['accuracy'], r['accuracy_ci'])} |{cells} {shared_cells(r)}")
    labels = [label for label in table["rows"] if label != "teacher"]
    base, trained = labels[0], labels[1:]  # eval_rows' order: teacher (where the part has it), base, trained rows (SeqKD first)
    wanted = {(x, base) for x in trained} | {(x, trained[0]) for x in trained[1:]}
    tests = [p if (p["x"], p["y"]) in wanted else swapped(p) for p in table["paired"]
             if (p["x"], p["y"]) in wanted or (p["y"], p["x"]) in wanted]
    if tests:
        lines += ["", "| paired (McNemar, exact) | items | X only / Y only | difference X − Y | p |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {p['x']} vs {p['y']} | {p['n']} | {p['x_only']} / {p['y_only']} | {p['difference']:+.3f} | {p['p_value']:.3g} |"
                  for p in tests]
    return lines


def swapped(p: dict[str, Any]) -> dict[str, Any]:
    """The same paired test read from the other side, so the trained row is X."""
    return {**p, "x": p["y"], "y": p["x"], "x_only": p["y_only"], "y_only": p["x_only"],
            "difference": 0.0 - p["difference"] if p["difference"] is not None else None}  # 0.0 - 0.0 is 0.0, not -0.0


def judged_table(table: dict[str, Any]) -> list[str]:
    """A judged set: the win rate against the teacher (both orders averaged) and its length-controlled form; without
    a teacher row, the judged pairs of students, then every row's own columns."""
    if "teacher" not in table["rows"]:
        return pair_table(table["pairwise"]) + ["", f"| model | {SHARED_COLUMNS}", "|---|---:|---:|---:|---:|"] + \
            [f"| {label} | {shared_cells(r)}" for label, r in table["rows"].items()]
    lines = [f"| model | win rate vs teacher [95% CI] | length-controlled [95% CI] | order consistency | F1-1 | ROUGE-L | {SHARED_COLUMNS}",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in table["rows"].items():
        judged = label != "teacher"
        win = interval(r["win_rate_vs_teacher"], r["win_ci"]) if judged else "(reference)"
        lc = interval(r["lc_win_rate"], r["lc_ci"]) if judged else "(reference)"
        overlap = f"{number(r['f1_1'])} | {number(r['rouge_l'])}" if judged else "– | –"
        lines.append(f"| {label} | {win} | {lc} | {number(r['order_consistency'])} | {overlap} | {shared_cells(r)}")
    return lines


def pair_table(pairs: list[dict[str, Any]]) -> list[str]:
    """Pairwise verdicts X vs Y: X's win rate (ties half, both orders averaged) with its interval, raw and
    length-controlled; wins and losses (X, resp. Y, preferred in both orders) with their exact sign test."""
    from opdistill.evaluate.stats import mcnemar_exact

    lines = ["| pair (judge, both orders) | items | X win rate [95% CI] | length-controlled [95% CI] | order consistency "
             "| X wins / ties / Y wins | sign test p |", "|---|---:|---|---|---:|---:|---:|"]
    return lines + [f"| {p['x']} vs {p['y']} | {p.get('n')} | {interval(p.get('win_rate'), [p.get('ci_low'), p.get('ci_high')])} | "
                    f"{interval(p.get('lc_win_rate'), [p.get('lc_ci_low'), p.get('lc_ci_high')])} | {number(p.get('order_consistency'))} | "
                    f"{p.get('wins')} / {p.get('ties')} / {p.get('losses')} | "
                    f"{p_value(p.get('sign_p', mcnemar_exact(p['wins'], p['losses'])))} |" for p in pairs]  # older results: no sign_p


def sameness_table(table: dict[str, Any]) -> list[str]:
    """Identical answers and prefixes between rows (issue 38 item 3: did two methods learn the same thing?)."""
    pairs = [p for p in table.get("sameness", []) if p["items"]]
    if not pairs:
        return []
    return ["| rows | items | identical | one a prefix of the other |", "|---|---:|---:|---:|"] + \
        [f"| {p['x']} / {p['y']} | {p['items']} | {p['identical']} | {p['prefix']} |" for p in pairs]


def gad_signal_lines(training: dict[str, Any]) -> list[str]:
    """The discriminator over GAD's adversarial steps, in quarters: accuracy, the reward (its score of the student's
    samples) against its score of the teacher's text, and the students' sample length. A reward that climbs while
    the length falls is the brevity hack to look for."""
    lines: list[str] = []
    for name, t in training.items():
        steps = t.get("adversarial_steps") or []
        if not steps:
            continue
        quarter = max(len(steps) // 4, 1)
        lines += [f"**{name}**: {len(steps)} adversarial steps, the discriminator by quarter", "",
                  "| steps | discriminator accuracy | reward (score of student samples) | score of teacher text | sample tokens |",
                  "|---|---:|---:|---:|---:|"]
        for start in range(0, len(steps), quarter):
            part = steps[start:start + quarter]
            mean = {k: sum(r.get(k, 0.0) for r in part) / len(part) for k in ("d_acc", "student_score", "teacher_score", "response_length")}
            lines.append(f"| {start + 1}–{start + len(part)} | {mean['d_acc']:.2f} | {mean['student_score']:.3f} | "
                         f"{mean['teacher_score']:.3f} | {mean['response_length']:.1f} |")
        lines.append("")
    return lines


def tuning_lines(tuning: dict[str, Any] | None) -> list[str]:
    """The sweeps on the in-distribution tuning split: every row's columns, the rule and the choices, each variant's
    settings and cost, and for GAD's variants their discriminator's signals."""
    if not tuning:
        return []
    chosen = "; ".join(f"{method}: **{choice}**" for method, choice in tuning["choices"].items())
    lines = ["## Tuning on the in-distribution split", "",
             f"{tuning['prompts']} training-distribution prompts no student trained on (none from IFEval or Vicuna). "
             f"Rule, declared before the sweep ran: {tuning['rule']}. Chosen: {chosen}. Only a choice that is not its "
             "method's default is evaluated on the held-out sets above.", "",
             f"| model | {SHARED_COLUMNS} F1-1 vs teacher | ROUGE-L |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {shared_cells(r)} {number(r['f1_1'])} | {number(r['rouge_l'])} |"
              for label, r in tuning["rows"].items() if label != "teacher"]
    lines += ["", "| variant | settings changed | generator updates | seconds / update |", "|---|---|---:|---:|"]
    for stage, t in tuning["training"].items():
        shown = ", ".join(f"{k}={v}" for k, v in tuning["changed"].get(stage, {}).items())  # rollout sizes follow n_samples
        lines.append(f"| {stage} | {shown} | {t.get('generator_updates', '–')} | {number(t.get('seconds_per_update'), 1)} |")
    return lines + ["", *gad_signal_lines(tuning["training"])]


def results_markdown(results: dict[str, Any]) -> str:
    from opdistill.evaluate.calibration import calibration_line

    s = results["settings"]
    lines = [f"# Quality benchmark ({s['size']} size)", "",
             f"Teacher {s['teacher']}. Black-box: system prompt {s['teacher_system']!r} (the teacher's alone), training limit "
             f"{s['train_tokens']} tokens, evaluation greedy at {s['eval_tokens']}. White-box: GSM8K train questions, system prompt "
             f"{s['whitebox_teacher_system']!r} (the teacher's alone), training limit {s['math_tokens']} tokens, evaluation greedy at "
             f"{s['suite_tokens']}. Suites are program-"
             "checked; the judge (the teacher, local, by its logits, both orders) only on Vicuna, beside its measured calibration.", ""]
    if results.get("interim"):
        lines += ["**Interim** (`--report-now`): the evaluation parts finished so far; the run was still going on.", ""]
    if host := results.get("machine"):
        lines += [f"Measured on {host['cpu']} ({host['cores']} cores, {host['torch_threads']} torch threads"
                  + (f", GPU {host['gpu']}" if host["gpu"] else "") + f"), native bf16: {'yes' if host['native_bf16'] else 'no'}, "
                  f"precision {host['precision']}.", ""]
    for family, sets in results["tables"].items():
        title = {"blackbox": f"Black-box, cross-family: student {s['blackbox_student']}",
                 "whitebox": f"White-box, same family: student {s['whitebox_student']} ({s['whitebox_tuning']})"}[family]
        lines += [f"## {title}", ""]
        if judge := results["judge"].get(family):
            lines += [calibration_line(judge.get("calibration")), ""]
        for set_name, table in sets.items():
            lines += [f"**{set_name}** ({table['prompts']} items)", ""]
            lines += (suite_table(table) if table["suite"] else judged_table(table)) + [""]
            if same := sameness_table(table):
                lines += [f"Answers alike on {set_name}:", "", *same, ""]
    lines += tuning_lines(results.get("tuning"))
    lines += ["## Training (compute matching)", "",
              "| run | generator updates | prompts / update | sequences trained | seconds in steps | seconds / update |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {t['generator_updates']} | {t['prompts_per_update']} | {t['generator_sequences']} | {t['step_seconds']:.0f} "
              f"| {t['seconds_per_update']:.1f} |" for name, t in results["training"].items()]
    lines += ["", *gad_signal_lines(results["training"])]
    lines += ["## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
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
    eval-FAMILY/PART/generations.jsonl); `finished` says whether the answer ended within the evaluation's token limit."""
    lines = ["## Sample answers", ""]
    for family, sets in results["tables"].items():
        answers = [json.loads(line) for name in results["files"]["generations"][family] if Path(name).is_file()
                   for line in Path(name).read_text(encoding="utf-8").splitlines() if line.strip()]
        lines += family_samples(answers, sets, per_set)
    return lines


def family_samples(answers: list[dict[str, Any]], sets: dict[str, Any], per_set: int) -> list[str]:
    lines: list[str] = []
    for set_name, table in sets.items():
        labels = list(table["rows"])
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
