"""Benchmark gate_mode trained against hidden: held-out routing accuracy and load balance on SmolLM2.

Builds the demo's three experts (chat, math, code) with trained router rows fitted to moelab's router data
(moelab/data/router), and prints the held-out routing that the build measured for both kinds of rows.
Writes reports/bench/router.json.

usage: python scripts/bench_router.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from bench_report import write_bench_json

from moelab.build import BuildOptions, build_moe
from moelab.recipe import parse_recipe

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = yaml.safe_load((REPO / "moelab" / "recipes" / "demo-smollm2.yaml").read_text())
    recipe["gate_mode"] = "trained"
    for expert in recipe["experts"]:
        expert["router_data"] = f"pkg:moelab/data/router/{expert['name']}.jsonl"
    text = yaml.safe_dump(recipe, sort_keys=False)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        result = build_moe(parse_recipe(text), text, Path(work) / "moe", BuildOptions(device=args.device),
                           recipe_dir=REPO / "moelab" / "recipes")
        seconds = time.perf_counter() - start
    routing = result.routing.to_json()
    print(f"{'expert':>8} {'hidden':>8} {'trained':>8}")
    for name, accuracy in routing["trained"]["accuracy"].items():
        print(f"{name:>8} {routing['hidden']['accuracy'][name]:8.3f} {accuracy:8.3f}")
    print(f"{'overall':>8} {routing['hidden']['overall']:8.3f} {routing['trained']['overall']:8.3f}")
    print(f"{'CV':>8} {routing['hidden']['balance_cv']:8.3f} {routing['trained']['balance_cv']:8.3f}"
          f"   ({routing['heldout_tokens']} held-out token-layer choices; build {seconds:.0f} s on {args.device})")
    write_bench_json("router", {"date": time.strftime("%Y-%m-%d"), "device": args.device,
                                "build_s": round(seconds, 1), "routing": routing})


if __name__ == "__main__":
    main()
