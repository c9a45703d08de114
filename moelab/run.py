"""The whole lab loop as data: build -> routing probe -> eval of the MoE and its experts -> compare -> reports."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from moelab.errors import MoelabError
from moelab.eval.domain import TASKS_FROM_RECIPE

PACKAGE_DIR = Path(__file__).parent
DEMO_RECIPE = PACKAGE_DIR / "recipes" / "demo-smollm2.yaml"
DEMO_PROBE = PACKAGE_DIR / "data" / "probe" / "demo.yaml"
DEMO_DATA_DIR = PACKAGE_DIR / "data"  # holds bigbench/: the shipped subset of the Nous BIG-bench tasks
# The shipped subset also has bigbench_date_understanding (about 6 choices per example: slower),
# logical_deduction_three_objects and sports_understanding, left out for the time of the domain tasks and heal:
# retention is the demo's headline.
DEMO_TASKS = ("bigbench_navigate", "bigbench_snarks")
DEMO_LIMIT = 6
STAMPS_FILE = "run.json"  # stage name -> key of the inputs its outputs were made from
# In each model folder `moelab run` builds: a re-run replaces only folders holding it, never one it did not make.
RUN_MARKER = ".moelab-run"
BASELINE_SUFFIX = "-mergekit-way"  # the folder of the same experts merged as mergekit-moe does
# Wall seconds on 2 idle CPU cores, measured with SmolLM2-135M in float32 (`moelab demo` from a cold cache: 6.5 min
# wall, 11.8 min of CPU time over both cores). The fixed part: GGUF and LoRA conversion, the build with its fitted
# routers, the probe. Then per evaluated model (the mergekit-way MoE too) its loading, one loglikelihood request
# (prompt + one choice) of a short BIG-bench task, and a domain task's held-out item: a greedy answer of up to 64
# tokens, or the NLL of 256 tokens. The mergekit-way baseline's build is one pass over the positive prompts.
FIXED_SECONDS = 120
MODEL_LOAD_SECONDS = 5
SECONDS_PER_REQUEST = 0.1
DOMAIN_SECONDS_PER_ITEM = {"exact_match": 1.0, "nll": 1.4}
BASELINE_BUILD_SECONDS = 5
HEAL_SECONDS_PER_STEP = 3.7  # teacher passes included: 44 s for the demo's 12 steps
TIME_BUDGET_S = 600


@dataclass
class RunConfig:
    """What `moelab run` does: the recipe, where everything goes, and the eval settings shared by all models."""

    recipe: Path
    out: Path
    tasks: list[str]
    limit: Optional[int] = None
    data_dir: Optional[Path] = None  # None: lm-eval downloads the task data from the Hub
    probe: Optional[Path] = None  # labelled prompts; None: <recipe>.probe.yaml beside the recipe, else none
    device: str = "auto"
    remote: Optional[str] = None  # "runpod": also evaluate the MoE on a rented GPU (needs --publish for the upload)
    publish: Optional[str] = None  # Hub repo to upload the MoE to at the end
    mergekit_baseline: bool = False  # also build the experts mergekit-moe's way and compare both retentions

    @property
    def evaluates_domains(self) -> bool:
        """Whether the tasks include the recipe experts' domain tasks (the word `domains`)."""
        return TASKS_FROM_RECIPE in [t.strip().lower() for t in self.tasks]


@dataclass
class Stage:
    """One step of the loop. It is skipped when its outputs exist and `key()` (a digest of what they depend on:
    recipe hash, model content hash, eval settings, input reports) equals the key stored when they were made."""

    name: str
    summary: str
    outputs: list[Path]
    key: Callable[[], str]
    run: Callable[[], None]


@dataclass
class StageOutcome:
    name: str
    status: str  # "ran" | "up to date"
    seconds: float
    outputs: list[Path] = field(default_factory=list)


