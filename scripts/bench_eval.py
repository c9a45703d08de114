"""Benchmark `moelab eval` against the AutoEval way on the 18 Nous BIG-bench tasks: wall time, ratio, score agreement.

The AutoEval way is one lm-eval 0.4.13 `simple_evaluate` over all 18 tasks, hf backend, batch_size=auto (the same
task definitions moelab uses: its BIG-bench configs, Jinja templates included). `moelab eval` is the command with its
defaults. Each run is a fresh process, timed end to end (imports, model loading, data, scoring), and the two ways
alternate, `--repeats` times each. Models are random (only speed is compared; random logits make near-ties, so the
score columns show how often fp16 batching flips an item):
- dense: a random Llama, hidden 2048, 16 layers, 32 heads, MLP 6144, SmolLM2's 49152-token vocabulary (1.07B);
- moe: a 4-expert top-2 Mixtral built by `moelab build` (gate_mode random) from four such models.
`--size tiny` makes the same pair at hidden 64 (a CPU check of the script). Prints a table and writes
reports/bench/eval.json under this machine's device label.

usage: python scripts/bench_eval.py [--device auto] [--limit 250] [--repeats 2] [--data-dir ../shared/data]
                                    [--tokenizer DIR] [--size 1b|tiny] [--models dense,moe] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=6144, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=2048),
}
WAYS = ("autoeval", "moelab")


def default_tokenizer() -> Path:
    """SmolLM2-135M-Instruct's tokenizer (49152 tokens), where moelab has it cached (needs gguf on first use)."""
    from moelab.build.sources import SMOLLM2_REF, resolve_model

    return resolve_model(SMOLLM2_REF)


def make_random_llama(out: Path, tokenizer_dir: Path, size: str, seed: int, device: str) -> Path:
    """A random-weight float16 Llama of `size` with the given tokenizer, saved once."""
    import torch
    import transformers

    if (out / "config.json").is_file():
        return out
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **SIZES[size])
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def make_moe(work: Path, dense: list[Path], device: str) -> Path:
    """4-expert top-2 Mixtral of the dense models, through `moelab build` (random gates)."""
    import yaml

    from moelab.build import BuildOptions, build_moe, is_up_to_date
    from moelab.recipe import load_recipe

    recipe_file, out = work / "moe.yaml", work / "moe"
    recipe_file.write_text(yaml.safe_dump({
        "name": "bench-moe", "base_model": str(dense[0]), "gate_mode": "random", "dtype": "float16",
        "experts_per_token": 2, "experts": [{"source_model": str(d), "name": f"e{i}"} for i, d in enumerate(dense)]}))
    recipe, text = load_recipe(recipe_file)
    if not is_up_to_date(out, text):
        build_moe(recipe, text, out, BuildOptions(device=device, force=True, show_progress=False), recipe_dir=work)
    return out


def run_autoeval_way(model: str, data_dir: Path, limit: int, device: str, out: Path) -> None:
    """In its own process: one simple_evaluate over all 18 tasks, hf backend, batch_size=auto, fp16 on GPU."""
    from lm_eval.evaluator import simple_evaluate

    from moelab.eval.local import task_config
    from moelab.eval.suite import tasks_of_group

    tasks = tasks_of_group("Bigbench")
    gpu = device.startswith("cuda")
    # On a CPU, lm-eval's auto probe runs batch-64 forwards at full length (for a 49152-token vocabulary, 25 GB of
    # logits); the CPU check uses moelab's CPU batch size instead.
    output = simple_evaluate(model="hf", model_args={"pretrained": model, "dtype": "float16" if gpu else "float32",
                                                     "add_bos_token": False},
                             tasks=[task_config(t, data_dir) for t in tasks], batch_size="auto" if gpu else 8,
                             device=device,
                             limit=limit)
    out.write_text(json.dumps({t.name: output["results"][t.name]["multiple_choice_grade,none"] for t in tasks}))


def timed_run(way: str, model: Path, args, work: Path) -> tuple[float, dict[str, float], dict]:
    """(wall seconds, score per task, moelab's speed section or {}) of one fresh process."""
    scores_file, report = work / "autoeval-scores.json", work / "moelab-report" / "nous.json"
    shutil.rmtree(report.parent, ignore_errors=True)
    if way == "autoeval":
        command = [sys.executable, __file__, "--autoeval-run", str(model), "--out-json", str(scores_file)]
    else:
        command = [sys.executable, "-m", "moelab", "eval", str(model), "--tasks", "Bigbench", "--output", str(report)]
    command += ["--limit", str(args.limit), "--data-dir", str(args.data_dir), "--device", args.device]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{way} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if way == "autoeval":
        return seconds, json.loads(scores_file.read_text()), {}
    data = json.loads(report.read_text())
    return seconds, {r["task"]: r["value"] for r in data["results"]}, data["speed"]


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def items_per_task(data_dir: Path, limit: int) -> dict[str, int]:
    from moelab.eval.suite import tasks_of_group

    return {t.name: min(limit, len((data_dir / t.data_file).read_text().splitlines()))
            for t in tasks_of_group("Bigbench")}


