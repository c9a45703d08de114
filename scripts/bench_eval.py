"""Benchmark `moelab eval`: examples/s on the 18 Nous BIG-bench tasks for SmolLM2-135M and a 4x SmolLM2 MoE.

Each (model, batch size) loads the model once through lm-eval's hf backend, runs one untimed warm-up task, then
times the tasks (the Bigbench group, or --tasks; at most --limit examples each) exactly as `moelab eval` runs
them. Prints a table and merges the figures into reports/bench/eval.json under this machine's device label (so CPU
and GPU runs sit side by side), with the MoE/dense ratio and the speed-up of each batch size over the smallest.

usage: python scripts/bench_eval.py [--limit 5] [--batch-sizes 1,8] [--device auto] [--data-dir ../shared/data]
                                    [--tasks Bigbench] [--repeats 1] [--dense PATH] [--moe PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def demo_moe(work: Path, device: str) -> Path:
    """The 4x SmolLM2 MoE of scripts/bench_build.py (the demo's experts plus a story expert), built once."""
    import yaml
    from bench_build import recipe_4x135m

    from moelab.build import BuildOptions, build_moe, is_up_to_date
    from moelab.recipe import load_recipe

    recipe_file, out = work / "moe-4x135m.yaml", work / "moe-4x135m"
    work.mkdir(parents=True, exist_ok=True)
    recipe_file.write_text(yaml.safe_dump(recipe_4x135m(), sort_keys=False))
    recipe, text = load_recipe(recipe_file)
    if not is_up_to_date(out, text):
        build_moe(recipe, text, out, BuildOptions(device=device, force=True), recipe_dir=work)
    return out


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({os.cpu_count()} cores, {platform.machine()})"


def bench_model(name: str, path: Path, batch_size: int, settings, data_dir: Path, repeats: int) -> dict:
    """Examples/s of settings.tasks for one model at one batch size: the fastest of `repeats` passes, so that other
    work on a shared machine weighs less (model loading not timed)."""
    from dataclasses import replace

    from lm_eval.tasks import TaskManager

    from moelab.eval.local import evaluate_task, load_language_model
    from moelab.eval.suite import select_tasks

    settings = replace(settings, batch_size=str(batch_size))
    started = time.perf_counter()
    lm = load_language_model(str(path), settings)
    load_s = time.perf_counter() - started
    task_manager = TaskManager(include_defaults=False)
    tasks = select_tasks(",".join(settings.tasks))
    evaluate_task(lm, tasks[0], replace(settings, limit=1), data_dir, task_manager)  # warm-up
    seconds = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        results = [evaluate_task(lm, task, settings, data_dir, task_manager) for task in tasks]
        seconds = min(seconds, time.perf_counter() - started)
    examples = sum(r.n for r in results)
    requests = sum(len(json.loads(line)["multiple_choice_targets"])
                   for task in tasks for line in (data_dir / task.data_file).read_text().splitlines()[:settings.limit])
    moelab_json = path / "moelab.json"
    experts = len(json.loads(moelab_json.read_text())["experts"]) if moelab_json.is_file() else None
    return {"model": name, "path": str(path), "experts": experts, "batch_size": batch_size, "examples": examples,
            "loglikelihood_requests": requests, "seconds": round(seconds, 2),
            "examples_per_s": round(examples / seconds, 3), "load_s": round(load_s, 2),
            "bigbench_score": round(sum(r.value for r in results) / len(results) * 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=5, help="examples per task")
    parser.add_argument("--tasks", default="Bigbench", help="BIG-bench tasks to time (a subset for slow CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each pass this many times, keep the fastest")
    parser.add_argument("--batch-sizes", default="1,8", help="comma list")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="auto: float16 on GPU, float32 on CPU")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="folder with bigbench/<task>.jsonl")
    parser.add_argument("--dense", type=Path, default=None, help="dense model folder [default: SmolLM2-135M-Instruct]")
    parser.add_argument("--moe", type=Path, default=None, help="MoE model folder [default: build the 4x SmolLM2 MoE]")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "moelab" / "bench-eval")
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "bench" / "eval.json")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from moelab.build.sources import SMOLLM2_REF, resolve_model
    from moelab.eval.report import EvalSettings, write_text_atomic
    from moelab.eval.local import resolve_settings
    from moelab.eval.suite import select_tasks

    settings = resolve_settings(EvalSettings(tasks=[t.name for t in select_tasks(args.tasks)], limit=args.limit,
                                             device=args.device, dtype=args.dtype))
    models = {"dense": args.dense or resolve_model(SMOLLM2_REF),
              "moe": args.moe or demo_moe(args.work, settings.device)}
    console = Console()
    runs = []
    for batch_size in map(int, args.batch_sizes.split(",")):
        for name, path in models.items():
            runs.append(bench_model(name, path, batch_size, settings, args.data_dir, args.repeats))
            console.print(f"{name} batch {batch_size}: {runs[-1]['examples_per_s']:.3f} examples/s", highlight=False)

    speed = {(r["model"], r["batch_size"]): r["examples_per_s"] for r in runs}
    batch_sizes = sorted({r["batch_size"] for r in runs})
    summary = {
        "moe_over_dense_examples_per_s": {str(b): round(speed["moe", b] / speed["dense", b], 3) for b in batch_sizes},
        "speedup_over_smallest_batch": {m: {str(b): round(speed[m, b] / speed[m, batch_sizes[0]], 3)
                                            for b in batch_sizes} for m in models},
    }
    label = device_label(settings.device)
    figures = json.loads(args.out.read_text()) if args.out.is_file() else {"devices": {}}
    figures["devices"][label] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "limit_per_task": args.limit,
        "repeats": args.repeats,
        "tasks": settings.tasks, "dtype": settings.dtype, "runs": runs, **summary,
        "load_average_1min": round(os.getloadavg()[0], 2),  # other work on this machine slows the timings
        "note": "seconds: fastest of `repeats` passes over the tasks, after one warm-up task; loading is load_s",
    }
    write_text_atomic(args.out, json.dumps(figures, indent=2) + "\n")

    table = Table(title=f"moelab eval, {len(settings.tasks)} BIG-bench tasks x {args.limit} examples, {label}, "
                        f"{settings.dtype}")
    for column in ("model", "experts", "batch", "examples", "seconds", "examples/s", "score"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in runs:
        table.add_row(r["model"], str(r["experts"] or 1), str(r["batch_size"]), str(r["examples"]),
                      f"{r['seconds']:.1f}", f"{r['examples_per_s']:.2f}", f"{r['bigbench_score']:.2f}")
    console.print(table)
    console.print(f"MoE/dense examples/s: {summary['moe_over_dense_examples_per_s']}; "
                  f"speed-up over batch {batch_sizes[0]}: {summary['speedup_over_smallest_batch']}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