@dataclass
class RunPaths:
    """Where the loop writes: everything lives under `out`."""

    out: Path
    moe_name: str

    @property
    def model_dir(self) -> Path:
        return self.out / self.moe_name

    @property
    def reports_dir(self) -> Path:
        return self.out / "reports"

    @property
    def moe_report(self) -> Path:
        return self.reports_dir / self.moe_name / "nous.json"

    @property
    def probe_json(self) -> Path:
        return self.out / "probe.json"

    @property
    def heatmap(self) -> Path:
        return self.out / "routing.png"

    @property
    def compare_dir(self) -> Path:
        return self.out / "compare"

    @property
    def report_markdown(self) -> Path:
        return self.out / f"{self.moe_name}-Nous.md"

    @property
    def leaderboard_dir(self) -> Path:
        return self.out / "leaderboard"

    @property
    def remote_report(self) -> Path:
        return self.reports_dir / f"{self.moe_name}.runpod" / "nous.json"

    @property
    def baseline_dir(self) -> Path:
        return self.out / f"{self.moe_name}{BASELINE_SUFFIX}"

    @property
    def baseline_report(self) -> Path:
        return self.reports_dir / self.baseline_dir.name / "nous.json"

    @property
    def retention_markdown(self) -> Path:
        return self.out / "retention.md"

    @property
    def retention_json(self) -> Path:
        return self.out / "retention.json"


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(*paths: Path) -> str:
    return digest(*(hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths))


def probe_file_for(config: RunConfig) -> Optional[Path]:
    """The labelled prompts of the routing probe: --probe, else <recipe stem>.probe.yaml beside the recipe."""
    if config.probe is not None:
        if not Path(config.probe).is_file():
            raise MoelabError(f"--probe {config.probe} is not a file; give a YAML/JSONL of {{expert, text}}")
        return Path(config.probe)
    beside = Path(config.recipe).with_suffix(".probe.yaml")
    return beside if beside.is_file() else None


def run_name(recipe, recipe_path: Path) -> str:
    """The MoE's name, its folder's name under --out: the recipe's `name` (checked when it was read), else the
    recipe file's stem, when that is a usable name too."""
    from moelab.recipe import check_name

    try:
        return recipe.name or check_name(recipe_path.stem)
    except ValueError as err:
        raise MoelabError(f"{recipe_path}: the file name gives no model name ({err}); add a `name:` to the "
                          "recipe") from None


