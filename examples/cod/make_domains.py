"""Two-domain records for the cod example, from opdistill's built-in prompts (20 categories, train/heldout split).

Ten everyday-life categories make the domain "french" (peer A tutors there, reading "Always respond in
French."), ten knowledge-and-work categories the domain "spanish" (peer B tutors there, reading "Always
respond in Spanish."). Writes, under --out:
  train.jsonl             the built-in train prompts of both domains, each with its `domain`
  heldout_french.jsonl    the built-in held-out prompts of the french domain
  heldout_spanish.jsonl   ... of the spanish domain

    python examples/cod/make_domains.py --out runs/cod/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opdistill.data import builtin_prompts_path

FRENCH_DOMAIN = ("cooking", "travel", "home & garden", "hobbies & crafts", "pets", "shopping advice", "relationships & etiquette",
                 "planning", "brainstorming", "creative writing")
SPANISH_DOMAIN = ("definitions", "everyday science", "math word problems", "technology how-to", "personal finance", "work & career",
                  "learning & study tips", "summarising", "writing help", "health & fitness")


def domain_of(category: str) -> str:
    if category in FRENCH_DOMAIN:
        return "french"
    if category in SPANISH_DOMAIN:
        return "spanish"
    raise SystemExit(f"built-in category {category!r} is in neither domain: add it to FRENCH_DOMAIN or SPANISH_DOMAIN")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cod/data"))
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in builtin_prompts_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    files = {"train": [], "heldout_french": [], "heldout_spanish": []}
    for row in rows:
        domain = domain_of(row["category"])
        record = {"prompt": row["prompt"], "domain": domain, "category": row["category"]}
        files["train" if row["split"] == "train" else f"heldout_{domain}"].append(record)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        with open(args.out / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        print(f"{args.out / name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main()
