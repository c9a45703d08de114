"""`moelab compare`: a MoE's report against its experts' reports, handcrafted edge cases and a small real eval."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from moelab.compare import (compare_inputs, compare_reports, comparison_markdown, comparison_view, ScoredModel,
                            write_comparison)
from moelab.errors import MoelabError
from moelab.eval.report import EvalReport, EvalSettings, TaskResult, group_scores, overall_average
from moelab.eval.suite import NOUS_TASKS

SHIPPED_DATA = "pkg:moelab/data"  # the BIG-bench subset shipped with moelab
TASKS = [("bigbench_navigate", "Bigbench", "multiple_choice_grade", 0.02),
         ("bigbench_snarks", "Bigbench", "multiple_choice_grade", 0.03),
         ("bigbench_sports_understanding", "Bigbench", "multiple_choice_grade", 0.02),
         ("truthfulqa_mc", "TruthfulQA", "mc2", 0.02)]


def make_report(name: str, values: list[float], limit: int | None = None, model: str | None = None,
                tasks=TASKS, recipe: dict | None = None) -> EvalReport:
    results = [TaskResult(task, group, metric, value, stderr, 100, "1", 0)
               for (task, group, metric, stderr), value in zip(tasks, values)]
    groups = group_scores(results)
    return EvalReport(model=model or f"/models/{name}", model_name=name,
                      settings=EvalSettings(tasks=[r.task for r in results], limit=limit), results=results,
                      groups=groups, average=overall_average(groups), limited=limit is not None, recipe=recipe,
                      date="2026-11-23T12:00:00+00:00")


def scored(report: EvalReport) -> ScoredModel:
    return ScoredModel(report.model_name, report, f"{report.model_name}.json")


MOE = make_report("moe", [0.70, 0.50, 0.57, 0.40])
MATH = make_report("math", [0.60, 0.55, 0.53, 0.45])
CODE = make_report("code", [0.62, 0.60, 0.52, 0.41])


def test_tasks_and_groups_cell_by_cell():
    comparison = compare_reports(scored(MOE), [scored(MATH), scored(CODE)])
    columns = ["Name", "Metric", "moe", "math", "code", "Best expert", "Delta", "±", "Outcome", "Complete"]
    expected_tasks = pd.DataFrame([
        ["bigbench_navigate", "multiple_choice_grade", 70.0, 60.0, 62.0, "code", 8.0, 2.83, "win", True],
        ["bigbench_snarks", "multiple_choice_grade", 50.0, 55.0, 60.0, "code", -10.0, 4.24, "loss", True],
        ["bigbench_sports_understanding", "multiple_choice_grade", 57.0, 53.0, 52.0, "math", 4.0, 2.83,
         "within noise", True],
        ["truthfulqa_mc", "mc2", 40.0, 45.0, 41.0, "math", -5.0, 2.83, "within noise", True],
    ], columns=columns)
    # Groups: unweighted mean of the tasks run; the stderr of a mean of k independent tasks is sqrt(sum se^2)/k.
    expected_groups = pd.DataFrame([
        ["TruthfulQA", "1/1 tasks", 40.0, 45.0, 41.0, "math", -5.0, 2.83, "within noise", True],
        ["Bigbench", "3/18 tasks", 59.0, 56.0, 58.0, "code", 1.0, 1.94, "within noise", False],
        ["Average", "2/4 groups", 49.5, 50.5, 49.5, "math", -1.0, 1.72, "within noise", False],
    ], columns=columns)
    pd.testing.assert_frame_equal(comparison.tasks[columns], expected_tasks, check_dtype=False)
    pd.testing.assert_frame_equal(comparison.groups[columns], expected_groups, check_dtype=False)
    assert comparison.tasks["moe ±"].tolist() == [2.0, 3.0, 2.0, 2.0]
    assert comparison.groups["moe ±"].tolist() == [2.0, round(math.sqrt(17) / 3, 2), 1.21]
    assert (comparison.wins, comparison.losses, comparison.within_noise) == (1, 1, 2)
    assert comparison.verdict == ("moe is within noise of its best single expert, math (-1.00 ± 1.72 points on "
                                  "average) over a partial suite (4 tasks); per task vs the best expert: 1 wins, "
                                  "1 losses, 2 within noise.")


def full_report(name: str, value: float, limit: int | None = None) -> EvalReport:
    tasks = [(t.name, t.group, t.metric, 0.01) for t in NOUS_TASKS]
    return make_report(name, [value] * len(tasks), limit=limit, tasks=tasks)


def test_verdict_on_the_full_suite_win_loss_and_limited():
    win = compare_reports(scored(full_report("moe", 0.60)), [scored(full_report("a", 0.50)),
                                                               scored(full_report("b", 0.55))])
    assert win.groups["Name"].tolist() == ["AGIEval", "GPT4All", "TruthfulQA", "Bigbench", "Average"]
    assert win.groups["Complete"].all()
    # Average stderr: groups' (sqrt(8)/8, sqrt(7)/7, 1, sqrt(18)/18) points, combined over 4 groups, for two models.
    assert win.verdict == ("moe beats its best single expert, b, by +5.00 ± 0.41 points on average; "
                           "per task vs the best expert: 34 wins, 0 losses, 0 within noise.")
    loss = compare_reports(scored(full_report("moe", 0.40)), [scored(full_report("a", 0.50))])
    assert loss.verdict.startswith("moe trails its best single expert, a, by -10.00 ± ")
    assert "0 wins, 34 losses" in loss.verdict
    limited = compare_reports(scored(full_report("moe", 0.6, limit=10)), [scored(full_report("a", 0.5, limit=10))])
    assert limited.limited and limited.verdict.endswith("limited run (--limit 10), indicative only.")


@pytest.mark.parametrize("change, difference", [
    (lambda r: replace(r, settings=replace(r.settings, limit=25)), "--limit None vs 25"),
    (lambda r: replace(r, results=r.results[:2] + r.results[3:]),
     "tasks differ (only in the first: bigbench_sports_understanding)"),
    (lambda r: replace(r, results=[replace(x, num_fewshot=5) if x.task == "bigbench_navigate" else x
                                   for x in r.results]), "few-shot counts differ (bigbench_navigate 0 vs 5)"),
    (lambda r: replace(r, results=[replace(x, metric="mc1") if x.task == "truthfulqa_mc" else x
                                   for x in r.results]), "metrics differ (truthfulqa_mc mc2 vs mc1)"),
], ids=["limit", "tasks", "fewshot", "metric"])
def test_mismatched_settings_are_refused_naming_the_difference(change, difference):
    with pytest.raises(MoelabError) as err:
        compare_reports(scored(MOE), [scored(MATH), scored(change(CODE))])
    assert str(err.value).startswith(f"cannot compare moe (moe.json) with code (code.json): {difference}; re-run")


def test_missing_stderr_and_other_dtype():
    no_stderr = replace(MATH, results=[replace(r, stderr=None) if r.task == "bigbench_sports_understanding" else r
                                       for r in MATH.results])
    other_dtype = replace(CODE, settings=replace(CODE.settings, dtype="bfloat16"))
    comparison = compare_reports(scored(MOE), [scored(no_stderr), scored(other_dtype)])
    # math is the best expert on sports_understanding and on the Average, and its error there is unknown.
    assert comparison.tasks["Outcome"].tolist() == ["win", "loss", "n/a", "within noise"]
    assert comparison.groups["Outcome"].tolist() == ["within noise", "within noise", "n/a"]
    assert math.isnan(comparison.groups.set_index("Name").loc["Bigbench", "math ±"])
    assert (comparison.wins, comparison.losses, comparison.within_noise) == (1, 1, 1)
    assert comparison.verdict == ("moe vs its best single expert, math: -1.00 points on average (no stderr to "
                                  "judge it) over a partial suite (4 tasks); per task vs the best expert: 1 wins, 1 losses, "
                                  "1 within noise, 1 without stderr.")
    assert comparison.warnings == ["dtype differs: moe auto, code bfloat16"]
    assert "Warning: dtype differs: moe auto, code bfloat16." in comparison_markdown(comparison)


def test_outputs_markdown_csv_and_png(tmp_path):
    comparison = compare_reports(scored(MOE), [scored(MATH), scored(CODE)])
    written = write_comparison(comparison, tmp_path / "out")
    assert [p.name for p in written] == ["compare.md", "compare.csv", "compare.png"]
    markdown = written[0].read_text()
    assert markdown.startswith(f"**Verdict:** {comparison.verdict}\n")
    row = next(line for line in markdown.splitlines() if line.startswith("| bigbench_navigate"))
    assert [c.strip() for c in row.split("|")[1:-1]] == ["bigbench_navigate", "multiple_choice_grade", "70.00",
                                                         "60.00", "62.00", "code", "8.00", "2.83", "win"]
    csv = pd.read_csv(written[1], dtype={"Tied with": str})  # an empty column would read as float NaN
    pd.testing.assert_frame_equal(csv.fillna({"Tied with": ""}), comparison.table.astype({"±": float}),
                                  check_dtype=False)
    assert written[2].read_bytes().startswith(b"\x89PNG")


def test_routing_shares_from_a_probe_file(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"expert_names": ["math", "code"], "accuracy_per_expert": {"math": 0.8, "code": None},
                                 "usage": {"math": 0.625, "code": 0.375}}))
    for name, report in [("moe", MOE), ("math", MATH), ("code", CODE)]:
        report.save(tmp_path / name / "nous.json")
    comparison = compare_inputs([tmp_path / n / "nous.json" for n in ("moe", "math", "code")], probe=probe)
    expected = pd.DataFrame({"Expert": ["math", "code"], "Average": [50.5, 49.5], "Best expert on (tasks)": [2, 2],
                             "Tied best on (tasks)": [0, 0],
                             "Domain tokens routed to it": [80.0, math.nan],  # no code prompts: no domain share
                             "Share of all tokens": [62.5, 37.5]})
    pd.testing.assert_frame_equal(comparison.routing, expected, check_dtype=False)
    row = next(line for line in comparison_markdown(comparison).splitlines() if line.startswith("| math "))
    assert [c.strip() for c in row.split("|")[1:-1]] == ["math", "50.50", "2", "0", "80.00", "62.50"]

    probe.write_text(json.dumps({"expert_names": ["E0", "E1"], "accuracy_per_expert": {}, "usage": {}}))
    with pytest.raises(MoelabError, match="the probe routed experts E0, E1, but the comparison has math, code"):
        compare_inputs([tmp_path / n / "nous.json" for n in ("moe", "math", "code")], probe=probe)


def test_reports_named_by_the_moe_recipe(tmp_path):
    recipe = {"experts": [{"name": "arith", "source_model": "/models/math"}, {"source_model": "/models/code"}]}
    paths = []
    for name, report in [("moe", replace(MOE, recipe=recipe)), ("math", MATH), ("code", CODE)]:
        paths.append(report.save(tmp_path / f"{name}.json"))
    assert compare_inputs(paths).experts == ["arith", "E1"]


def write_model_folder(folder: Path, experts: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "moelab.json").write_text(json.dumps(
        {"architecture": "mixtral", "experts": [{"name": n, "source_model": s} for n, s in experts]}))
    return folder


def test_model_folder_finds_reports_and_names_the_missing_ones(tmp_path):
    model_dir = write_model_folder(tmp_path / "my-moe", [("math", "/models/math"), ("code", "org/code-model")])
    reports = tmp_path / "reports"
    replace(MOE, model=str(model_dir), model_name="my-moe").save(reports / "my-moe" / "nous.json")
    MATH.save(reports / "math" / "nous.json")
    with pytest.raises(MoelabError, match=r"no report for expert\(s\) code \(org/code-model\) under .*--run-missing"):
        compare_inputs([model_dir], reports)

    # Two reports of the code expert: the one with the MoE's settings wins over a newer one made with --limit.
    replace(CODE, model="org/code-model").save(reports / "code-model" / "nous.json")
    replace(CODE, model="org/code-model", settings=replace(CODE.settings, limit=5), limited=True,
            date="2026-11-24T00:00:00+00:00").save(reports / "code-model-limited" / "nous.json")
    comparison = compare_inputs([model_dir], reports)
    assert (comparison.moe, comparison.experts) == ("my-moe", ["math", "code"])
    assert comparison.tasks["code"].tolist() == [62.0, 60.0, 52.0, 41.0]

    with pytest.raises(MoelabError, match="has no moelab.json"):
        compare_inputs([tmp_path / "reports"], reports)


def test_cli_writes_files_and_errors_in_one_line(tmp_path):
    paths = [report.save(tmp_path / f"{report.model_name}.json") for report in (MOE, MATH, CODE)]
    run = subprocess.run([sys.executable, "-m", "moelab", "compare", *map(str, paths), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    assert run.returncode == 0, run.stderr
    assert "moe is within noise of its best single expert, math" in run.stdout
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["compare.csv", "compare.md", "compare.png"]

    limited = replace(CODE, settings=replace(CODE.settings, limit=5)).save(tmp_path / "limited.json")
    bad = subprocess.run([sys.executable, "-m", "moelab", "compare", str(paths[0]), str(limited)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--limit None vs 5" in bad.stderr


def make_lora_adapter(base: Path, out: Path) -> Path:
    """A random (non-zero) LoRA adapter on q/v projections of `base`, saved with peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_real_eval_of_a_tiny_moe_and_its_experts(tmp_path, tiny_dense, monkeypatch):
    """eval the MoE for real; compare MODEL_DIR --run-missing then evaluates both experts with its settings (one a
    MODEL+LORA source, evaluated on its merged folder) and routes labelled prompts through the MoE."""
    from moelab.build import BuildOptions, build_moe
    from moelab.eval import run_eval
    from moelab.recipe import parse_recipe

    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    math_model = tiny_dense("math", seed=1)
    code_source = f"{math_model}+{make_lora_adapter(math_model, tmp_path / 'code-lora')}"
    text = yaml.safe_dump({"base_model": str(math_model), "gate_mode": "random", "experts_per_token": 1,
                           "experts": [{"name": "math", "source_model": str(math_model)},
                                       {"name": "code", "source_model": code_source}]}, sort_keys=False)
    model_dir = tmp_path / "tiny-moe"
    build_moe(parse_recipe(text, "recipe.yaml"), text, model_dir, BuildOptions(show_progress=False),
              recipe_dir=tmp_path)
    reports = tmp_path / "reports"
    settings = EvalSettings(tasks=["bigbench_navigate", "bigbench_snarks"], limit=4)
    run_eval(str(model_dir), settings, SHIPPED_DATA, reports / "tiny-moe" / "nous.json")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump([{"expert": "math", "text": "Two plus three is five."},
                                       {"expert": "code", "text": "def add(a, b):\n    return a + b"}]))

    comparison = compare_inputs([model_dir], reports, run_missing=True, data_dir=SHIPPED_DATA, device="cpu",
                                probe=prompts)

    assert sorted(p.name for p in reports.iterdir()) == ["math", "tiny-moe", "tiny-moe.code"]
    expert_reports = {name: EvalReport.load(reports / folder / "nous.json")
                      for name, folder in [("math", "math"), ("code", "tiny-moe.code")]}
    assert expert_reports["math"].model == str(math_model)
    assert Path(expert_reports["code"].model).parent == tmp_path / "cache" / "lora"  # the merged folder
    assert expert_reports["code"].model_ref == code_source  # ... of the recipe's source, which names it
    assert expert_reports["code"].model_name == "math+code-lora"
    assert all(r.settings.limit == 4 and [t.n for t in r.results] == [4, 4] for r in expert_reports.values())
    assert comparison.experts == ["math", "code"] and comparison.limited
    for name, report in expert_reports.items():
        assert comparison.tasks[name].tolist() == [round(r.value * 100, 2) for r in report.results]
    assert comparison.verdict.endswith("limited run (--limit 4), indicative only.")
    routing = comparison.routing.set_index("Expert")
    assert routing["Share of all tokens"].sum() == pytest.approx(100, abs=0.02)
    assert all(0 <= v <= 100 for v in routing["Domain tokens routed to it"])

    # A second compare finds the derived expert's report where --run-missing put it, and evaluates nothing.
    pd.testing.assert_frame_equal(compare_inputs([model_dir], reports).table, comparison.table)
    # Given as report files, the experts are named as in the MoE's recipe, not after their (cache) folders.
    by_files = compare_inputs([reports / "tiny-moe" / "nous.json", reports / "math" / "nous.json",
                               reports / "tiny-moe.code" / "nous.json"])
    assert by_files.experts == ["math", "code"]
    assert by_files.table["Best expert"].isin(["math", "code"]).all()


