"""The real-teacher verdict over training seeds: several `benchmarks/quality.py` runs, one per seed, pooled.

    python benchmarks/quality.py --out runs/quality-cpu --size cpu --only blackbox                       # seed 0
    python benchmarks/quality.py --out runs/quality-cpu-seed1 --size cpu --only blackbox --seed 1 \\
        --reuse-from runs/quality-cpu                                                                  # the same texts
    python benchmarks/quality_seeds.py runs/quality-cpu runs/quality-cpu-seed1 --out runs/quality-seeds.md

For every program-checked suite of every evaluation part the runs share: each row's accuracy per seed, over the
seeds with its 95% interval over items, and the seed range; each trained row against the base and against SeqKD,
per seed (McNemar's exact test) and over the seeds (the sign test of the items one row passed in more seeds than the
other: the item is the unit, as opdistill.evaluate.stats says why). Rows missing from a run are left out; a tuned
row is pooled only where every run tuned to the same variant.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quality_runs import TUNED, recorded_choices  # benchmarks/, beside this script
from quality_stages import Stages, read_json_lines


def item_passes(run: Path) -> dict[str, dict[str, dict[Any, bool]]]:
    """`SUITE (FAMILY/PART)` -> row -> item key -> passed, from a run's per-item scores (scores.jsonl)."""
    from opdistill.evaluate.suites import get_suite

    found: dict[str, dict[str, dict[Any, bool]]] = {}
    for scores in sorted(run.glob("eval-*/*/suites/*/*/scores.jsonl")):
        row, suite, part, family = scores.parent.name, scores.parents[1].name, scores.parents[3].name, scores.parents[4].name
        field = get_suite(suite).id_field  # each suite names its items its own way (IFEval's key, HumanEval's task_id...)
        found.setdefault(f"{suite} ({family.removeprefix('eval-')}/{part})", {})[row] = \
            {item[field]: bool(item["passed"]) for item in read_json_lines(scores)}
    return found


def tuned_variants(run: Path) -> dict[str, str]:
    """Which variant each *-tuned row of a run is: its sweep's choice, or the choice it took over (--tuned-from)."""
    return {TUNED[method][1]: choice for method, choice in recorded_choices(Stages(run)).items() if choice != method}


def run_seed(run: Path) -> int:
    """The seed a run trained with, from what its SeqKD stage recorded."""
    for stage in ("blackbox-seqkd", "whitebox-seqkd"):
        marker = run / stage / "done.json"
        if marker.is_file():
            return int(json.loads(marker.read_text())["key"]["seed"])
    raise SystemExit(f"quality_seeds: {run}: no finished SeqKD stage, so no seed; is it a benchmarks/quality.py --out?")


def pooled_set(per_run: list[dict[str, dict[Any, bool]]], seeds: list[int], unpoolable: set[str]) -> dict[str, Any]:
    """One suite part over the runs: per-seed and pooled accuracy per row, and the paired tests."""
    from opdistill.evaluate.stats import paired_comparison, paired_over_seeds, proportion, rate_over_seeds

    def order(row: str) -> int:  # the reports' order: teacher, base, SeqKD, then the on-policy rows
        return next((rank for rank, end in enumerate(("teacher", "-base", "-seqkd")) if row.endswith(end)), 3)

    rows = sorted((row for row in per_run[0] if all(row in run for run in per_run) and row not in unpoolable), key=order)
    keys = sorted(set.intersection(*(set(run[row]) for run in per_run for row in rows)), key=str)
    table: dict[str, Any] = {"items": len(keys), "rows": {}, "paired": []}
    for row in rows:
        per_seed = [proportion(sum(run[row][k] for k in keys), len(keys)) for run in per_run]
        pooled = rate_over_seeds([[run[row][k] for k in keys] for run in per_run])
        shares = [p["accuracy"] for p in per_seed]
        table["rows"][row] = {"per_seed": dict(zip(map(str, seeds), per_seed)), "pooled": pooled, "seed_range": [min(shares), max(shares)]}
    base = next((row for row in rows if row.endswith("-base")), None)
    seqkd = next((row for row in rows if row.endswith("-seqkd")), None)
    trained = [row for row in rows if row not in (base, "teacher")]
    wanted = [(x, base) for x in trained if base] + [(x, seqkd) for x in trained if seqkd and x != seqkd]
    for x, y in wanted:
        per_seed = {str(s): paired_comparison([run[x][k] for k in keys], [run[y][k] for k in keys]) for s, run in zip(seeds, per_run)}
        pooled = paired_over_seeds([[run[x][k] for k in keys] for run in per_run], [[run[y][k] for k in keys] for run in per_run])
        table["paired"].append({"x": x, "y": y, "pooled": pooled, "per_seed": per_seed})
    return table


def pool(runs: list[Path]) -> dict[str, Any]:
    seeds = [run_seed(run) for run in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"quality_seeds: the runs share a seed ({seeds}); pool runs of different seeds")
    passes = [item_passes(run) for run in runs]
    shared = [name for name in passes[0] if all(name in p for p in passes[1:])]
    if not shared:
        raise SystemExit("quality_seeds: the runs have no evaluated suite in common")
    variants = [tuned_variants(run) for run in runs]
    unpoolable = {row for v in variants for row in v if len({other.get(row) for other in variants}) > 1}
    return {"runs": [str(r) for r in runs], "seeds": seeds, "tuned": variants, "left_out": sorted(unpoolable),
            "sets": {name: pooled_set([p[name] for p in passes], seeds, unpoolable) for name in shared}}


def percent(p: dict[str, Any]) -> str:
    if p["ci_low"] is None:  # one item: no interval over items
        return f"{p['accuracy']:.3f}"
    return f"{p['accuracy']:.3f} [{p['ci_low']:.3f}, {p['ci_high']:.3f}]"


def markdown(results: dict[str, Any]) -> str:
    seeds = results["seeds"]
    lines = [f"# The real-teacher verdict over seeds {seeds}", "",
             "Accuracy per seed, over the seeds with its 95% interval over items, and the seed range; McNemar's exact test "
             "per seed, and over the seeds the sign test of the items one row passed in more seeds than the other."]
    if results["left_out"]:
        lines += ["", f"Left out: {', '.join(results['left_out'])} (the runs tuned it to different variants: {results['tuned']})."]
    for name, table in results["sets"].items():
        lines += ["", f"## {name} ({table['items']} items)", "",
                  "| row | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled [95% CI] | seed range |",
                  "|---|" + "---:|" * len(seeds) + "---|---|"]
        for row, r in table["rows"].items():
            cells = " | ".join(f"{p['accuracy']:.3f}" for p in r["per_seed"].values())
            lo, hi = r["seed_range"]
            lines.append(f"| {row} | {cells} | {percent(r['pooled'])} | {lo:.3f} to {hi:.3f} |")
        if table["paired"]:
            lines += ["", "| paired | difference over seeds | items X more / Y more | sign test p | per seed: difference (McNemar p) |",
                      "|---|---:|---:|---:|---|"]
            for p in table["paired"]:
                q = p["pooled"]
                each = ", ".join(f"{v['difference']:+.3f} (p {v['p_value']:.2g})" for v in p["per_seed"].values())
                lines.append(f"| {p['x']} vs {p['y']} | {q['difference']:+.3f} | {q['x_more']} / {q['y_more']} | {q['p_value']:.2g} | {each} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="benchmarks/quality.py --out folders, one per seed")
    parser.add_argument("--out", type=Path, default=None, help="write the tables here (.md) and the numbers beside it (.json)")
    args = parser.parse_args(argv)
    results = pool(args.runs)
    text = markdown(results)
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
