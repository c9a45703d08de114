"""Compare: is a MoE better than its experts? Task and group scores side by side, deltas with significance, verdict."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from pydantic import BaseModel, Field, ValidationError

from moelab.errors import MoelabError
from moelab.eval.domain import GROUP_PREFIX, lower_is_better
from moelab.eval.local import model_name_of
from moelab.eval.report import EvalReport, TaskResult, write_text_atomic
from moelab.files import read_user_text
from moelab.eval.suite import GROUPS, short_task_name, tasks_of_group
from moelab.leaderboard import eval_reports_under, markdown_table, rich_table, save_figure_atomic
from moelab.recipe import check_name

# A delta counts as a win or a loss only beyond this many standard errors (two-sided 95%).
Z_95 = 1.96
REPORT_FILE = "nous.json"
RETENTION_FILE = "retention.json"
# A MoE that keeps less than this share of an expert's gain on the expert's own domain is flagged.
RETENTION_FLAG = 0.8


@dataclass
class ScoredModel:
    """A model's eval report, with the name compare shows for it and the file it came from."""

    name: str
    report: EvalReport
    source: str


@dataclass
class Comparison:
    """Rows of a MoE-vs-experts comparison: one per task, then one per group and "Average" (Level says which).

    Values are percentages (x100). "Best expert" is the expert with the highest value on that row (the first of
    them on a tie; "Tied with" names the others); "Delta" is the
    MoE minus that expert, "±" the delta's standard error, "Outcome" win/loss beyond Z_95 standard errors, else
    "within noise" ("n/a" without stderr). `routing` (optional) holds each expert's routing shares from a probe.
    """

    moe: str
    experts: list[str]
    table: object  # pandas DataFrame
    verdict: str
    wins: int
    losses: int
    within_noise: int
    limited: bool
    warnings: list[str] = field(default_factory=list)
    routing: object = None  # pandas DataFrame (Expert, Domain tokens routed to it, Share of all tokens) or None
    retention: list[dict] = field(default_factory=list)  # retention_rows(), when the reports have domain tasks

    @property
    def tasks(self):
        return self.table[self.table["Level"] == "task"].reset_index(drop=True)

    @property
    def groups(self):
        return self.table[self.table["Level"] != "task"].reset_index(drop=True)


# ---------------------------------------------------------------- settings


def settings_differences(a: EvalReport, b: EvalReport) -> list[str]:
    """What makes two reports' scores incomparable: task set, few-shot counts, --limit, metrics."""
    differences = []
    if a.suite != b.suite:
        differences.append(f"suite {a.suite} vs {b.suite}")
    tasks_a, tasks_b = {r.task: r for r in a.results}, {r.task: r for r in b.results}
    if tasks_a.keys() != tasks_b.keys():
        only_a, only_b = sorted(tasks_a.keys() - tasks_b.keys()), sorted(tasks_b.keys() - tasks_a.keys())
        differences.append("tasks differ (" + ", ".join(
            part for part in [f"only in the first: {_few(only_a)}" if only_a else "",
                              f"only in the second: {_few(only_b)}" if only_b else ""] if part) + ")")
    common = [t for t in tasks_a if t in tasks_b]
    fewshot = [f"{t} {tasks_a[t].num_fewshot} vs {tasks_b[t].num_fewshot}" for t in common
               if tasks_a[t].num_fewshot != tasks_b[t].num_fewshot]
    if fewshot:
        differences.append(f"few-shot counts differ ({_few(fewshot)})")
    if a.settings.limit != b.settings.limit:
        differences.append(f"--limit {a.settings.limit} vs {b.settings.limit}")
    metrics = [f"{t} {tasks_a[t].metric} vs {tasks_b[t].metric}" for t in common
               if tasks_a[t].metric != tasks_b[t].metric]
    if metrics:
        differences.append(f"metrics differ ({_few(metrics)})")
    return differences


