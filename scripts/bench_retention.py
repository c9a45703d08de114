"""Benchmark how much of each expert's skill a MoE keeps, per shared_weights mode x gate mode, on held-out data.

Experts: the demo's (moelab/recipes/demo-smollm2.yaml): SmolLM2-135M-Instruct as the chat expert, plus its arithmetic
and code LoRA experts. Evaluated on the held-out sets shipped in moelab/data/heldout (math: exact answer, greedy with
the chat template, 64 new tokens; code: mean token NLL of the first 256 tokens), all through `moelab eval`'s domain
tasks:
- base, and each expert alone;
- perfect-routing ceilings: the base with one expert's MLP swapped in, shared (non-MLP) weights as each
  shared_weights mode merges them (taken from the MoE built with that mode);
- every MoE: shared_weights base|average|task_arithmetic|ties x gate_mode hidden|trained.
Retention = (model - base) / (expert - base) on the expert's own domain ((base - model) / (base - expert) for NLL).
Writes reports/bench/retention.json and reports/bench/retention.md.

usage: python scripts/bench_retention.py [--limit 20] [--device cpu|cuda] [--modes base,ties] [--gates hidden]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from moelab.build import BuildOptions, build_moe
from moelab.build.sources import SMOLLM2_REF, resolve_model
from moelab.compare import retention
from moelab.eval import run_eval
from moelab.eval.report import EvalReport, EvalSettings
from moelab.recipe import SHARED_WEIGHT_MODES, parse_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "moelab" / "recipes" / "demo-smollm2.yaml"
DOMAINS = {"math": {"path": "pkg:moelab/data/heldout/arith.jsonl", "kind": "exact_match"},
           "code": {"path": "pkg:moelab/data/heldout/code.jsonl", "kind": "nll"}}
OUT = REPO / "reports" / "bench"


def demo_recipe(shared_weights: str, gate_mode: str) -> str:
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe.update(shared_weights=shared_weights, gate_mode=gate_mode, name=f"retention-{shared_weights}-{gate_mode}")
    for expert in recipe["experts"]:
        if gate_mode == "trained":
            expert["router_data"] = f"pkg:moelab/data/router/{expert['name']}.jsonl"
    return yaml.safe_dump(recipe, sort_keys=False)


def ceiling_model(moe_dir: Path, base_dir: Path, expert_dir: Path, out: Path) -> Path:
    """A dense model: the expert's MLP tensors, every other tensor from the MoE (its merged shared weights)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def tensors(folder: Path) -> dict:
        found = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                found.update({name: f.get_tensor(name) for name in f.keys() if ".block_sparse_moe." not in name})
        return found

    shared, expert = tensors(moe_dir), tensors(expert_dir)
    dense = {name: (expert[name] if ".mlp." in name else shared[name]).contiguous() for name in tensors(base_dir)}
    out.mkdir(parents=True)
    save_file(dense, out / "model.safetensors", metadata={"format": "pt"})
    for file in base_dir.iterdir():
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json" and file.is_file():
            shutil.copy(file, out / file.name)
    return out


def evaluate(model: Path, label: str, tasks_file: Path, device: str, reports: Path, limit: int | None
             ) -> dict[str, float]:
    """The model's domain scores; a report of the same model folder and item count from an earlier run is reused."""
    path = reports / f"{label}.json"
    report = EvalReport.load(path) if path.is_file() else None
    if report is None or report.model != str(model) or {r.n for r in report.results} != {limit or 100}:
        report = run_eval(str(model), EvalSettings(tasks=[str(tasks_file)], device=device), None, path)
    return {r.task.removeprefix("domain_"): r.value for r in report.results}


def retention_table(scores: dict[str, dict[str, float]]) -> list[dict]:
    base, experts = scores["base"], {"math": scores["expert math"], "code": scores["expert code"]}
    rows = []
    for label, values in scores.items():
        row = {"model": label}
        for domain in DOMAINS:
            row[domain] = values[domain]
            row[f"{domain} retention"] = retention(base[domain], experts[domain][domain], values[domain],
                                                   lower_better=DOMAINS[domain]["kind"] == "nll")
        rows.append(row)
    return rows


def markdown(rows: list[dict], limit: int | None, device: str) -> str:
    def kept(value: float | None) -> str:
        return "" if value is None else f"{value:.0%}"

    lines = [f"Held-out items per domain: {limit or 'all 100'}; device {device}. Retention = share of the expert's "
             "gain over the base kept on its own domain.", "",
             "| model | math exact | math retention | code NLL | code retention |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['math']:.2f} | {kept(r['math retention'])} | {r['code']:.3f} "
              f"| {kept(r['code retention'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="held-out items per domain (default: all 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modes", default=",".join(SHARED_WEIGHT_MODES))
    parser.add_argument("--gates", default="hidden,trained")
    args = parser.parse_args()
    started = time.perf_counter()
    reports = OUT / "retention"
    work = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    try:
        tasks_file = work / "domains.yaml"
        tasks_file.write_text(yaml.safe_dump({name: {**spec, **({"limit": args.limit} if args.limit else {})}
                                              for name, spec in DOMAINS.items()}))
        base_dir = resolve_model(SMOLLM2_REF)
        expert_dirs = {"math": resolve_model(f"{SMOLLM2_REF}+pkg:moelab/data/experts/arith"),
                       "code": resolve_model(f"{SMOLLM2_REF}+pkg:moelab/data/experts/code")}
        scores = {"base": evaluate(base_dir, "base", tasks_file, args.device, reports,
                                   args.limit)}
        for name, folder in expert_dirs.items():
            scores[f"expert {name}"] = evaluate(folder, f"expert-{name}", tasks_file, args.device, reports,
                                                args.limit)
        print(json.dumps(scores, indent=1), flush=True)
        for mode in args.modes.split(","):
            for gate in args.gates.split(","):
                text = demo_recipe(mode, gate)
                moe_dir = work / f"moe-{mode}-{gate}"
                build_moe(parse_recipe(text), text, moe_dir, BuildOptions(device=args.device, show_progress=False),
                          recipe_dir=RECIPE.parent)
                if gate == args.gates.split(",")[0]:  # the shared weights are the same for every gate mode
                    for name, folder in expert_dirs.items():
                        ceiling = ceiling_model(moe_dir, base_dir, folder, work / f"ceiling-{mode}-{name}")
                        label = f"ceiling {name} MLP, shared {mode}"
                        scores[label] = evaluate(ceiling, label.replace(" ", "-").replace(",", ""), tasks_file,
                                                 args.device, reports, args.limit)
                        shutil.rmtree(ceiling)
                scores[f"MoE shared {mode}, gate {gate}"] = evaluate(moe_dir, f"moe-{mode}-{gate}", tasks_file,
                                                                     args.device, reports, args.limit)
                shutil.rmtree(moe_dir)
                print(json.dumps({k: v for k, v in scores.items() if mode in k}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = retention_table(scores)
    table = markdown(rows, args.limit, args.device)
    print(table)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "retention.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), "device": args.device, "limit": args.limit,
         "wall_s": round(time.perf_counter() - started, 1), "rows": rows}, indent=2) + "\n")
    (OUT / "retention.md").write_text(table)
    print(f"wrote {OUT / 'retention.json'} and {OUT / 'retention.md'}")


if __name__ == "__main__":
    main()