def compare_model(name: str, model: Path, args, work: Path, console) -> dict:
    """Alternate the two ways on one model; wall times, the ratio of medians, per-task score differences."""
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    scores: dict[str, list[dict]] = {way: [] for way in WAYS}
    speed = {}
    for repeat in range(args.repeats):
        for way in WAYS if repeat % 2 == 0 else reversed(WAYS):
            wall, task_scores, run_speed = timed_run(way, model, args, work)
            seconds[way].append(round(wall, 2))
            scores[way].append(task_scores)
            speed = run_speed or speed
            console.print(f"{name} {way} run {repeat + 1}: {wall:.1f} s", highlight=False)
    median = {way: statistics.median(seconds[way]) for way in WAYS}
    items = items_per_task(args.data_dir, args.limit)
    difference = {task: round((scores["moelab"][0][task] - scores["autoeval"][0][task]) * items[task], 2)
                  for task in scores["autoeval"][0]}
    return {"model": name, "path": str(model), "seconds": seconds, "median_s": median,
            "ratio_moelab_over_autoeval": round(median["moelab"] / median["autoeval"], 3),
            "score_difference_items": difference, "tasks_differing": sum(d != 0 for d in difference.values()),
            "most_items_differing": max(abs(d) for d in difference.values()),
            "moelab_self_consistent": all(s == scores["moelab"][0] for s in scores["moelab"]),
            "autoeval_self_consistent": all(s == scores["autoeval"][0] for s in scores["autoeval"]),
            "autoeval_scores": scores["autoeval"][0], "moelab_scores": scores["moelab"][0], "moelab_speed": speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=250, help="items per task")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way per model, alternating")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with bigbench/<task>.jsonl for all 18 tasks")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with a tokenizer.json [default: SmolLM2-135M-Instruct's, cached by moelab]")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--models", default="dense,moe")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "moelab" / "bench-eval")
    parser.add_argument("--autoeval-run", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from moelab.build.gates import resolve_device

    args.device = resolve_device(args.device)
    args.data_dir = args.data_dir.resolve()
    if args.autoeval_run:
        run_autoeval_way(args.autoeval_run, args.data_dir, args.limit, args.device, args.out_json)
        return

    from rich.console import Console
    from rich.table import Table

    from bench_report import write_bench_json

    console = Console()
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or default_tokenizer()
    wanted = args.models.split(",")
    dense = [make_random_llama(work / f"dense-{seed}", tokenizer, args.size, seed, args.device)
             for seed in range(4 if "moe" in wanted else 1)]
    models = {"dense": dense[0], "moe": make_moe(work, dense, args.device) if "moe" in wanted else None}
    comparisons = [compare_model(name, models[name], args, work, console) for name in wanted]

    label = device_label(args.device)
    bench_file = REPO / "reports" / "bench" / "eval.json"
    figures = json.loads(bench_file.read_text()) if bench_file.is_file() else {}
    figures = {"devices": {k: v for k, v in figures.get("devices", {}).items() if "comparisons" in v}}
    # Runs of one model at a time (--models dense, then --models moe) add up under the same device label.
    earlier = [c for c in figures["devices"].get(label, {}).get("comparisons", []) if c["model"] not in wanted]
    comparisons = earlier + comparisons
    figures["devices"][label] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "size": args.size,
        "limit_per_task": args.limit, "repeats": args.repeats, "dtype": "float16" if args.device != "cpu" else "float32",
        "comparisons": comparisons, "load_average_1min": round(os.getloadavg()[0], 2),
        "note": "wall seconds of fresh processes, end to end; ratio = median moelab / median AutoEval way; "
                "score_difference_items = (moelab - AutoEval) x items per task, first run of each",
    }
    write_bench_json("eval", figures)

    table = Table(title=f"18 BIG-bench tasks x {args.limit} items, {label}, {args.size} models")
    for column in ("model", "AutoEval way s", "moelab eval s", "ratio", "tasks differing", "most items"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for c in comparisons:
        table.add_row(c["model"], ", ".join(f"{s:.1f}" for s in c["seconds"]["autoeval"]),
                      ", ".join(f"{s:.1f}" for s in c["seconds"]["moelab"]), f"{c['ratio_moelab_over_autoeval']:.2f}x",
                      str(c["tasks_differing"]), f"{c['most_items_differing']:g}")
    console.print(table)
    for c in comparisons:
        differing = {t: d for t, d in c["score_difference_items"].items() if d}
        console.print(f"{c['model']}: per-task differences in items (moelab - AutoEval): {differing or 'none'}; "
                      f"moelab speed: {c['moelab_speed']}", highlight=False)


if __name__ == "__main__":
    main()
