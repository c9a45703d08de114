"""Benchmark routing capture: wall time of `moelab chat --probe`'s forward passes with the router hooks against plain ones.

On the demo MoE (3 x SmolLM2-135M, 30 MoE layers; built with `moelab demo` into --model when missing), each round runs
every prompt of tests/fixtures/probe/smollm2.yaml once as a plain forward pass (the same call, no hooks) and once
through `route_tokens` (hooks, plus turning the record into a RoutingTrace), back to back in alternating order so that
both see the same load; the overhead is the median over rounds of traced / plain time, minus 1. Also times
`generate_traced` with and without tracing. Writes reports/bench/probe.json.

usage: python scripts/bench_probe.py [--model out/demo] [--rounds 7] [--generate-tokens 32] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml
from bench_report import write_bench_json

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "tests" / "fixtures" / "probe" / "smollm2.yaml"
TARGET_OVERHEAD = 0.10


def seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def compare(pairs: list, rounds: int) -> dict:
    """Time each (plain, traced) pair of callables back to back, alternating which goes first, so both see the same
    load on a shared machine; per round, the sums. Overhead: the median over rounds of traced / plain - 1."""
    for plain, traced in pairs:  # warm-up
        plain(), traced()
    plain_s, traced_s = [], []
    for round_index in range(rounds):
        sums = [0.0, 0.0]
        for pair_index, pair in enumerate(pairs):
            order = [0, 1] if (round_index + pair_index) % 2 == 0 else [1, 0]
            for which in order:
                sums[which] += seconds(pair[which])
        plain_s.append(sums[0])
        traced_s.append(sums[1])
    ratios = [t / p for p, t in zip(plain_s, traced_s)]
    return {"plain_s": round(statistics.median(plain_s), 4), "traced_s": round(statistics.median(traced_s), 4),
            "overhead": round(statistics.median(ratios) - 1, 4),
            "rounds_plain_s": [round(t, 4) for t in plain_s], "rounds_traced_s": [round(t, 4) for t in traced_s]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "out" / "demo", help="MoE folder (default: the demo)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--generate-tokens", type=int, default=32, help="0 skips the generation timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 gives steadier timings on a machine shared with other work)")
    args = parser.parse_args()
    if not (args.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "moelab", "demo", "--out", str(args.model), "--device", "cpu"],
                       check=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from moelab.build.gates import encode_prompts
    from moelab.chat import GenerationSettings, generate_traced
    from moelab.probe import load_moe, route_tokens

    moe = load_moe(str(args.model), device=args.device)
    texts = [row["text"] for row in yaml.safe_load(PROMPTS.read_text())]
    token_lists = encode_prompts(moe.tokenizer, texts)

    def plain_forward(ids):
        with torch.no_grad():  # reading the logits waits for the GPU, as route_tokens waits for the routing
            moe.model(torch.tensor([ids], device=moe.device), use_cache=False, logits_to_keep=1).logits.cpu()

    results = {"probe": compare([(lambda ids=ids: plain_forward(ids), lambda ids=ids: route_tokens(moe, ids))
                                 for ids in token_lists], args.rounds)}
    print(f"probe ({len(texts)} prompts, {sum(map(len, token_lists))} tokens): plain "
          f"{results['probe']['plain_s']:.3f} s, traced {results['probe']['traced_s']:.3f} s, "
          f"overhead {results['probe']['overhead']:+.1%} (target < {TARGET_OVERHEAD:.0%})")
    if args.generate_tokens:
        # Greedy: both runs generate the same tokens, so they do the same work.
        settings = GenerationSettings(max_new_tokens=args.generate_tokens, temperature=0)
        prompt = moe.tokenizer.apply_chat_template([{"role": "user", "content": "What is 12, then times 3?"}],
                                                   tokenize=False, add_generation_prompt=True)
        ids = moe.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        results["generate"] = compare([(lambda: generate_traced(moe, ids, settings, trace=False),
                                        lambda: generate_traced(moe, ids, settings))], args.rounds)
        print(f"generate ({args.generate_tokens} new tokens at most): plain {results['generate']['plain_s']:.3f} s, "
              f"traced {results['generate']['traced_s']:.3f} s, overhead {results['generate']['overhead']:+.1%}")

    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "model": str(args.model), "device": str(moe.device), "dtype": str(moe.model.dtype).removeprefix("torch."),
              "moe_layers": len(moe.layers), "experts": moe.expert_names,
              "probe_prompts": len(texts), "probe_tokens": sum(map(len, token_lists)), "rounds": args.rounds,
              "results": results, "probe_overhead_within_target": results["probe"]["overhead"] < TARGET_OVERHEAD}
    write_bench_json("probe", report)


if __name__ == "__main__":
    main()
