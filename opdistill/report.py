"""report.html for a run: one self-contained page (PNG plots embedded) a person reads top to bottom.

Sections: the evaluation table with the teacher as the reference row and a bar chart of the headline
metric; the training curves from the training run's metrics.jsonl (loss, discriminator accuracy and
scores, rewards, KL, response length, ...); the training config; a few generations side by side.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import yaml

from .htmlpage import fmt, img, page, png, table, use_agg

# Training curves worth a panel, in display order, with a readable title. Only those present are drawn.
CURVES: list[tuple[tuple[str, ...], str]] = [
    (("loss", "g_ce_loss", "g_loss"), "generator loss"),
    (("d_loss",), "discriminator BT loss"),
    (("d_acc",), "discriminator accuracy (teacher > student)"),
    (("teacher_score", "student_score"), "discriminator scores"),
    (("reward_mean", "reward_std"), "reward (D score): mean and within-group std"),
    (("kl",), "k3 KL to the reference"),
    (("entropy",), "student entropy (nats/token)"),
    (("response_length",), "student response length (tokens)"),
    (("lr",), "learning rate"),
]
SAMPLE_ROWS = 6


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def curves_png(history: list[dict[str, Any]]) -> str | None:
    """One small panel per curve group present in the history; stage boundaries (GAD) as a dashed line."""
    import matplotlib.pyplot as plt

    panels = [(keys, title) for keys, title in CURVES if any(k in row for row in history for k in keys)]
    if not panels:
        return None
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False)
    stage_change = next((r["step"] for r in history if r.get("stage") == 1.0), None)
    for ax, (keys, title) in zip(axes.flat, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker=".", label=key)
        if stage_change is not None:
            ax.axvline(stage_change - 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def headline_png(models: dict[str, dict[str, float]], key: str, label: str) -> str:
    import matplotlib.pyplot as plt

    names = list(models)
    values = [models[n].get(key, float("nan")) for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(names)))
    bars = ax.barh(names[::-1], values[::-1], color=["#888" if "teacher" in n else "#3b7dd8" for n in names[::-1]])
    for bar, value in zip(bars, values[::-1]):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.0%}", va="center", fontsize=8)
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(label)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return png(fig)


def render_run_report(metrics: dict[str, Any], history: list[dict[str, Any]], config: dict[str, Any],
                      generations: list[dict[str, Any]]) -> str:
    """The page as one string (pure: everything it shows is passed in)."""
    use_agg()
    models: dict[str, dict[str, float]] = metrics.get("models", {})
    headline = metrics.get("headline", "")
    columns = sorted({k for values in models.values() for k in values}, key=lambda k: (k != headline, k))
    parts = [f"<h1>opdistill run report</h1><p>{html.escape(str(metrics.get('task', '')))}</p>"]
    if "seconds" in metrics:
        parts.append(f"<p>Wall time {metrics['seconds']:.0f} s.</p>")
    parts.append("<h2>Evaluation</h2>")
    parts.append(table([[name] + [values.get(c) for c in columns] for name, values in models.items()], ["model"] + columns))
    if headline and models:
        parts.append(img(headline_png(models, headline, headline.replace("_", " ")), f"{headline} per model"))
    curves = curves_png(history)
    if curves:
        parts.append(f"<h2>Training curves</h2><p>{len(history)} logged steps; the dashed line marks the start of the adversarial stage.</p>")
        parts.append(img(curves, "training curves"))
    if config:
        parts.append("<h2>Training config</h2>" + table([[k, v if isinstance(v, (int, float, bool)) else str(v)] for k, v in config.items()],
                                                         ["key", "value"]))
    if generations:
        names = [k for k in generations[0] if k != "prompt"]
        shown = [[row.get("prompt", "")] + [row.get(n, "") for n in names] for row in generations[:SAMPLE_ROWS]]
        parts.append(f"<h2>Sample generations</h2><p>The first {len(shown)} of {len(generations)} evaluation prompts.</p>")
        parts.append(table(shown, ["prompt"] + names, css_class="text"))
    return page("opdistill report", parts)


def write_run_report(run_dir: str | Path) -> Path:
    """Read what a demo/eval run wrote in run_dir (metrics.json, generations.jsonl, the training run it names)
    and write run_dir/report.html."""
    out = Path(run_dir)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    training = Path(metrics["training_run"]) if metrics.get("training_run") else out
    config_file = training / "config.yaml"
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    text = render_run_report(metrics, read_jsonl(training / "metrics.jsonl"), config or {}, read_jsonl(out / "generations.jsonl"))
    path = out / "report.html"
    path.write_text(text, encoding="utf-8")
    return path