def _few(items: list[str], shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def check_comparable(moe: ScoredModel, experts: list[ScoredModel]) -> list[str]:
    """Raise MoelabError naming the difference when an expert's report was made differently; return soft warnings."""
    warnings = []
    for expert in experts:
        differences = settings_differences(moe.report, expert.report)
        if differences:
            raise MoelabError(f"cannot compare {moe.name} ({moe.source}) with {expert.name} ({expert.source}): "
                              + "; ".join(differences) + "; re-run `moelab eval` on both with the same --tasks, "
                              "--num-fewshot and --limit (or `moelab compare MODEL_DIR --run-missing`)")
        for setting in ("dtype", "max_length", "backend"):
            mine, theirs = getattr(moe.report.settings, setting), getattr(expert.report.settings, setting)
            if mine != theirs:
                warnings.append(f"{setting} differs: {moe.name} {mine}, {expert.name} {theirs}")
    return warnings


# ---------------------------------------------------------------- the comparison


def compare_reports(moe: ScoredModel, experts: list[ScoredModel], routing=None, base: ScoredModel | None = None):
    """Compare the MoE's report with its experts' reports (same settings, else MoelabError); with the base model's
    report, also how much of each expert's gain on its own domain the MoE keeps."""
    import pandas as pd

    if not experts:
        raise MoelabError("no expert report to compare with; pass EXPERT_REPORT files or a model folder whose "
                          "experts have reports (see --run-missing)")
    names = [moe.name] + [e.name for e in experts]
    if len(set(names)) != len(names):
        raise MoelabError(f"two models share a name ({', '.join(names)}); give each report a distinct model name")
    warnings = check_comparable(moe, experts)
    models = [moe, *experts]
    by_task = [{r.task: r for r in m.report.results} for m in models]

    rows = []
    for result in moe.report.results:
        scale = 1 if lower_is_better(result.metric) else 100  # an NLL is shown as is, a fraction as a percentage
        scores = [_scaled_pair(tasks[result.task].value, tasks[result.task].stderr, scale) for tasks in by_task]
        rows.append(_row("task", result.task, result.group, result.metric, names, scores,
                         lower_better=lower_is_better(result.metric)))
    group_scores = []
    for group in GROUPS:
        ran = [r.task for r in moe.report.results if r.group == group]
        if not ran:
            continue
        scores = [_mean_with_stderr([_percent_pair(tasks[t].value, tasks[t].stderr) for t in ran])
                  for tasks in by_task]
        group_scores.append(scores)
        complete = len(ran) == len(tasks_of_group(group))
        rows.append(_row("group", group, group, f"{len(ran)}/{len(tasks_of_group(group))} tasks", names, scores,
                         complete))
    if group_scores:  # AutoEval's overall score is the mean of the rounded group scores; a partial suite averages
        overall = [_mean_with_stderr([(round(s[i][0], 2), s[i][1]) for s in group_scores])
                   for i in range(len(models))]
        rows.append(_row("average", "Average", "all", f"{len(group_scores)}/{len(GROUPS)} groups", names, overall,
                         len(group_scores) == len(GROUPS)
                         and all(r["Complete"] for r in rows if r["Level"] == "group")))
    table = pd.DataFrame(rows)

    outcomes = table.loc[table["Level"] == "task", "Outcome"]
    wins, losses, noise = (int((outcomes == outcome).sum()) for outcome in ("win", "loss", "within noise"))
    limited = any(m.report.limited for m in models)
    if routing is not None:  # each expert's score and task wins beside the routing it gets
        routing = routing.copy()
        task_rows = table[table["Level"] == "task"]
        best_of_row = [[row["Best expert"], *filter(None, row["Tied with"].split(", "))]
                       for _, row in task_rows.iterrows()]
        routing.insert(1, "Average", [table.iloc[-1][name] for name in routing["Expert"]])
        routing.insert(2, "Best expert on (tasks)", [sum(best == [name] for best in best_of_row)
                                                     for name in routing["Expert"]])
        routing.insert(3, "Tied best on (tasks)", [sum(name in best and len(best) > 1 for best in best_of_row)
                                                   for name in routing["Expert"]])
    return Comparison(moe=moe.name, experts=[e.name for e in experts], table=table,
                      verdict=_verdict(table, moe.name, wins, losses, noise, moe.report.settings.limit
                                       if limited else None),
                      wins=wins, losses=losses, within_noise=noise, limited=limited, warnings=warnings,
                      routing=routing, retention=retention_rows(base.report, {e.name: e.report for e in experts},
                                                                moe.report) if base else [])


def _scaled_pair(value: float, stderr: float | None, scale: float) -> tuple[float, float | None]:
    return value * scale, (None if stderr is None or math.isnan(stderr) else stderr * scale)


def _percent_pair(value: float, stderr: float | None) -> tuple[float, float | None]:
    return _scaled_pair(value, stderr, 100)


def _mean_with_stderr(pairs: list[tuple[float, float | None]]) -> tuple[float, float | None]:
    """Unweighted mean (AutoEval's) and its standard error, taking the tasks' errors as independent."""
    mean = sum(v for v, _ in pairs) / len(pairs)
    if any(se is None for _, se in pairs):
        return mean, None
    return mean, math.sqrt(sum(se * se for _, se in pairs)) / len(pairs)


def _row(level: str, label: str, group: str, metric: str, names: list[str],
         scores: list[tuple[float, float | None]], complete: bool = True, lower_better: bool = False) -> dict:
    (moe_value, moe_se), experts = scores[0], scores[1:]
    sign = -1 if lower_better else 1
    best = max(range(len(experts)), key=lambda i: sign * experts[i][0])
    best_value, best_se = experts[best]
    tied = [names[1 + i] for i, (value, _) in enumerate(experts) if i != best and round(value, 2) == round(best_value, 2)]
    delta = moe_value - best_value
    # Unpaired error: the two models answered the same questions, so this overstates the noise (conservative).
    delta_se = None if moe_se is None or best_se is None else math.hypot(moe_se, best_se)
    if delta_se is None:
        outcome = "n/a"
    elif abs(delta) > Z_95 * delta_se:
        outcome = "win" if sign * delta > 0 else "loss"
    else:
        outcome = "within noise"
    return {"Level": level, "Name": label, "Group": group, "Metric": metric,
            **{name: round(value, 2) for name, (value, _) in zip(names, scores)},
            **{f"{name} ±": None if se is None else round(se, 2) for name, (_, se) in zip(names, scores)},
            "Best expert": names[1 + best], "Tied with": ", ".join(tied), "Delta": round(delta, 2),
            "±": None if delta_se is None else round(delta_se, 2), "Outcome": outcome, "Complete": complete}


def _verdict(table, moe: str, wins: int, losses: int, noise: int, limit: int | None) -> str:
    overall = table.iloc[-1]
    best, delta, se, outcome = overall["Best expert"], overall["Delta"], overall["±"], overall["Outcome"]
    spread = f"{delta:+.2f}" + ("" if _missing(se) else f" ± {se:.2f}")
    lead = {"win": f"{moe} beats its best single expert, {best}, by {spread} points on average",
            "loss": f"{moe} trails its best single expert, {best}, by {spread} points on average: "
                    "not worth its memory yet",
            "n/a": f"{moe} vs its best single expert, {best}: {spread} points on average (no stderr to judge it)",
            }.get(outcome, f"{moe} is within noise of its best single expert, {best} ({spread} points on average)")
    num_tasks = int((table["Level"] == "task").sum())
    scope = "" if overall["Complete"] else f" over a partial suite ({num_tasks} task{'s' * (num_tasks != 1)})"
    unknown = num_tasks - wins - losses - noise
    tasks = (f"per task vs the best expert: {wins} wins, {losses} losses, {noise} within noise"
             + (f", {unknown} without stderr" if unknown else ""))
    caveat = f"; limited run (--limit {limit}), indicative only" if limit is not None else ""
    return f"{lead}{scope}; {tasks}{caveat}."


# ---------------------------------------------------------------- retention of the experts' domain skills


def retention(base: float, expert: float, moe: float, lower_better: bool = False) -> float | None:
    """The share of the expert's gain over the base that the MoE keeps: (MoE - base) / (expert - base), or for a
    lower-is-better metric (base - MoE) / (base - expert). None when the expert gains nothing over the base."""
    gain, kept = (base - expert, base - moe) if lower_better else (expert - base, moe - base)
    return kept / gain if gain > 0 else None


def score_stderr(result: TaskResult) -> float | None:
    """A score's standard error. Exact match: binomial with the Agresti-Coull adjustment, sqrt(p(1-p)/(n+4)) for
    p = (hits+2)/(n+4), which does not claim certainty at 0 or n hits; otherwise the eval's own stderr."""
    if result.metric != "exact_match":
        return result.stderr
    adjusted = (result.value * result.n + 2) / (result.n + 4)
    return math.sqrt(adjusted * (1 - adjusted) / (result.n + 4))


def retention_stderr(base: tuple[float, float | None], expert: tuple[float, float | None],
                     moe: tuple[float, float | None], lower_better: bool = False) -> float | None:
    """Standard error of retention() from each (score, stderr), by the delta method with the three scores taken as
    independent. They are scored on the same items, which correlates them, so this errs on the large side.

    With g = expert - base and R the retention: Var(R) = (Var(moe) + R^2 Var(expert) + (1-R)^2 Var(base)) / g^2.
    """
    kept = retention(base[0], expert[0], moe[0], lower_better)
    if kept is None or None in (base[1], expert[1], moe[1]):
        return None
    gain = abs(expert[0] - base[0])
    return math.sqrt(moe[1] ** 2 + kept ** 2 * expert[1] ** 2 + (1 - kept) ** 2 * base[1] ** 2) / gain


def retention_rows(base: EvalReport, experts: dict[str, EvalReport], moe: EvalReport) -> list[dict]:
    """One row per domain task of the MoE's report: base, the domain's expert, MoE and retention.

    A domain's expert is the expert named like the domain (the recipe's eval_data), else the one scoring best on it.
    """
    rows = []
    for result in moe.results:
        if not result.group.startswith(GROUP_PREFIX):
            continue
        lower = lower_is_better(result.metric)
        found = {name: r for name, report in experts.items() for r in report.results if r.task == result.task}
        base_result = next((r for r in base.results if r.task == result.task), None)
        if not found or base_result is None:
            continue
        domain = result.group[len(GROUP_PREFIX):]
        scores = {name: r.value for name, r in found.items()}
        expert = domain if domain in scores else (min if lower else max)(scores, key=scores.get)
        scored = [(r.value, score_stderr(r)) for r in (base_result, found[expert], result)]
        kept = retention(*(value for value, _ in scored), lower)
        rows.append({"domain": domain, "metric": result.metric, "base": base_result.value, "expert": expert,
                     "expert_value": scores[expert], "moe": result.value, "retention": kept,
                     "retention_se": retention_stderr(*scored, lower),
                     "flagged": kept is not None and kept < RETENTION_FLAG})
    return rows


def retention_text(kept: float | None, stderr: float | None) -> str:
    """'60% ± 13%' (the standard error), '60%' without one, '' without a retention."""
    if kept is None:
        return ""
    return f"{kept:.0%}" + ("" if stderr is None else f" ± {stderr:.0%}")


def retention_section(rows: list[dict]) -> tuple[str, list[str], list[list[str]]]:
    """The retention table as (title, header, rows of text), for compare's outputs and the model card."""
    def value(v: float, metric: str) -> str:
        return f"{v:.3f}" if lower_is_better(metric) else f"{v * 100:.1f}"

    body = [[r["domain"], r["metric"] + (" (lower is better)" if lower_is_better(r["metric"]) else " (%)"),
             value(r["base"], r["metric"]), f"{value(r['expert_value'], r['metric'])} ({r['expert']})",
             value(r["moe"], r["metric"]),
             "n/a (expert gains nothing)" if r["retention"] is None
             else retention_text(r["retention"], r.get("retention_se"))
             + (f" ⚠ under {RETENTION_FLAG:.0%}" if r["flagged"] else "")]
            for r in rows]
    return ("Retention of each expert's domain skill",
            ["Domain", "Metric", "Base", "Expert", "MoE", "Retention"], body)


def find_base_report(moe: ScoredModel, experts: list[ScoredModel], sources: dict[str, str] | None = None
                     ) -> ScoredModel | None:
    """The report of the MoE's base_model among the experts' (its source, by name in `sources` or by report)."""
    base_ref = (moe.report.recipe or {}).get("base_model")
    if not base_ref:
        return None
    return next((e for e in experts if (sources or {}).get(e.name) == base_ref or _same_model(e.report, base_ref)),
                None)


# ---------------------------------------------------------------- finding reports for a model folder


def experts_of_model(model_dir: Path) -> list[tuple[str, str]]:
    """(name, source_model) of each expert, from the moelab.json that `moelab build` writes."""
    meta = Path(model_dir) / "moelab.json"
    try:
        data = json.loads(meta.read_text())
        return [(check_name(e["name"]), e["source_model"]) for e in data["experts"]]
    except FileNotFoundError:
        raise MoelabError(f"{model_dir} has no moelab.json, so its experts are unknown; it must be a folder built by "
                          "`moelab build`, or pass the report files: moelab compare MOE_REPORT EXPERT_REPORT...") from None
    except (ValueError, KeyError, TypeError) as err:  # names become report folders: check_name
        raise MoelabError(f"{meta} is damaged ({err}); rebuild the model with `moelab build`") from None


def report_path_for(model_ref: str, reports_dir: Path, moe_name: str, expert_name: str) -> Path:
    """Where --run-missing writes an expert's report: reports/<model-name>/nous.json for a model folder or Hub id;
    an expert built from a derived source (GGUF, pkg:, MODEL+LORA) is named after the MoE and the expert."""
    name = f"{moe_name}.{expert_name}" if _is_derived(model_ref) else Path(model_ref.rstrip("/")).name
    if name in ("", ".", ".."):
        raise MoelabError(f"expert source '{model_ref}' names no folder for its report; give its model folder as a "
                          "path that ends in the folder's name")
    return Path(reports_dir) / name / REPORT_FILE


def _is_derived(model_ref: str) -> bool:
    """A source that build turns into a model folder first (GGUF, pkg:, MODEL+LORA); eval needs that folder."""
    return model_ref.startswith("pkg:") or "+" in model_ref or model_ref.endswith(".gguf")


def source_label(model_ref: str) -> str:
    """A readable name for a derived source: a GGUF's stem, MODEL+ADAPTER as model+adapter (not a cache hash)."""
    return "+".join(Path(part.rstrip("/")).name.removesuffix(".gguf") for part in model_ref.split("+"))


def _same_model(report: EvalReport, model_ref: str) -> bool:
    if model_ref in (report.model, report.model_ref):
        return True
    mine, theirs = Path(report.model), Path(model_ref)
    return mine.exists() and theirs.exists() and mine.resolve() == theirs.resolve()


def pick_report(candidates: list[tuple[Path, EvalReport]], model_ref: str, expected_path: Path,
                like: EvalReport | None = None) -> tuple[Path, EvalReport] | None:
    """The report of `model_ref` (or the one at `expected_path`), preferring the settings of `like`, then the newest."""
    mine = [(p, r) for p, r in candidates if _same_model(r, model_ref) or p.resolve() == expected_path.resolve()]
    return max(mine, key=lambda pr: (like is None or not settings_differences(like, pr[1]), pr[1].date),
               default=None)


@dataclass
class FolderReports:
    model_dir: Path
    moe: ScoredModel
    experts: list[ScoredModel]
    missing: list[tuple[str, str, Path]]  # (expert name, source_model, where its report belongs)


def find_folder_reports(model_dir: Path, reports_dir: Path) -> FolderReports:
    """The MoE's report and its experts' reports in `reports_dir` (matched by the model each report evaluated)."""
    model_dir = Path(model_dir)
    experts_meta = experts_of_model(model_dir)
    candidates = eval_reports_under(reports_dir)
    moe_name = model_name_of(str(model_dir))
    moe_hit = pick_report(candidates, str(model_dir), Path(reports_dir) / moe_name / REPORT_FILE)
    if moe_hit is None:
        raise MoelabError(f"no report for {model_dir} under {reports_dir}; run "
                          f"`moelab eval {model_dir} --output {Path(reports_dir) / moe_name / REPORT_FILE}` first")
    moe = ScoredModel(moe_hit[1].model_name, moe_hit[1], str(moe_hit[0]))
    experts, missing = [], []
    for name, source in experts_meta:
        expected = report_path_for(source, reports_dir, moe_name, name)
        hit = pick_report(candidates, source, expected, like=moe.report)
        if hit is None or settings_differences(moe.report, hit[1]):  # made otherwise: --run-missing redoes it
            missing.append((name, source, expected))
        else:
            experts.append(ScoredModel(name, hit[1], str(hit[0])))
    return FolderReports(model_dir, moe, experts, missing)


def evaluate_missing_experts(found: FolderReports, data_dir: Path | None, device: str,
                             reports_dir: Path = Path("reports")) -> FolderReports:
    """Evaluate each expert without a report, with the MoE report's tasks, few-shot, limit, dtype and max length."""
    from dataclasses import replace

    from moelab.build.sources import resolve_model
    from moelab.eval import run_eval

    settings = replace(found.moe.report.settings, device=device, batch_size="auto",
                       tasks=expert_tasks(found.moe.report, found.model_dir, reports_dir))
    scored = {e.name: e for e in found.experts}
    by_source: dict[str, ScoredModel] = {}  # experts that share a source model are evaluated once
    for name, source, output in found.missing:
        if source not in by_source:
            if _is_derived(source):  # evaluated as its resolved folder; the report names the source
                report = run_eval(str(resolve_model(source)), settings, data_dir, output)
                report.model_ref, report.model_name = source, source_label(source)
                report.save(output)
            else:
                report = run_eval(source, settings, data_dir, output)
            by_source[source] = ScoredModel(name, report, str(output))
        scored[name] = replace(by_source[source], name=name)
    experts = [scored[name] for name, _ in experts_of_model(found.model_dir)]
    return FolderReports(found.model_dir, found.moe, experts, [])


def expert_tasks(moe: EvalReport, model_dir: Path, reports_dir: Path) -> list[str]:
    """The MoE report's tasks for its experts: domain tasks (from the MoE's recipe) go through a tasks file, written
    under reports_dir, since an expert's own folder has no recipe naming them."""
    from moelab.eval.domain import domains_of_recipe, tasks_file_text

    nous = [t for t in moe.settings.tasks if not t.startswith("domain_")]
    if len(nous) == len(moe.settings.tasks):
        return nous
    domains = [t for t in domains_of_recipe(moe.recipe, model_dir, f"{model_dir}/moelab_recipe.yaml")
               if t.name in moe.settings.tasks]
    tasks_file = Path(reports_dir) / f"{model_name_of(str(model_dir))}.domains.yaml"
    write_text_atomic(tasks_file, tasks_file_text(domains))
    return nous + [str(tasks_file)]


def scored_report(path: Path) -> ScoredModel:
    report = EvalReport.load(path)
    return ScoredModel(report.model_name, report, str(path))


def _name_experts_by_recipe(moe: ScoredModel, experts: list[ScoredModel]) -> None:
    """Call an expert report by its name in the MoE's recipe (as moelab.json and probes do) when it matches one."""
    recipe_experts = (moe.report.recipe or {}).get("experts") or []
    for expert in experts:
        for i, entry in enumerate(recipe_experts):
            if isinstance(entry, dict) and _same_model(expert.report, str(entry.get("source_model"))):
                expert.name = entry.get("name") or f"E{i}"


def _distinct_names(models: list[ScoredModel]) -> list[ScoredModel]:
    seen: dict[str, int] = {}
    for model in models:
        seen[model.name] = seen.get(model.name, 0) + 1
        if seen[model.name] > 1:
            model.name = f"{model.name} ({seen[model.name]})"
    return models


def compare_inputs(inputs: list[Path], reports_dir: Path = Path("reports"), run_missing: bool = False,
                   data_dir: Path | None = None, device: str = "auto", probe: Path | None = None) -> Comparison:
    """`moelab compare`: MOE_REPORT EXPERT_REPORT..., or one MODEL_DIR built by moelab (reports found in reports_dir)."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        model_dir = Path(inputs[0])
        found = find_folder_reports(model_dir, reports_dir)
        if found.missing and run_missing:
            found = evaluate_missing_experts(found, data_dir, device, reports_dir)
        if found.missing:
            raise MoelabError("no report for expert(s) " + ", ".join(f"{n} ({s})" for n, s, _ in found.missing)
                              + f" under {reports_dir}; add --run-missing to evaluate them with the MoE's settings")
        moe, experts = found.moe, found.experts
        sources = dict(experts_of_model(model_dir))
    elif len(inputs) >= 2:
        moe, *experts = [scored_report(Path(p)) for p in inputs]
        _name_experts_by_recipe(moe, experts)
        _distinct_names([moe, *experts])
        model_dir = Path(moe.report.model) if Path(moe.report.model).is_dir() else None
        sources = None
    else:
        raise MoelabError(f"give a MoE report and at least one expert report, or one model folder; got "
                          f"{', '.join(map(str, inputs)) or 'nothing'}")
    routing = routing_shares(probe, model_dir, [e.name for e in experts]) if probe else None
    return compare_reports(moe, experts, routing, find_base_report(moe, experts, sources))


# ---------------------------------------------------------------- routing shares


def routing_shares(probe: Path, model_dir: Path | None, expert_names: list[str]):
    """Each expert's routing shares: of the tokens labelled with its domain, the share routed to it (top-1), and
    its share of all routing choices.

    `probe` is either the JSON of `moelab chat MODEL --probe PROMPTS --json`, or the labelled prompts themselves
    (YAML/JSONL), routed here through the MoE in `model_dir`.
    """
    import pandas as pd

    probe = Path(probe)
    if probe.suffix == ".json":
        if not probe.exists():
            raise MoelabError(f"no probe file at {probe}; write one with "
                              "`moelab chat MODEL --probe PROMPTS.yaml --json > probe.json`")
        names, domain, usage = _probe_json_shares(probe)
    else:
        if model_dir is None:
            raise MoelabError(f"{probe} holds prompts, which need the model: use `moelab compare MODEL_DIR --probe "
                              f"{probe}`, or pass the JSON of `moelab chat MODEL --probe {probe} --json`")
        from moelab.probe import load_labelled_prompts, load_moe, probe_routing

        moe = load_moe(str(model_dir))
        result = probe_routing(moe, load_labelled_prompts(probe, moe.expert_names), show_progress=True)
        names, domain = result.expert_names, result.accuracy_per_expert()
        usage = dict(zip(names, result.usage.tolist()))
    if sorted(names) != sorted(expert_names):
        raise MoelabError(f"the probe routed experts {', '.join(names)}, but the comparison has "
                          f"{', '.join(expert_names)}; probe the same MoE")
    lacking = [n for n in names if n not in domain or n not in usage]
    if lacking:
        raise MoelabError(f"{probe} has no routing shares for expert(s) {', '.join(lacking)}; write it again with "
                          "`moelab chat MODEL --probe PROMPTS --json`")
    return pd.DataFrame({"Expert": expert_names,
                         "Domain tokens routed to it": [_share(domain[n]) for n in expert_names],
                         "Share of all tokens": [_share(usage[n]) for n in expert_names]})


Share = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ProbeShares(BaseModel):
    """The part of `moelab chat --probe --json` output that compare reads."""
    expert_names: list[str]
    accuracy_per_expert: dict[str, Optional[Share]]
    usage: dict[str, Share]


def _probe_json_shares(probe: Path) -> tuple[list[str], dict, dict]:
    """expert_names, accuracy_per_expert and usage of a `moelab chat --probe --json` file, each share in 0..1."""
    not_probe = f"{probe} is not the JSON of `moelab chat MODEL --probe PROMPTS --json`"
    try:
        shares = ProbeShares.model_validate(json.loads(read_user_text(probe, "probe file")))
    except (json.JSONDecodeError, RecursionError):
        raise MoelabError(f"{not_probe} (not JSON)") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise MoelabError(f"{not_probe}: {'.'.join(str(p) for p in first['loc']) or 'top level'}: {first['msg']}") \
            from None
    return shares.expert_names, shares.accuracy_per_expert, shares.usage


def _share(value: float | None) -> float | None:
    return None if value is None else round(value * 100, 2)


# ---------------------------------------------------------------- outputs


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def comparison_sections(comparison: Comparison) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows of text) of each table: groups, tasks and, with a probe, routing shares."""
    columns = ["Metric", comparison.moe, *comparison.experts, "Best expert", "Delta", "±", "Outcome"]

    def section(title: str, frame, first: str) -> tuple[str, list[str], list[list[str]]]:
        return title, [first, *columns], [[_cell(row["Name"]), *(_best_cell(row) if c == "Best expert" else _cell(row[c])
                                                                 for c in columns)]
                                          for _, row in frame.iterrows()]

    sections = [section("Groups", comparison.groups, "Group"), section("Tasks", comparison.tasks, "Task")]
    if comparison.retention:
        sections.append(retention_section(comparison.retention))
    if comparison.routing is not None:
        sections.append(("Routing (probe, % of tokens)", list(comparison.routing.columns),
                         [[_cell(v) for v in row] for row in comparison.routing.itertuples(index=False)]))
    return sections


def _best_cell(row) -> str:
    """The best expert, or every expert tied for best ("chat, math")."""
    return ", ".join([row["Best expert"], *filter(None, row["Tied with"].split(", "))])


def compact_section(title: str, header: list[str], rows: list[list[str]], moe: str):
    """A section narrowed for an 80-column terminal: task names without their group prefix, a metric shared by
    every row moved into the title, Delta and its ± in one column, and the MoE's column headed "MoE"."""
    if "±" in header:
        at = header.index("Delta")
        header = header[:at] + ["Delta ±"] + header[at + 2:]
        rows = [row[:at] + [" ± ".join(filter(None, row[at:at + 2]))] + row[at + 2:] for row in rows]
    if header[0] == "Task":
        rows = [[short_task_name(row[0]), *row[1:]] for row in rows]
    if "Metric" in header and len({row[header.index("Metric")] for row in rows}) == 1 and header[0] == "Task":
        at = header.index("Metric")
        title = f"{title} ({rows[0][at]})"
        header, rows = header[:at] + header[at + 1:], [row[:at] + row[at + 1:] for row in rows]
    return title, ["MoE" if name == moe else name for name in header], rows


def comparison_notes(comparison: Comparison) -> list[str]:
    notes = [f"Values are percentages (NLL as is); Delta = {comparison.moe} minus the best expert on that row; ± is "
             f"its standard error; a win or loss needs |Delta| > {Z_95} ±."]
    if comparison.retention:
        notes.append("Retention = (MoE - base) / (expert - base), the share of the expert's gain on its own domain "
                     f"that the MoE keeps (for NLL, (base - MoE) / (base - expert)); ⚠ under {RETENTION_FLAG:.0%}.")
    return notes + [f"Warning: {w}." for w in comparison.warnings]


def comparison_markdown(comparison: Comparison) -> str:
    """Verdict, the group table, the task table and (with a probe) routing shares, as GitHub markdown."""
    parts = [f"**Verdict:** {comparison.verdict}\n"]
    parts += [f"### {title}\n" + markdown_table(header, rows) + "\n" for title, header, rows in
              comparison_sections(comparison)]
    return "\n".join(parts + comparison_notes(comparison)) + "\n"


def comparison_view(comparison: Comparison):
    """The same content as rich renderables for the terminal."""
    from rich.console import Group
    from rich.text import Text

    return Group(Text(f"Verdict: {comparison.verdict}", style="bold"),
                 *(rich_table(*compact_section(title, header, rows, comparison.moe))
                   for title, header, rows in comparison_sections(comparison)),
                 Text(f"MoE: {comparison.moe}", style="dim"),
                 *(Text(note, style="dim") for note in comparison_notes(comparison)))


def plot_comparison(comparison: Comparison, path: Path) -> Path:
    """One panel per group (and the Average): a bar per model with its standard error; then retention per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [comparison.moe, *comparison.experts]
    rows = comparison.groups
    panels = len(rows) + bool(comparison.retention)
    figure, axes = plt.subplots(1, panels, figsize=(min(2.5 + 0.7 * len(models) * panels, 20), 4.2),
                                squeeze=False, layout="constrained")
    colors = ["black"] + [plt.get_cmap("tab10")(i) for i in range(len(comparison.experts))]
    for axis, (_, row) in zip(axes[0], rows.iterrows()):
        values = [row[m] for m in models]
        errors = [0 if _missing(row[f"{m} ±"]) else row[f"{m} ±"] for m in models]
        bars = axis.bar(range(len(models)), values, yerr=errors, color=colors, capsize=3)
        axis.bar_label(bars, labels=[f"{v:.1f}" for v in values], label_type="center", color="white", fontsize=9,
                       fontweight="bold")
        axis.set_xticks([])
        mark = {"win": " ▲", "loss": " ▼"}.get(row["Outcome"], "")
        axis.set_title(f"{row['Name']}{mark}\n({row['Metric']})", fontsize=9)
        axis.set_ylim(0, 105)
    if len(rows):
        axes[0][0].set_ylabel("score (%)")
    if comparison.retention:
        _plot_retention(axes[0][-1], comparison.retention)
    shares = {} if comparison.routing is None else dict(zip(comparison.routing["Expert"],
                                                             comparison.routing["Share of all tokens"]))
    labels = [f"{comparison.moe} (MoE)"] + [f"{m} (gets {shares[m]:.0f}% of tokens)" if m in shares else m
                                            for m in comparison.experts]
    if len(rows):
        figure.legend(bars, labels, loc="outside lower center", ncols=len(models), fontsize=8)
    figure.suptitle(f"{comparison.moe} vs its experts (▲/▼: MoE significantly above/below the best expert)",
                    fontsize=10)
    return save_figure_atomic(figure, path)


def _plot_retention(axis, rows: list[dict]) -> None:
    kept = [0.0 if r["retention"] is None else r["retention"] * 100 for r in rows]
    bars = axis.bar(range(len(rows)), kept, color=["tab:red" if r["flagged"] else "tab:green" for r in rows])
    axis.bar_label(bars, labels=["n/a" if r["retention"] is None else f"{k:.0f}%" for r, k in zip(rows, kept)],
                   fontsize=9)
    axis.axhline(RETENTION_FLAG * 100, color="gray", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(rows)), [r["domain"] for r in rows], fontsize=9)
    axis.set_ylim(min(0, *kept) - 5, max(110, *kept) + 10)
    axis.set_title(f"Retention of expert gain\n(% kept; dashed: {RETENTION_FLAG:.0%})", fontsize=9)


def comparison_csv(comparison: Comparison) -> str:
    return comparison.table.to_csv(index=False)


def write_comparison(comparison: Comparison, out_dir: Path) -> list[Path]:
    """compare.md, compare.csv, compare.png and (with domain tasks) retention.json in `out_dir`, each written
    atomically; `moelab publish --report` puts retention.json from reports/<moe>/compare/ into the card."""
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "compare.md", comparison_markdown(comparison))
    write_text_atomic(out_dir / "compare.csv", comparison_csv(comparison))
    written = [out_dir / "compare.md", out_dir / "compare.csv", plot_comparison(comparison, out_dir / "compare.png")]
    if comparison.retention:
        write_text_atomic(out_dir / RETENTION_FILE, json.dumps(comparison.retention, indent=2) + "\n")
        written.append(out_dir / RETENTION_FILE)
    return written
