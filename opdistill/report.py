"""`opdistill report`: one self-contained HTML page (PNG plots embedded) for a run or a comparison of runs.

A run directory can hold an evaluation (metrics.json from `opdistill eval` or the demo, with
generations.jsonl) and/or a training run (metrics.jsonl with config.yaml; an evaluation points to its
training run with `training_run`). The page shows, top to bottom: per prompt set, the metric table with the
teacher as the reference row, a bar chart of the headline metric, overlap with each reference, the judge's
ratio and pairwise win rates; the training curves (several runs overlaid in the same panels); the training
configs; and a few generations side by side.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import OpdistillError
from .htmlpage import img, page, png, table, use_agg

# Training curves worth a panel, in display order, with a readable title. Only those present are drawn.
CURVES: list[tuple[tuple[str, ...], str]] = [
    (("loss", "g_ce_loss", "g_loss"), "generator loss"),
    (("d_loss",), "discriminator BT loss"),
    (("d_acc",), "discriminator accuracy (teacher > student)"),
    (("teacher_score", "student_score"), "discriminator scores"),
    (("reward_mean", "reward_std"), "reward (D score): mean and within-group std"),
    (("kl",), "KL to the reference / teacher"),
    (("entropy",), "student entropy (nats/token)"),
    (("response_length",), "student response length (tokens)"),
    (("lr",), "learning rate"),
]
SAMPLE_ROWS = 6
# Columns of the main table, in order, with their header; a column shows when some model has it.
MAIN_COLUMNS = [("responses", "responses"), ("mean_tokens", "mean tokens"), ("eos_rate", "EOS rate"), ("mean_words", "mean words"),
                ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"), ("repetition_4", "repetition (4-gram)"),
                ("teacher_logprob", "teacher log-prob / token")]
OVERLAP_COLUMNS = [("f1_1", "F1-1"), ("f1_2", "F1-2"), ("f1_3", "F1-3"), ("f1_4", "F1-4"), ("rouge_l", "ROUGE-L"),
                   ("embedding_cosine", "embedding cosine"), ("pairs", "prompts")]


@dataclass
class RunData:
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json (evaluation); empty when none
    history: list[dict[str, Any]] = field(default_factory=list)  # training metrics.jsonl
    config: dict[str, Any] = field(default_factory=dict)  # training config.yaml
    generations: list[dict[str, Any]] = field(default_factory=list)  # one row per set x prompt x model


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # a last line torn by a crash mid-write: the run's own loaders cut it off too
            raise OpdistillError(f"{path}:{number}: not valid JSON", "move the file aside or delete that line") from None
    return rows


def load_run(directory: str | Path) -> RunData:
    """Everything a report shows about one run directory."""
    path = Path(directory)
    if not path.is_dir():
        raise OpdistillError(f"{path} is not a directory", "pass a run directory written by opdistill eval, train or demo")
    metrics: dict[str, Any] = {}
    if (path / "metrics.json").is_file():
        try:
            metrics = json.loads((path / "metrics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise OpdistillError(f"{path / 'metrics.json'}: not valid JSON ({err.msg}, line {err.lineno})") from None
    training = Path(metrics["training_run"]) if metrics.get("training_run") else path
    config_file = training / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    run = RunData(path.name or str(path), metrics, read_jsonl(training / "metrics.jsonl"), config or {},
                  read_jsonl(path / "generations.jsonl"))
    if not run.metrics and not run.history:
        raise OpdistillError(f"{path} holds neither metrics.json nor metrics.jsonl", "pass a run directory written by opdistill eval, train or demo")
    return run


# ---------------------------------------------------------------- plots


def curves_png(histories: dict[str, list[dict[str, Any]]]) -> str | None:
    """One small panel per curve group present; several runs share the panels (legend: run, key)."""
    import matplotlib.pyplot as plt

    rows_all = [row for history in histories.values() for row in history]
    panels = [(keys, title) for keys, title in CURVES if any(k in row for row in rows_all for k in keys)]
    if not panels:
        return None
    columns = 3
    fig, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(4.2 * columns, 2.8 * math.ceil(len(panels) / columns)),
                             squeeze=False)
    for ax, (keys, title) in zip(axes.flat, panels):
        labelled = 0
        for run, history in histories.items():
            for key in keys:
                points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                if points:
                    ax.plot(*zip(*points), marker=".", label=f"{run}: {key}" if len(histories) > 1 else key)
                    labelled += 1
            stage_change = next((r["step"] for r in history if r.get("stage") == 1.0), None)
            if stage_change is not None:
                ax.axvline(stage_change - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if labelled > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def bars_png(values: dict[str, float], label: str, teacher: str | None, share: bool) -> str:
    import matplotlib.pyplot as plt

    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    bars = ax.barh(names, [values[n] for n in names], color=["#888" if n == teacher else "#3b7dd8" for n in names])
    for bar, name in zip(bars, names):
        text = f" {values[name]:.0%}" if share else f" {values[name]:.3g}"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    if share:
        ax.set_xlim(0, 1.1)
    ax.set_xlabel(label)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return png(fig)


# ---------------------------------------------------------------- sections


def ordered_models(models: dict[str, Any], teacher: str | None) -> list[str]:
    """The teacher (the reference row) first, then the others in their order."""
    return sorted(models, key=lambda name: name != teacher)


def row_name(name: str, teacher: str | None) -> str:
    return f"{name} (reference)" if name == teacher else name


def headline_of(metrics: dict[str, Any], models: dict[str, dict[str, Any]]) -> tuple[str, str, bool] | None:
    """(key, axis label, is a share) of the headline metric: the task check, else the judge ratio."""
    key = metrics.get("headline")
    if key and any(isinstance(m.get(key), (int, float)) for m in models.values()):
        return key, key.replace("_", " "), key.endswith("_share")
    if any(isinstance(m.get("judge", {}).get("judge_ratio"), (int, float)) for m in models.values()):
        return "judge_ratio", "judge score ratio (model / reference)", False
    return None


def headline_values(models: dict[str, dict[str, Any]], key: str) -> dict[str, float]:
    values = {}
    for name, m in models.items():
        value = m.get("judge", {}).get(key) if key == "judge_ratio" else m.get(key)
        if isinstance(value, (int, float)):
            values[name] = value
    return values


def eval_section(metrics: dict[str, Any]) -> list[str]:
    """Tables and the headline chart for every prompt set of one evaluation."""
    teacher = metrics.get("teacher")
    parts = []
    for set_name, result in metrics.get("sets", {}).items():
        models: dict[str, dict[str, Any]] = result.get("models", {})
        names = ordered_models(models, teacher)
        parts.append(f"<h3>Prompt set <code>{html.escape(set_name)}</code> ({result.get('prompts', '?')} prompts)</h3>")
        extra = sorted({k for m in models.values() for k in m if k.endswith("_share")})
        columns = [(k, k.replace("_", " ")) for k in extra] + [c for c in MAIN_COLUMNS if any(c[0] in m for m in models.values())]
        judged = any("judge" in m for m in models.values())
        header = ["model"] + [h for _, h in columns] + (["judge ratio", "judge score", "reference score", "judged", "unparsed", "failed"] if judged else [])
        rows = []
        for name in names:
            m = models[name]
            row = [row_name(name, teacher)] + [m.get(k) for k, _ in columns]
            if judged:
                j = m.get("judge", {})
                row += [j.get("judge_ratio"), j.get("judge_score"), j.get("judge_reference_score"), j.get("judged"), j.get("unparsed"), j.get("failed")]
            rows.append(row)
        parts.append(table(rows, header))
        if judged:
            reference = next((m["judge"]["reference"] for m in models.values() if "judge" in m), "")
            parts.append(f"<p>Judge ratio: the judge scores the model's answer and the <code>{html.escape(reference)}</code> answer 1–10 "
                         "in one reply; the ratio is the model's total over the reference's total (MiniLLM, GAD).</p>")
        headline = headline_of(metrics, models)
        if headline:
            key, label, share = headline
            parts.append(img(bars_png({n: v for n, v in headline_values(models, key).items()}, label, teacher, share), f"{label} per model"))
        for reference in result.get("references", []):
            overlap_rows = [[row_name(n, teacher)] + [models[n]["vs"][reference].get(k) for k, _ in OVERLAP_COLUMNS]
                            for n in names if reference in models[n].get("vs", {})]
            if overlap_rows:
                parts.append(f"<h4>Overlap with <code>{html.escape(reference)}</code> (word n-gram F1, ROUGE-L: diagnostics, higher is not better quality)</h4>")
                parts.append(table(overlap_rows, ["model"] + [h for _, h in OVERLAP_COLUMNS]))
        if result.get("suite"):
            parts += suite_tables(result, names, teacher)
        if result.get("pairwise"):
            parts.append("<h4>Pairwise (judge, both orders per prompt; an order-dependent verdict counts as a tie)</h4>")
            parts.append(table([[f"{p['x']} vs {p['y']}", p["n"], p["wins"], p["ties"], p["losses"], p["win_rate"],
                                 f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}]" if p["n"] else None, p.get("lc_win_rate"),
                                 p["order_consistency"], p["unparsed"], p["failed"]]
                                for p in result["pairwise"]],
                               ["pair (X vs Y)", "prompts", "X wins", "ties", "X losses", "X win rate", "95% interval",
                                "length-controlled win rate", "order consistency", "unparsed", "failed"]))
    return parts


def interval_text(p: dict[str, Any]) -> str | None:
    return f"[{p['ci_low']:.3f}, {p['ci_high']:.3f}]" if p.get("n") else None


def suite_tables(result: dict[str, Any], names: list[str], teacher: str | None) -> list[str]:
    """A program-checked suite's accuracy per model (95% Wilson intervals; IFEval's four levels) and McNemar's
    exact paired test of every two models on the same items."""
    models = result["models"]
    scored = [n for n in names if "suite" in models[n]]
    ifeval = any("instruction_strict" in models[n]["suite"] for n in scored)
    header = ["model", "items", "passed", "accuracy", "95% interval"]
    if ifeval:
        header += ["prompt loose", "instruction strict", "instruction loose"]
    rows = []
    for name in scored:
        summary = models[name]["suite"]
        row = [row_name(name, teacher), summary["n"], summary["passed"], summary["accuracy"], interval_text(summary)]
        if ifeval:
            row += [f"{summary[k]['accuracy']:.3f} {interval_text(summary[k])}" for k in ("prompt_loose", "instruction_strict", "instruction_loose")]
        rows.append(row)
    label = "prompt-level strict accuracy" if ifeval else "accuracy"
    parts = [f"<h4>Suite <code>{html.escape(result['suite'])}</code>: {label}, checked by program</h4>", table(rows, header),
             img(bars_png({n: models[n]["suite"]["accuracy"] for n in scored}, f"{result['suite']} {label}", teacher, True), f"{result['suite']} per model")]
    if result.get("paired"):
        parts.append("<h4>Paired tests on the same items (McNemar, exact; a small p says the two models differ)</h4>")
        parts.append(table([[f"{p['x']} vs {p['y']}", p["n"], p["both"], p["x_only"], p["y_only"], p["neither"], p["difference"], p["p_value"]]
                            for p in result["paired"]],
                           ["pair (X vs Y)", "items", "both pass", "only X", "only Y", "neither", "accuracy X − Y", "p-value"]))
    return parts


def generations_section(run: RunData, teacher: str | None) -> list[str]:
    """The first prompts of the first set, one column per model (the teacher first)."""
    if not run.generations:
        return []
    first_set = run.generations[0].get("set")
    by_prompt: dict[int, dict[str, Any]] = {}
    for row in run.generations:
        if row.get("set") == first_set:
            by_prompt.setdefault(row["index"], {"prompt": row["prompt"]})[row["model"]] = row["response"]
    models = ordered_models({row["model"]: None for row in run.generations if row.get("set") == first_set}, teacher)
    shown = [[by_prompt[i]["prompt"]] + [by_prompt[i].get(m, "") for m in models] for i in sorted(by_prompt)[:SAMPLE_ROWS]]
    return [f"<h3>Sample generations ({html.escape(run.name)}, set <code>{html.escape(str(first_set))}</code>)</h3>"
            f"<p>The first {len(shown)} of {len(by_prompt)} prompts.</p>",
            table(shown, ["prompt"] + [row_name(m, teacher) for m in models], css_class="text")]


def render_report(runs: list[RunData]) -> str:
    """The page as one string (pure: everything it shows is passed in)."""
    use_agg()
    title = "opdistill report: " + ", ".join(r.name for r in runs)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for run in runs:
        m = run.metrics
        if m.get("task"):
            parts.append(f"<p><b>{html.escape(run.name)}</b>: {html.escape(str(m['task']))}</p>")
        if m.get("seconds") is not None:
            parts.append(f"<p>{html.escape(run.name)}: wall time {m['seconds']:.0f} s.</p>")
    for run in runs:
        if run.metrics.get("sets"):
            parts.append(f"<h2>Evaluation: {html.escape(run.name)}</h2>")
            sampling = run.metrics.get("sampling")
            if sampling:
                parts.append(f"<p>Sampling (the same for every model): {html.escape(json.dumps(sampling))}.</p>")
            judge = run.metrics.get("judge")
            if judge:
                from .evaluate.calibration import calibration_line

                parts.append(f"<p>Judge: <code>{html.escape(str(judge.get('name')))}</code> ({html.escape(str(judge.get('method', 'text')))} "
                             f"verdicts). {html.escape(calibration_line(judge.get('calibration')))}.</p>")
            parts += eval_section(run.metrics)
    histories = {run.name: run.history for run in runs if run.history}
    curves = curves_png(histories)
    if curves:
        count = sum(map(len, histories.values()))
        parts.append(f"<h2>Training curves</h2><p>{count} logged steps in {len(histories)} run(s); a dashed line marks the start of GAD's adversarial stage.</p>")
        parts.append(img(curves, "training curves"))
    for run in runs:
        if run.config:
            parts.append(f"<h2>Training config: {html.escape(run.name)}</h2>")
            parts.append(table([[k, v if isinstance(v, (int, float, bool)) else str(v)] for k, v in run.config.items()], ["key", "value"]))
    for run in runs:
        parts += generations_section(run, run.metrics.get("teacher"))
    return page(title, parts)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Render the page for the given runs; default location: the single run's report.html."""
    if not run_dirs:
        raise OpdistillError("no run directory given")
    if out is None and len(run_dirs) > 1:
        raise OpdistillError("several runs make a comparison page", "say where it goes with --out FILE.html")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for i, run in enumerate(runs):  # runs from different parents can share a directory name
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({Path(run_dirs[i]).resolve().parent.name})"
    path = Path(out) if out else Path(run_dirs[0]) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(runs), encoding="utf-8")
    tmp.replace(path)
    return path