def test_ties_for_best_expert_are_shown_and_counted_for_every_tied_expert():
    moe = make_report("SmolLM2-3x135M-demo", [0.5, 0.5, 0.5, 0.5])
    chat, math_, code = (make_report("chat", [0.6, 0.5, 0.5, 0.4]), make_report("math", [0.6, 0.4, 0.3, 0.4]),
                         make_report("code", [0.2, 0.5, 0.4, 0.4]))
    routing = pd.DataFrame({"Expert": ["chat", "math", "code"], "Domain tokens routed to it": [90.0, 80.0, 70.0],
                            "Share of all tokens": [30.0, 30.0, 40.0]})

    comparison = compare_reports(scored(moe), [scored(chat), scored(math_), scored(code)], routing)

    assert comparison.tasks["Tied with"].tolist() == ["math", "code", "", "math, code"]
    counts = comparison.routing.set_index("Expert")
    assert counts["Best expert on (tasks)"].tolist() == [1, 0, 0]  # sports_understanding, alone
    assert counts["Tied best on (tasks)"].tolist() == [3, 2, 2]
    tasks_md = comparison_markdown(comparison).split("### Tasks")[1]
    assert "| chat, math, code |" in tasks_md


def test_the_terminal_view_fits_80_columns_with_short_task_labels():
    from rich.console import Console

    names = ["chat", "math", "code"]
    comparison = compare_reports(scored(make_report("SmolLM2-3x135M-demo", [0.5, 0.5, 0.5, 0.5])),
                                 [scored(make_report(n, [0.6, 0.4, 0.5, 0.45])) for n in names])
    console = Console(width=80, record=True)
    console.print(comparison_view(comparison))
    text = console.export_text()

    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert " navigate " in text and "bigbench_navigate" not in text  # the group prefix is dropped
    assert "Tasks (multiple_choice_grade)" not in text  # two metrics in this table: the column stays
    assert "within" in text and "MoE: SmolLM2-3x135M-demo" in text