def plan_stages(config: RunConfig) -> list[Stage]:
    """The loop for `config`, in order. Nothing runs here; keys are computed when a stage is reached."""
    from moelab.eval import EvalSettings
    from moelab.recipe import load_recipe

    recipe, recipe_text = load_recipe(config.recipe)
    if config.remote not in (None, "runpod"):
        raise MoelabError(f"--remote {config.remote} is not supported; use --remote runpod")
    if config.limit is not None and config.limit < 1:
        raise MoelabError(f"--limit {config.limit} is not a number of examples; give 1 or more, or leave it out")
    paths = RunPaths(Path(config.out), run_name(recipe, Path(config.recipe)))
    settings = EvalSettings(tasks=list(config.tasks), limit=config.limit, device=config.device)
    data_files = _data_files(config)
    eval_key = [settings.tasks, settings.limit, [[str(p), p.stat().st_size] for p in data_files]]
    probe_file = probe_file_for(config)
    model_hash = lambda: _model_hash(paths.model_dir)  # noqa: E731 - only known once the build stage ran

    stages = [Stage("build", f"merge {len(recipe.experts)} experts into {paths.model_dir}",
                    [paths.model_dir / "moelab.json"], lambda: digest(recipe_text),
                    lambda: _build(recipe_text, paths.model_dir, config))]
    if config.mergekit_baseline:
        if not config.evaluates_domains:
            raise MoelabError(f"the mergekit-moe baseline is compared by retention on the recipe's domain tasks; add "
                              f"{TASKS_FROM_RECIPE} to --eval-tasks")
        baseline_text = mergekit_way_recipe(recipe_text)
        baseline_hash = lambda: _model_hash(paths.baseline_dir)  # noqa: E731
        domain_settings = EvalSettings(tasks=[TASKS_FROM_RECIPE], device=config.device)
        stages += [Stage("build mergekit-way", f"the same experts as mergekit-moe merges them, into "
                         f"{paths.baseline_dir}", [paths.baseline_dir / "moelab.json"], lambda: digest(baseline_text),
                         lambda: _build(baseline_text, paths.baseline_dir, config)),
                   Stage("eval mergekit-way", "its domain tasks", [paths.baseline_report],
                         lambda: digest(baseline_hash(), domain_settings.tasks),
                         lambda: run_eval_stage(paths.baseline_dir, domain_settings, None, paths.baseline_report))]
    if probe_file is not None:
        stages.append(Stage("probe", f"route the labelled prompts of {probe_file.name}",
                            [paths.probe_json, paths.heatmap], lambda: digest(model_hash(), file_digest(probe_file)),
                            lambda: _probe(paths, probe_file, config.device)))
    stages += [
        Stage("eval MoE", f"{','.join(settings.tasks)}, limit {config.limit}", [paths.moe_report],
              lambda: digest(model_hash(), eval_key),
              lambda: run_eval_stage(paths.model_dir, settings, config.data_dir, paths.moe_report)),
        Stage("eval experts", "each distinct expert, same settings", _expert_reports(recipe, paths),
              lambda: digest([e.source_model for e in recipe.experts], eval_key),
              lambda: _eval_experts(paths, config)),
        Stage("compare", "MoE vs its experts", [paths.compare_dir / n for n in ("compare.md", "compare.csv",
                                                                               "compare.png")],
              lambda: file_digest(*_report_files(paths), *([paths.probe_json] if probe_file else [])),
              lambda: _compare(paths, probe_file is not None)),
        Stage("report", "Nous report markdown", [paths.report_markdown],
              lambda: file_digest(paths.moe_report), lambda: _report_markdown(paths)),
        Stage("leaderboard", "the MoE's leaderboard row",
              [paths.leaderboard_dir / n for n in ("leaderboard.md", "leaderboard.csv", "leaderboard.png")],
              lambda: file_digest(paths.moe_report), lambda: _leaderboard(paths)),
    ]
    if config.mergekit_baseline:
        stages.append(Stage("retention", "moelab's MoE vs mergekit-moe's way, on each expert's domain",
                            [paths.retention_markdown, paths.retention_json],
                            lambda: file_digest(*_report_files(paths), paths.baseline_report),
                            lambda: _retention(paths)))
    if config.remote:
        stages.append(Stage("eval remote", f"the MoE on a {config.remote} GPU pod", [paths.remote_report],
                            lambda: digest(model_hash(), settings.tasks, settings.limit),
                            lambda: _eval_remote(paths, settings, config.publish)))
    if config.publish:
        stages.append(Stage("publish", f"upload the MoE to {config.publish}", [],
                            lambda: digest(model_hash(), file_digest(paths.moe_report), config.publish),
                            lambda: _publish(paths, config.publish)))
    return stages


def run_stages(stages: list[Stage], out: Path, on_start: Callable[[Stage], None] = lambda s: None,
               on_done: Callable[[StageOutcome], None] = lambda o: None) -> list[StageOutcome]:
    """Run each stage whose outputs are missing or stale; record its key once it succeeds, so a re-run after a
    failure starts at the failed stage."""
    from moelab.eval.report import write_text_atomic

    stamps = _read_stamps(out)
    outcomes = []
    for stage in stages:
        started = time.perf_counter()
        on_start(stage)
        if _is_current(stage, stamps):
            outcome = StageOutcome(stage.name, "up to date", 0.0, stage.outputs)
        else:
            stamps.pop(stage.name, None)
            stage.run()
            stamps[stage.name] = stage.key()
            write_text_atomic(Path(out) / STAMPS_FILE, json.dumps(stamps, indent=1) + "\n")
            outcome = StageOutcome(stage.name, "ran", time.perf_counter() - started, stage.outputs)
        outcomes.append(outcome)
        on_done(outcome)
    return outcomes


def all_up_to_date(stages: list[Stage], out: Path) -> bool:
    """True when a run would skip every stage (checked in order: a stage's key may need the previous outputs)."""
    stamps = _read_stamps(out)
    return all(_is_current(stage, stamps) for stage in stages)


def _read_stamps(out: Path) -> dict[str, str]:
    stamps_file = Path(out) / STAMPS_FILE
    return json.loads(stamps_file.read_text()) if stamps_file.is_file() else {}


def _is_current(stage: Stage, stamps: dict[str, str]) -> bool:
    return all(p.exists() for p in stage.outputs) and stage.name in stamps and stamps[stage.name] == stage.key()


