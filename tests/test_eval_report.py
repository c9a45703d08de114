"""EvalReport and the Nous suite table: AutoEval's averaging, the JSON contract, the Gist markdown, task selection."""

from __future__ import annotations

import json
import re

import pytest

from moelab.errors import MoelabError
from moelab.eval.local import multiple_choice_grade
from moelab.eval.report import (EvalReport, EvalSettings, TaskResult, group_scores, overall_average,
                                report_markdown)
from moelab.eval.suite import GROUPS, NOUS_TASKS, select_tasks, tasks_of_group

# A published AutoEval gist (llama3-alpaca-dpo-instruct, quoted in ../shared/notes/autoeval.md section 1):
# per-task percentages and the group/overall averages AutoEval printed for them.
AGIEVAL_ACC_NORM = [22.83, 32.72, 20.43, 31.57, 35.32, 39.81, 28.16, 34.55]
GPT4ALL = {"arc_challenge": 53.41, "arc_easy": 78.28, "boolq": 80.18, "hellaswag": 78.33, "openbookqa": 45.20,
           "piqa": 80.85, "winogrande": 73.80}
PUBLISHED = {"AGIEval": 30.67, "GPT4All": 70.01, "TruthfulQA": 46.56, "Bigbench": 37.3}
PUBLISHED_AVERAGE = 46.14


def result(task, value, stderr=0.01, n=100):
    suite_task = next(t for t in NOUS_TASKS if t.name == task)
    return TaskResult(task=task, group=suite_task.group, metric=suite_task.metric, value=value, stderr=stderr, n=n,
                      version="1.0", num_fewshot=0)


def published_results() -> list[TaskResult]:
    agieval = [result(t.name, v / 100) for t, v in zip(tasks_of_group("AGIEval"), AGIEVAL_ACC_NORM)]
    gpt4all = [result(name, v / 100) for name, v in GPT4ALL.items()]
    truthfulqa = [result("truthfulqa_mc", 0.4656)]
    bigbench = [result(t.name, 0.373) for t in tasks_of_group("Bigbench")]
    return agieval + gpt4all + truthfulqa + bigbench


def test_suite_table_has_autoevals_tasks_and_metrics():
    counts = {g: len(tasks_of_group(g)) for g in GROUPS}
    assert counts == {"AGIEval": 8, "GPT4All": 7, "TruthfulQA": 1, "Bigbench": 18}
    metrics = {t.name: t.metric for t in NOUS_TASKS}
    assert {metrics[n] for n in ("boolq", "winogrande")} == {"acc"}
    assert all(metrics[t.name] == "acc_norm" for t in tasks_of_group("AGIEval"))
    assert metrics["truthfulqa_mc"] == "mc2"
    assert all(t.metric == "multiple_choice_grade" for t in tasks_of_group("Bigbench"))
    assert all(t.num_fewshot == 0 for t in NOUS_TASKS)
    assert "bigbench_causal_judgement" in metrics  # the Nous spelling
    assert {t.data_file for t in tasks_of_group("Bigbench")} >= {"bigbench/causal_judgment.jsonl",
                                                                  "bigbench/logical_deduction_five_objects.jsonl"}


def test_group_and_overall_scores_reproduce_a_published_autoeval_gist():
    groups = group_scores(published_results())
    assert groups == PUBLISHED
    assert overall_average(groups) == PUBLISHED_AVERAGE


def test_incomplete_group_has_no_score_and_there_is_no_overall():
    results = [r for r in published_results() if r.task != "agieval_sat_math"]
    groups = group_scores(results)
    assert "AGIEval" not in groups and groups["GPT4All"] == 70.01
    assert overall_average(groups) is None


