"""The whole loop: `moelab run` on a tiny MoE of identical experts, and `moelab demo` end to end on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moelab.eval.report import EvalReport
from moelab.run import (DEMO_DATA_DIR, RunConfig, all_up_to_date, demo_config, estimate_run, plan_stages,
                        run_stages)

TASKS = ["bigbench_navigate", "bigbench_snarks"]
LIMIT = 8


def identical_experts_recipe(folder: Path, dense: Path) -> Path:
    recipe = folder / "twins.yaml"
    recipe.write_text(f"""name: tiny-twins
base_model: {dense}
gate_mode: random
experts_per_token: 2
allow_identical_experts: true
experts:
  - {{name: left, source_model: {dense}}}
  - {{name: right, source_model: {dense}}}
""")
    (folder / "twins.probe.yaml").write_text("- {expert: left, text: 'two plus three is five'}\n"
                                             "- {expert: right, text: 'def add(a, b): return a + b'}\n")
    return recipe


def statuses(outcomes) -> dict[str, str]:
    return {o.name: o.status for o in outcomes}


def test_identical_experts_score_as_their_expert_and_reruns_skip_what_is_done(tmp_path, tiny_dense):
    recipe = identical_experts_recipe(tmp_path, tiny_dense("dense"))
    config = RunConfig(recipe, tmp_path / "out", TASKS, LIMIT, DEMO_DATA_DIR, device="cpu")
    assert not all_up_to_date(plan_stages(config), config.out)
    first = run_stages(plan_stages(config), config.out)
    assert set(statuses(first).values()) == {"ran"}
    assert list(statuses(first)) == ["build", "probe", "eval MoE", "eval experts", "compare", "report",
                                     "leaderboard"]

    out = config.out
    moe = EvalReport.load(out / "reports" / "tiny-twins" / "nous.json")
    expert = EvalReport.load(out / "reports" / Path(str(tiny_dense("dense"))).name / "nous.json")
    assert [r.n for r in moe.results] == [LIMIT, LIMIT] and moe.limited
    # Two copies of one MLP, mixed with weights that sum to 1, are that MLP: the same answers (bf16 rounding aside).
    for mine, theirs in zip(moe.results, expert.results):
        assert 0 <= mine.value <= 1 and abs(mine.value - theirs.value) <= 1 / LIMIT
    table = pd.read_csv(out / "compare" / "compare.csv")
    assert set(table["Outcome"]) == {"within noise"}
    assert table["Best expert"].isin(["left", "right"]).all()
    probe = json.loads((out / "probe.json").read_text())
    assert probe["expert_names"] == ["left", "right"] and 0 <= probe["accuracy"] <= 1
    for artifact in ["routing.png", "tiny-twins-Nous.md", "compare/compare.md", "compare/compare.png",
                     "leaderboard/leaderboard.md", "leaderboard/leaderboard.png"]:
        assert (out / artifact).stat().st_size > 0, artifact
    assert "tiny-twins" in (out / "leaderboard" / "leaderboard.md").read_text()

    assert all_up_to_date(plan_stages(config), out)  # so the CLI prints no time estimate
    again = run_stages(plan_stages(config), out)
    assert set(statuses(again).values()) == {"up to date"}

    # A lost expert report (as after a failure): its stage and what reads it run again, nothing before them.
    lost = out / "reports" / Path(str(tiny_dense("dense"))).name / "nous.json"
    lost_bytes = lost.read_bytes()
    lost.unlink()
    resumed = statuses(run_stages(plan_stages(config), out))
    # compare's key is the bytes of the reports it reads: a re-made report equal to the lost one to the byte (same
    # second, same wall time, as on a fast machine) leaves the comparison up to date.
    compare = "up to date" if lost.read_bytes() == lost_bytes else "ran"
    assert resumed == {"build": "up to date", "probe": "up to date", "eval MoE": "up to date", "eval experts": "ran",
                       "compare": compare, "report": "up to date", "leaderboard": "up to date"}

    # An edited recipe is a new model: build, probe and its eval run again; the experts' reports still hold.
    recipe.write_text(recipe.read_text() + "seed: 1\n")
    edited = statuses(run_stages(plan_stages(config), out))
    assert [n for n, s in edited.items() if s == "ran"] == ["build", "probe", "eval MoE", "compare", "report",
                                                            "leaderboard"]


def test_estimate_counts_models_and_scored_choices():
    estimate = estimate_run(demo_config(Path("unused"), limit=2, tasks=TASKS))
    # The MoE plus three distinct experts; navigate and snarks have two choices per example.
    assert (estimate.models, estimate.requests_per_model) == (4, 2 * 2 + 2 * 2)
    assert not estimate.over_budget
    assert estimate_run(demo_config(Path("unused"), limit=1000)).over_budget


def test_bad_options_are_one_line_errors(tmp_path, tiny_dense):
    recipe = identical_experts_recipe(tmp_path, tiny_dense("dense"))
    for extra, message in [(["--remote", "lambda"], "--remote lambda is not supported"),
                           (["--data-dir", str(tmp_path)], "bigbench/navigate.jsonl, which is missing"),
                           (["--probe", str(tmp_path / "none.yaml")], "is not a file")]:
        result = subprocess.run([sys.executable, "-m", "moelab", "run", str(recipe), "--out", str(tmp_path / "o"),
                                 "--eval-tasks", ",".join(TASKS), *extra], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "moelab", "demo", "--limit", "2", "--eval-tasks",
                             ",".join(TASKS), "--out", str(out), "--device", "cpu"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Verdict" in result.stdout and "artifacts" in result.stdout

    moe_name = "SmolLM2-3x135M-demo"
    reports = {p.parent.name: EvalReport.load(p) for p in (out / "reports").glob("*/nous.json")}
    assert sorted(reports) == sorted([moe_name, f"{moe_name}.chat", f"{moe_name}.math", f"{moe_name}.code"])
    for report in reports.values():
        assert [r.task for r in report.results] == TASKS and report.settings.limit == 2
        assert all(0 <= r.value <= 1 and r.n == 2 for r in report.results)
    table = pd.read_csv(out / "compare" / "compare.csv")
    assert list(table["Name"]) == [*TASKS, "Bigbench", "Average"]
    assert table[[moe_name, "chat", "math", "code"]].stack().between(0, 100).all()
    probe = json.loads((out / "probe.json").read_text())
    assert probe["expert_names"] == ["chat", "math", "code"] and probe["num_prompts"] == 12
    assert 1 / 3 < probe["accuracy"] <= 1  # better than chance routing of held-out domain prompts
    for artifact in [f"{moe_name}/moelab.json", "routing.png", f"{moe_name}-Nous.md", "compare/compare.md",
                     "compare/compare.png", "leaderboard/leaderboard.md", "leaderboard/leaderboard.csv",
                     "leaderboard/leaderboard.png", "run.json"]:
        assert (out / artifact).stat().st_size > 0, artifact
    assert moe_name in (out / "leaderboard" / "leaderboard.md").read_text()
