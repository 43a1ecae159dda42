"""Plain-text records ({"text": ...}) from ../shared/data for `method: kd` (examples/kd_corpus.yaml, docs/kd.md):
GSM8K train and test as "question\\n\\nsolution" texts (in distribution), Self-Instruct's text-davinci-003 answers
as texts (out of distribution for a GSM8K-trained student).

    python examples/kd/make_texts.py --out runs/kd/data
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def gsm8k_texts(path: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [{"text": f"{row['question']}\n\n{row['answer']}"} for row in rows]


def response_texts(path: Path) -> list[dict[str, str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    return [{"text": row["response"]} for row in rows if row.get("response", "").strip()]


def write(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/kd/data", help="directory for the three .jsonl files")
    parser.add_argument("--shared", default=str(SHARED), help="the shared data directory (default: ../shared/data)")
    args = parser.parse_args()
    out, shared = Path(args.out), Path(args.shared)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "gsm8k_train.jsonl", gsm8k_texts(shared / "gsm8k_train.jsonl"))
    write(out / "gsm8k_test.jsonl", gsm8k_texts(shared / "gsm8k_test.jsonl"))
    write(out / "selfinstruct.jsonl", response_texts(shared / "selfinstruct_user_oriented_text-davinci-003.jsonl"))
    print(f"wrote {out}/gsm8k_train.jsonl, gsm8k_test.jsonl, selfinstruct.jsonl")


if __name__ == "__main__":
    main()
