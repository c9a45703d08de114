"""Write moelab/data/heal/{arith,code}.jsonl: heal data of the demo's two LoRA experts, from their own training data.

Reads ../shared/experts/data (the experts' training and held-out sets, see its README) and keeps the first COUNT rows
of each training set whose question (arith) or source file (code) is in no held-out set, so that healing never sees
an item that `moelab eval --tasks domains` scores. Deterministic: re-running it rewrites the same files.

usage: python scripts/make_heal_data.py [COUNT] [SHARED_EXPERTS_DATA]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "moelab" / "data" / "heal"
DEFAULT_SOURCE = ROOT.parent / "shared" / "experts" / "data"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(count: int = 200, source: Path = DEFAULT_SOURCE) -> None:
    held_questions = {row["question"] for name in ("arith_heldout.jsonl",)
                      for row in read_jsonl(source / name)}
    held_questions |= {row["question"] for row in read_jsonl(ROOT / "moelab" / "data" / "heldout" / "arith.jsonl")}
    held_files = {row["file"] for row in read_jsonl(source / "code_heldout.jsonl")}
    held_texts = {row["text"] for row in read_jsonl(ROOT / "moelab" / "data" / "heldout" / "code.jsonl")}
    arith = [{"question": r["question"], "solution": r["solution"]} for r in read_jsonl(source / "arith_train.jsonl")
             if r["question"] not in held_questions][:count]
    code = [{"text": r["text"]} for r in read_jsonl(source / "code_train.jsonl")
            if r["file"] not in held_files and r["text"] not in held_texts][:count]
    OUT.mkdir(parents=True, exist_ok=True)
    for name, rows in (("arith", arith), ("code", code)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{OUT / name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200, Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_SOURCE)