# ---------------------------------------------------------------- the stages' work: calls into the other modules


def _build(recipe_text: str, model_dir: Path, config: RunConfig) -> None:
    from moelab.build import BuildOptions, build_moe, is_up_to_date
    from moelab.recipe import parse_recipe

    if not is_up_to_date(model_dir, recipe_text):
        build_moe(parse_recipe(recipe_text, str(config.recipe)), recipe_text, model_dir,
                  BuildOptions(device=config.device, force=True, owner=RUN_MARKER), recipe_dir=Path(config.recipe).parent)


def _model_hash(model_dir: Path) -> Optional[str]:
    from moelab.eval.local import model_identity

    return model_identity(str(model_dir))[1] if model_dir.is_dir() else None


def heatmap_text(prompts) -> str:
    """One prompt of each expert's domain in a row, so the heatmap shows the router switching between them."""
    first = {}
    for prompt in prompts:
        first.setdefault(prompt.expert, prompt.text)
    return "\n\n".join(first.values())


def _probe(paths: RunPaths, probe_file: Path, device: str) -> None:
    from moelab.build.gates import encode_prompts
    from moelab.eval.report import write_text_atomic
    from moelab.probe import load_labelled_prompts, load_moe, probe_routing, route_tokens, save_heatmap

    moe = load_moe(str(paths.model_dir), device)
    prompts = load_labelled_prompts(probe_file, moe.expert_names)
    result = probe_routing(moe, prompts, show_progress=True)
    save_heatmap(route_tokens(moe, encode_prompts(moe.tokenizer, [heatmap_text(prompts)])[0]), paths.heatmap)
    write_text_atomic(paths.probe_json, json.dumps({"prompts": str(probe_file), **result.to_json()}, indent=1))


def run_eval_stage(model_dir: Path, settings, data_dir: Optional[Path], report: Path) -> None:
    from moelab.eval import run_eval

    run_eval(str(model_dir), settings, data_dir, report)


def _eval_experts(paths: RunPaths, config: RunConfig) -> None:
    """Every expert again (their source or the settings changed): compare's --run-missing, with all missing."""
    from moelab.compare import (FolderReports, evaluate_missing_experts, experts_of_model, find_folder_reports,
                                report_path_for)

    found = find_folder_reports(paths.model_dir, paths.reports_dir)
    everyone = [(name, source, report_path_for(source, paths.reports_dir, paths.moe_name, name))
                for name, source in experts_of_model(paths.model_dir)]
    evaluate_missing_experts(FolderReports(paths.model_dir, found.moe, [], everyone), config.data_dir, config.device,
                             paths.reports_dir)


def _expert_reports(recipe, paths: RunPaths) -> list[Path]:
    """Where compare's --run-missing writes expert reports: one per distinct source, named by its first expert."""
    from moelab.compare import report_path_for

    first = {}
    for name, expert in zip(recipe.expert_names(), recipe.experts):
        first.setdefault(expert.source_model, report_path_for(expert.source_model, paths.reports_dir,
                                                              paths.moe_name, name))
    return list(first.values())


def _report_files(paths: RunPaths) -> list[Path]:
    """The MoE's report, then its experts' reports (compare's lookup under our reports folder)."""
    from moelab.compare import find_folder_reports

    found = find_folder_reports(paths.model_dir, paths.reports_dir)
    return [Path(found.moe.source)] + sorted({Path(e.source) for e in found.experts})


def _compare(paths: RunPaths, with_probe: bool) -> None:
    from moelab.compare import compare_inputs, write_comparison

    comparison = compare_inputs([paths.model_dir], paths.reports_dir,
                                probe=paths.probe_json if with_probe else None)
    write_comparison(comparison, paths.compare_dir)


