"""Retention: how much of each expert's gain on its own domain a MoE keeps, in compare, its outputs and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from moelab.card import model_card
from moelab.compare import (ScoredModel, compare_inputs, compare_reports, comparison_markdown, retention,
                            retention_stderr, score_stderr, write_comparison)
from moelab.eval.report import EvalReport, EvalSettings, TaskResult
from moelab.publish import plan_model_upload
from moelab.recipe import parse_recipe
from moelab.run import recipe_variant

RECIPE = {"name": "moe", "base_model": "/models/chat", "gate_mode": "random",
          "experts": [{"name": name, "source_model": f"/models/{name}"} for name in ("chat", "math", "code")]}


def report(name: str, navigate: float, math: float, code_nll: float) -> EvalReport:
    results = [TaskResult("bigbench_navigate", "Bigbench", "multiple_choice_grade", navigate, 0.02, 100, "1", 0),
               TaskResult("domain_math", "domain:math", "exact_match", math, 0.05, 40, "1.0", 0),
               TaskResult("domain_code", "domain:code", "nll", code_nll, None, 40, "1.0", 0)]
    return EvalReport(model=f"/models/{name}", model_name=name, settings=EvalSettings(tasks=[r.task for r in results]),
                      results=results, recipe=RECIPE if name == "moe" else None, date="2026-11-23T12:00:00+00:00")


# The figures: base 0.00 / expert 0.60 on math; NLL base 2.008 / code expert 0.850.
CHAT, MATH, CODE = (report("chat", 0.50, 0.00, 2.008), report("math", 0.52, 0.60, 2.327),
                    report("code", 0.49, 0.0, 0.850))
MOE = report("moe", 0.51, 0.30, 1.008)


def scored(r: EvalReport) -> ScoredModel:
    return ScoredModel(r.model_name, r, f"{r.model_name}.json")


def test_retention_arithmetic():
    assert retention(0.0, 0.6, 0.3) == pytest.approx(0.5)
    assert retention(0.2, 0.6, 0.7) == pytest.approx(1.25)  # the MoE can beat its expert
    assert retention(0.2, 0.6, 0.1) == pytest.approx(-0.25)  # or fall below the base
    assert retention(2.008, 0.850, 1.008, lower_better=True) == pytest.approx(1.0 / 1.158)
    assert retention(0.5, 0.5, 0.7) is None and retention(0.5, 0.4, 0.7) is None  # no gain to keep


def test_retention_stderr_by_the_delta_method():
    # Only the MoE uncertain: SE(R) = SE(moe) / gain.
    assert retention_stderr((0.0, 0.0), (0.5, 0.0), (0.25, 0.05)) == pytest.approx(0.1)
    # Only the expert: SE(R) = R SE(expert) / gain; only the base: (1 - R) SE(base) / gain; NLL gains downwards.
    assert retention_stderr((2.0, 0.0), (1.0, 0.1), (1.5, 0.0), lower_better=True) == pytest.approx(0.05)
    assert retention_stderr((2.0, 0.1), (1.0, 0.0), (1.2, 0.0), lower_better=True) == pytest.approx(0.02)
    assert retention_stderr((0.5, 0.1), (0.4, 0.1), (0.7, 0.1)) is None  # no gain, no retention
    assert retention_stderr((0.0, None), (0.5, 0.1), (0.25, 0.05)) is None


def test_exact_match_stderr_is_binomial_and_never_zero():
    at = lambda value, n: score_stderr(TaskResult("domain_math", "domain:math", "exact_match", value, 0.0, n, "1", 0))  # noqa: E731
    assert at(0.5, 96) == pytest.approx(0.05)  # (48 + 2) / 100 = 0.5: sqrt(0.25 / 100)
    assert at(0.0, 40) == pytest.approx((2 / 44 * 42 / 44 / 44) ** 0.5) and at(0.0, 40) > 0
    nll = TaskResult("domain_code", "domain:code", "nll", 1.2, 0.03, 40, "1", 0)
    assert score_stderr(nll) == 0.03  # other metrics keep the eval's own


def test_compare_finds_the_base_and_fills_retention_cell_by_cell(tmp_path):
    paths = []
    for r in (MOE, CHAT, MATH, CODE):
        paths.append(tmp_path / f"{r.model_name}.json")
        r.save(paths[-1])
    comparison = compare_inputs(paths)  # the base is the expert whose source is the recipe's base_model

    # The retention's standard error (delta method): exact match on 40 items has Agresti-Coull variances
    # p(1-p)/44 at p = 2/44, 26/44, 14/44 for base, expert, MoE: (0.004931 + 0.25 * 0.005494 + 0.25 * 0.000986) / 0.36.
    # The code NLL reports carry no stderr, so neither does its retention.
    assert comparison.retention == [
        {"domain": "math", "metric": "exact_match", "base": 0.0, "expert": "math", "expert_value": 0.6,
         "moe": 0.3, "retention": pytest.approx(0.5), "retention_se": pytest.approx(0.1349, abs=1e-4),
         "flagged": True},
        {"domain": "code", "metric": "nll", "base": 2.008, "expert": "code", "expert_value": 0.85,
         "moe": 1.008, "retention": pytest.approx(1.0 / 1.158), "retention_se": None, "flagged": False}]
    tasks = comparison.tasks.set_index("Name")
    # NLL is shown as is and lower is better: the best expert is code, and the MoE is above it.
    assert tasks.loc["domain_code", ["moe", "code", "Best expert", "Delta"]].tolist() == [1.01, 0.85, "code", 0.16]
    assert tasks.loc["domain_math", ["moe", "Best expert", "Delta", "Outcome"]].tolist() == [30.0, "math", -30.0,
                                                                                             "loss"]
    markdown = comparison_markdown(comparison)
    assert "| math   | exact_match (%)" in markdown and "50% ± 13% ⚠ under 80%" in markdown and "| 86% " in markdown

    written = write_comparison(comparison, tmp_path / "compare")
    assert json.loads((tmp_path / "compare" / "retention.json").read_text())[0]["retention"] == pytest.approx(0.5)
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 10_000 and len(written) == 4


def test_no_base_report_means_no_retention():
    comparison = compare_reports(scored(MOE), [scored(MATH), scored(CODE)])
    assert comparison.retention == [] and "Retention" not in comparison_markdown(comparison)


def test_retention_in_the_card_and_in_publish(tmp_path):
    comparison = compare_reports(scored(MOE), [scored(CHAT), scored(MATH), scored(CODE)], base=scored(CHAT))
    model_dir = tmp_path / "moe"
    model_dir.mkdir()
    text = yaml.safe_dump(RECIPE)
    (model_dir / "moelab_recipe.yaml").write_text(text)
    (model_dir / "moelab.json").write_text(json.dumps({"architecture": "mixtral"}))
    card = model_card(parse_recipe(text), text, "mixtral", [], licenses={}, retention=comparison.retention)
    assert "## Retention of each expert's domain skill" in card
    assert "| code   | nll (lower is better) | 2.008 | 0.850 (code) | 1.008 | 86%" in card

    reports = tmp_path / "reports" / "moe"
    MOE.save(reports / "nous.json")
    assert "Retention" not in plan_model_upload(model_dir, "me/moe", report=reports / "nous.json").card
    write_comparison(comparison, reports / "compare")
    assert "50% ± 13% ⚠ under 80%" in plan_model_upload(model_dir, "me/moe", report=reports / "nous.json").card


def test_tiny_moe_domains_end_to_end(tmp_path, tiny_dense):
    """eval --tasks domains on a built MoE, then compare MODEL_DIR --run-missing evaluates the base and the
    experts on the same domains (they have no recipe of their own) and fills the retention table."""
    from moelab.build import BuildOptions, build_moe
    from moelab.eval import run_eval

    base, math, code = tiny_dense("base", seed=0), tiny_dense("math", seed=1), tiny_dense("code", seed=2)
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}\n"}) + "\n"
                                                 for i in range(3)))
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": 2}) + "\n")
    text = yaml.safe_dump({"base_model": str(base), "gate_mode": "random", "experts": [
        {"name": "chat", "source_model": str(base)},
        {"name": "math", "source_model": str(math),
         "eval_data": {"path": str(tmp_path / "qa.jsonl"), "kind": "exact_match", "max_new_tokens": 4}},
        {"name": "code", "source_model": str(code),
         "eval_data": {"path": str(tmp_path / "code.jsonl"), "kind": "nll", "tokens": 8}}]})
    model_dir = tmp_path / "tiny-moe"
    build_moe(parse_recipe(text), text, model_dir, BuildOptions(show_progress=False), recipe_dir=tmp_path)
    reports = tmp_path / "reports"
    moe = run_eval(str(model_dir), EvalSettings(tasks=["domains"], device="cpu"), None,
                   reports / "tiny-moe" / "nous.json")
    assert [(r.task, r.group, r.n) for r in moe.results] == [("domain_math", "domain:math", 1),
                                                             ("domain_code", "domain:code", 3)]

    comparison = compare_inputs([model_dir], reports, run_missing=True, device="cpu")

    code_nll = {name: next(r.value for r in EvalReport.load(reports / name / "nous.json").results
                           if r.task == "domain_code") for name in ("base", "code")}
    row = comparison.retention[1]
    assert (row["domain"], row["expert"], row["base"], row["expert_value"], row["moe"]) == (
        "code", "code", code_nll["base"], code_nll["code"], moe.results[1].value)
    if code_nll["code"] < code_nll["base"]:  # random tiny experts need not beat the base
        assert row["retention"] == pytest.approx(retention(code_nll["base"], code_nll["code"], row["moe"], True))


# Measured on this CPU (bf16 weights, float32 eval): mean token NLL of the worked solutions of the first 10 held-out
# arith items given their questions (chat template; a continuous measure, so a handful of items suffices): SmolLM2
# 0.927, the arith expert 0.081; demo MoE (hidden gates, 1 expert per token) with shared_weights base 0.156,
# task_arithmetic 0.097. (Exact answers on 20 items: 0.20 vs 0.30, see reports/bench/retention.md.)
@pytest.mark.slow
def test_task_arithmetic_keeps_more_arithmetic_than_base_on_smollm2(tmp_path):
    from moelab.build import BuildOptions, build_moe
    from moelab.eval import run_eval

    repo = Path(__file__).resolve().parents[1]
    tasks = tmp_path / "domains.yaml"
    tasks.write_text(yaml.safe_dump({"math": {"path": "pkg:moelab/data/heldout/arith.jsonl", "kind": "nll",
                                              "text_field": "solution", "prompt_field": "question", "limit": 10}}))
    nll = {}
    for mode in ("base", "task_arithmetic"):
        # the demo's experts with hidden gates and no heal, as measured above
        text = recipe_variant((repo / "moelab" / "recipes" / "demo-smollm2.yaml").read_text(), shared_weights=mode,
                              gate_mode="hidden", heal=None, router_training=None)
        build_moe(parse_recipe(text), text, tmp_path / mode, BuildOptions(device="cpu", show_progress=False),
                  recipe_dir=repo / "moelab" / "recipes")
        result = run_eval(str(tmp_path / mode), EvalSettings(tasks=[str(tasks)], device="cpu"), None,
                          tmp_path / f"{mode}.json")
        nll[mode] = result.results[0].value
    assert nll["task_arithmetic"] < nll["base"] - 0.03, nll
