"""Where benchmark scripts put their figures: reports/bench/<name>.json."""

from __future__ import annotations

import json
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1] / "reports" / "bench"


def write_bench_json(name: str, figures: dict) -> Path:
    out = BENCH_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")
    return out