def retention_versus_baseline(paths: RunPaths) -> list[dict]:
    """Per domain: base, expert, mergekit-way MoE and moelab's MoE, with both retentions and their SEs
    (compare.retention_rows of each MoE against the same base and expert reports)."""
    from moelab.compare import (experts_of_model, find_base_report, find_folder_reports, retention_rows,
                                scored_report)

    found = find_folder_reports(paths.model_dir, paths.reports_dir)
    base = find_base_report(found.moe, found.experts, dict(experts_of_model(paths.model_dir)))
    if base is None:
        raise MoelabError(f"no report of the base model under {paths.reports_dir}; the retention stage needs the "
                          "base as one of the experts (as the demo's chat expert)")
    experts = {e.name: e.report for e in found.experts}
    ours = retention_rows(base.report, experts, found.moe.report)
    theirs = {r["domain"]: r for r in retention_rows(base.report, experts,
                                                     scored_report(paths.baseline_report).report)}
    return [{**row, "mergekit_way": theirs[row["domain"]]["moe"],
             "mergekit_way_retention": theirs[row["domain"]]["retention"],
             "mergekit_way_retention_se": theirs[row["domain"]]["retention_se"]}
            for row in ours if row["domain"] in theirs]


def retention_headline(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text) of the demo's headline table."""
    from moelab.compare import retention_text
    from moelab.eval.domain import lower_is_better

    def value(v: float, metric: str) -> str:
        return f"{v:.3f}" if lower_is_better(metric) else f"{v * 100:.1f}"

    header = ["Domain", "Metric", "Base", "Expert", "mergekit-moe way MoE", "moelab MoE",
              "Retention, mergekit-moe way", "Retention, moelab"]
    body = [[r["domain"], r["metric"] + (" (lower is better)" if lower_is_better(r["metric"]) else " (%)"),
             value(r["base"], r["metric"]), f"{value(r['expert_value'], r['metric'])} ({r['expert']})",
             value(r["mergekit_way"], r["metric"]), value(r["moe"], r["metric"]),
             retention_text(r["mergekit_way_retention"], r["mergekit_way_retention_se"]),
             retention_text(r["retention"], r["retention_se"])] for r in rows]
    return header, body


def _retention(paths: RunPaths) -> None:
    from moelab.eval.report import write_text_atomic
    from moelab.leaderboard import markdown_table

    rows = retention_versus_baseline(paths)
    header, body = retention_headline(rows)
    write_text_atomic(paths.retention_json, json.dumps(rows, indent=1) + "\n")
    write_text_atomic(paths.retention_markdown,
                      f"Retention of each expert's gain over the base on its own held-out domain (± standard error), "
                      f"for {paths.moe_name} and for the same experts merged mergekit-moe's way (shared base "
                      f"weights, hidden router rows: {paths.baseline_dir.name}).\n\n{markdown_table(header, body)}\n")


def final_comparison(config: RunConfig):
    """The comparison that the compare stage wrote, read again from its reports (to print it); None before it ran."""
    from moelab.compare import compare_inputs
    from moelab.recipe import load_recipe

    recipe = load_recipe(config.recipe)[0]
    paths = RunPaths(Path(config.out), run_name(recipe, Path(config.recipe)))
    if not (paths.compare_dir / "compare.md").is_file():
        return None
    return compare_inputs([paths.model_dir], paths.reports_dir,
                          probe=paths.probe_json if paths.probe_json.is_file() else None)


def _report_markdown(paths: RunPaths) -> None:
    from moelab.eval.report import EvalReport, report_markdown, write_text_atomic

    write_text_atomic(paths.report_markdown, report_markdown(EvalReport.load(paths.moe_report)))


def _leaderboard(paths: RunPaths) -> None:
    from moelab.leaderboard import collect_entries, leaderboard_table, write_leaderboard

    # The MoE only: experts evaluated from derived sources (GGUF, LoRA) carry cache-folder names.
    write_leaderboard(leaderboard_table(collect_entries([str(paths.moe_report)])), paths.leaderboard_dir)


def _eval_remote(paths: RunPaths, settings, push: Optional[str]) -> None:
    from moelab.eval.remote import RemoteOptions, Secrets, run_remote_eval

    run_remote_eval(str(paths.model_dir), settings, paths.remote_report, RemoteOptions(), Secrets.from_env(), push)


def _publish(paths: RunPaths, repo: str) -> None:
    from moelab.publish import publish_model

    publish_model(paths.model_dir, repo, None, report=paths.moe_report, show_progress=True)