def test_report_round_trips_through_json(tmp_path):
    results = published_results()
    groups = group_scores(results)
    report = EvalReport(model="org/model", model_name="model", settings=EvalSettings(limit=5), results=results,
                        groups=groups, average=overall_average(groups), limited=True, wall_time_s=12.5,
                        versions={"moelab": "0.1.0"}, date="2026-01-01T00:00:00+00:00")
    path = report.save(tmp_path / "deep" / "nous.json")
    assert [p.name for p in path.parent.iterdir()] == ["nous.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["suite"] == "nous" and data["average"] == 46.14
    assert data["settings"]["limit"] == 5 and data["results"][0]["metric"] == "acc_norm"
    assert EvalReport.load(path) == report


def test_loading_a_report_of_another_schema_or_garbage_is_a_user_error(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(MoelabError, match="schema_version"):
        EvalReport.load(tmp_path / "old.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(MoelabError, match="not a moelab eval report"):
        EvalReport.load(tmp_path / "bad.json")
    with pytest.raises(MoelabError, match="no report"):
        EvalReport.load(tmp_path / "missing.json")


def test_markdown_has_autoevals_gist_layout_that_yall_parses():
    results = published_results()
    groups = group_scores(results)
    report = EvalReport(model="org/model", model_name="model", settings=EvalSettings(), results=results,
                        groups=groups, average=overall_average(groups), wall_time_s=3725)
    text = report_markdown(report)
    lines = text.split("\n")
    # YALL (llm_autoeval/yall.py) reads the first data row of the summary table by position.
    values = lines[2].split("|")[1:-1]
    name, org, repo = re.match(r"\[([^\]]+)\]\(https://huggingface.co/([^/]+)/([^)]+)\)", values[0].strip()).groups()
    assert (name, org, repo) == ("model", "org", "model")
    assert [float(v) for v in values[1:]] == [30.67, 70.01, 46.56, 37.3, 46.14]
    assert lines[0].split("|")[1:-1][1:] == ["AGIEval", "GPT4All", "TruthfulQA", "Bigbench", "Average"]
    assert "### AGIEval" in text and "Average: 30.67%" in text and "Average score: 46.14%" in text
    assert re.search(r"\|agieval_aqua_rat\s*\|\s*1.0\|acc_norm\|22.83\|±\|\s*1.00\|", text)
    assert text.rstrip().endswith("Elapsed time: 01:02:05")
    assert "Limited run" not in text


def test_markdown_of_a_limited_local_run_says_so_and_links_nothing():
    report = EvalReport(model="/models/my-moe", model_name="my-moe", settings=EvalSettings(limit=3),
                        results=[result("bigbench_navigate", 0.5)], limited=True)
    text = report_markdown(report)
    assert "huggingface.co" not in text and "my-moe" in text
    assert "Limited run" in text and "at most 3 examples" in text
    assert "Average score: Not available" in text
    assert "[my-moe](https://huggingface.co/me/my-moe)" in report_markdown(report, repo_id="me/my-moe")


def test_task_selection_by_group_and_task_name():
    assert select_tasks(None) == list(NOUS_TASKS)
    chosen = [t.name for t in select_tasks("truthfulqa_mc, bigbench ,winogrande")]
    assert chosen[0] == "winogrande" and chosen[1] == "truthfulqa_mc" and len(chosen) == 20  # suite order
    with pytest.raises(MoelabError, match="unknown task or group 'mmlu'"):
        select_tasks("AGIEval,mmlu")


def test_multiple_choice_grade_credits_any_choice_that_scores_one():
    # reasoning_about_colored_objects: "3" and "three" are both right; lm-eval's acc would credit only targets[0].
    doc = {"targets": ["3"], "multiple_choice_targets": ["3", "three", "four"], "multiple_choice_scores": [1, 1, 0]}
    assert multiple_choice_grade(doc, [(-5.0, False), (-1.0, False), (-3.0, False)]) == {"multiple_choice_grade": 1.0}
    assert multiple_choice_grade(doc, [(-5.0, False), (-4.0, False), (-3.0, False)]) == {"multiple_choice_grade": 0.0}


def test_stock_tasks_keep_lm_evals_config_and_point_at_local_files_with_a_data_dir(tmp_path):
    from moelab.eval.local import task_config

    truthfulqa = next(t for t in NOUS_TASKS if t.name == "truthfulqa_mc")
    hub = task_config(truthfulqa, None)
    assert (hub["task"], hub["dataset_path"], hub["num_fewshot"]) == ("truthfulqa_mc", "truthfulqa/truthful_qa", 0)
    assert "Q: What is the square root of banana?" in hub["doc_to_text"]  # the fixed 6-pair preamble
    local = task_config(truthfulqa, tmp_path)
    assert local["dataset_path"] == "json" and local["validation_split"] == "validation"
    assert local["dataset_kwargs"] == {"data_files": {"validation": str(tmp_path / "truthfulqa/truthfulqa_mc.jsonl")}}
    arc = task_config(next(t for t in NOUS_TASKS if t.name == "arc_challenge"), tmp_path)
    assert arc["test_split"] == "test" and arc["validation_split"] is None and arc["training_split"] is None