def nous_tasks(config: RunConfig):
    """The Nous tasks of --eval-tasks, without domain tasks (`domains`: the recipe's eval_data, or a tasks .yaml),
    which the eval stages pass through to run_eval and compare's retention table."""
    from moelab.eval.suite import select_tasks

    words = [w for w in config.tasks if w.strip().lower() != TASKS_FROM_RECIPE
             and not w.strip().lower().endswith((".yaml", ".yml"))]
    return select_tasks(",".join(words)) if words else []


def _data_files(config: RunConfig) -> list[Path]:
    """The local task files the eval reads (their size goes into the eval key), checked up front."""
    from moelab.eval.local import check_data_files, resolve_data_dir

    data_dir = resolve_data_dir(config.data_dir)
    if data_dir is None:
        return []
    tasks = nous_tasks(config)
    check_data_files(tasks, data_dir)
    return [data_dir / t.data_file for t in tasks]


# ---------------------------------------------------------------- the demo


def recipe_variant(recipe_text: str, **fields) -> str:
    """The recipe (YAML text) with top-level `fields` set; a field set to None is removed (back to its default)."""
    import yaml

    recipe = yaml.safe_load(recipe_text)
    for key, value in fields.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    return yaml.safe_dump(recipe, sort_keys=False)


def mergekit_way_recipe(recipe_text: str) -> str:
    """The same experts as mergekit-moe merges them: shared (non-MLP) weights of the base, hidden router rows from
    the positive prompts, no heal."""
    import yaml

    name = yaml.safe_load(recipe_text).get("name") or "moe"
    return recipe_variant(recipe_text, name=f"{name}-mergekit-way", shared_weights="base", gate_mode="hidden",
                          heal=None, router_training=None)


def demo_config(out: Path, limit: int = DEMO_LIMIT, tasks: Optional[list[str]] = None,
                device: str = "auto") -> RunConfig:
    """The demo: its recipe, the shipped BIG-bench subset and the experts' domain tasks, beside mergekit-moe's way."""
    return RunConfig(DEMO_RECIPE, Path(out), list(tasks or DEMO_TASKS) + [TASKS_FROM_RECIPE], limit, DEMO_DATA_DIR,
                     DEMO_PROBE, device, mergekit_baseline=True)


@dataclass
class RunEstimate:
    models: int  # the MoE and each distinct expert
    requests_per_model: int  # loglikelihood requests: examples x choices
    seconds: float
    domain_items: int = 0  # held-out items of the recipe's domain tasks, per model (the mergekit-way MoE too)

    @property
    def over_budget(self) -> bool:
        return self.seconds > TIME_BUDGET_S


def estimate_run(config: RunConfig) -> Optional[RunEstimate]:
    """A fresh run's time on 2 CPU cores, from the examples and choices it will score and the domain tasks' items
    (None without local data)."""
    from moelab.eval.domain import domains_of_recipe
    from moelab.eval.local import resolve_data_dir
    from moelab.recipe import load_recipe

    data_dir = resolve_data_dir(config.data_dir)
    if data_dir is None:
        return None
    recipe, recipe_text = load_recipe(config.recipe)
    models = 1 + len({e.source_model for e in recipe.experts})
    requests = 0
    for task in nous_tasks(config):
        with (data_dir / task.data_file).open() as rows:
            for n, line in enumerate(rows):
                if config.limit is not None and n >= config.limit:
                    break
                requests += len(json.loads(line)["multiple_choice_targets"])
    evaluated = models + config.mergekit_baseline  # the mergekit-way MoE is evaluated on the domain tasks too
    seconds = FIXED_SECONDS + evaluated * MODEL_LOAD_SECONDS + models * requests * SECONDS_PER_REQUEST
    domain_items = 0
    if config.evaluates_domains:
        import yaml

        for task in domains_of_recipe(yaml.safe_load(recipe_text), Path(config.recipe).parent, str(config.recipe)):
            with open(task.data_file) as rows:
                items = sum(1 for line in rows if line.strip())
            items = min(items, task.items or config.limit or items)
            domain_items += items
            seconds += evaluated * items * DOMAIN_SECONDS_PER_ITEM[task.kind]
    if config.mergekit_baseline:
        seconds += BASELINE_BUILD_SECONDS
    if recipe.heal is not None:
        seconds += recipe.heal.steps * HEAL_SECONDS_PER_STEP
    return RunEstimate(models, requests, seconds, domain_items)
