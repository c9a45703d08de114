"""The whole loop: `moelab run` on a tiny MoE of identical experts, and `moelab demo` end to end on SmolLM2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moelab.errors import MoelabError
from moelab.eval.report import EvalReport
from moelab.run import (BASELINE_BUILD_SECONDS, DEMO_DATA_DIR, DOMAIN_SECONDS_PER_ITEM, FIXED_SECONDS,
                        HEAL_SECONDS_PER_STEP, MODEL_LOAD_SECONDS, SECONDS_PER_REQUEST, RunConfig,
                        all_up_to_date, demo_config, estimate_run, plan_stages, run_stages)

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


def test_mergekit_baseline_beside_the_moe_in_the_retention_headline(tmp_path, tiny_dense):
    base, code = tiny_dense("chat"), tiny_dense("code", seed=5)
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                 ["def add(a, b): return a + b", "import os\nimport sys",
                                                  "class Model(nn.Module): pass", "for x in range(10): print(x)"]))
    recipe = tmp_path / "pair.yaml"
    recipe.write_text(f"""name: pair
base_model: {base}
shared_weights: average
gate_mode: ridge
experts_per_token: 1
router_training: {{examples: 8}}
experts:
  - {{name: chat, source_model: {base}, positive_prompts: ["hello there", "how are you", "nice day", "thanks"]}}
  - name: code
    source_model: {code}
    positive_prompts: ["def f(x): return x", "import os", "x = [1, 2]", "class A: pass"]
    eval_data: {{path: {tmp_path / "code.jsonl"}, kind: nll, tokens: 12}}
""")
    config = RunConfig(recipe, tmp_path / "out", ["bigbench_navigate", "domains"], 2, DEMO_DATA_DIR, device="cpu",
                       mergekit_baseline=True)
    first = statuses(run_stages(plan_stages(config), config.out))
    assert list(first) == ["build", "build mergekit-way", "eval mergekit-way", "eval MoE", "eval experts",
                           "compare", "report", "leaderboard", "retention"]
    out = config.out
    baseline = json.loads((out / "pair-mergekit-way" / "moelab.json").read_text())
    assert baseline["gate_mode"] == "hidden" and "shared_weights: base" in \
        (out / "pair-mergekit-way" / "moelab_recipe.yaml").read_text()
    scores = {name: {r.task: r for r in EvalReport.load(out / "reports" / name / "nous.json").results}
              for name in ("pair", "pair-mergekit-way", "chat", "code")}
    assert list(scores["pair-mergekit-way"]) == ["domain_code"]  # the baseline runs only the domain tasks
    [row] = json.loads((out / "retention.json").read_text())
    assert (row["domain"], row["expert"]) == ("code", "code")
    assert (row["base"], row["expert_value"], row["moe"], row["mergekit_way"]) == tuple(
        scores[name]["domain_code"].value for name in ("chat", "code", "pair", "pair-mergekit-way"))
    assert "| code   | nll (lower is better) |" in (out / "retention.md").read_text()
    assert set(statuses(run_stages(plan_stages(config), out)).values()) == {"up to date"}

    with pytest.raises(MoelabError, match="add domains to --eval-tasks"):
        plan_stages(RunConfig(recipe, out, ["bigbench_navigate"], 2, DEMO_DATA_DIR, mergekit_baseline=True))


def test_estimate_counts_models_and_scored_choices():
    estimate = estimate_run(demo_config(Path("unused"), limit=2, tasks=TASKS))
    # The MoE plus three distinct experts; navigate and snarks have two choices per example. The domain tasks
    # (16 math and 16 code items) run on those four and on the mergekit-way MoE, built besides; heal takes 12 steps.
    assert (estimate.models, estimate.requests_per_model, estimate.domain_items) == (4, 2 * 2 + 2 * 2, 32)
    assert estimate.seconds == pytest.approx(FIXED_SECONDS + 5 * MODEL_LOAD_SECONDS + 4 * 8 * SECONDS_PER_REQUEST
                                             + 5 * 16 * (DOMAIN_SECONDS_PER_ITEM["exact_match"]
                                                         + DOMAIN_SECONDS_PER_ITEM["nll"])
                                             + BASELINE_BUILD_SECONDS + 12 * HEAL_SECONDS_PER_STEP)
    assert not estimate.over_budget
    assert estimate_run(demo_config(Path("unused"), limit=1000, tasks=["Bigbench"])).over_budget


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
    # The headline: both retentions, mergekit-moe's way and moelab's, then the verdict.
    assert result.stdout.index("Retention, moelab") < result.stdout.index("Verdict") and "artifacts" in result.stdout

    moe_name = "SmolLM2-3x135M-demo"
    reports = {p.parent.name: EvalReport.load(p) for p in (out / "reports").glob("*/nous.json")}
    assert sorted(reports) == sorted([moe_name, f"{moe_name}-mergekit-way", f"{moe_name}.chat", f"{moe_name}.math",
                                      f"{moe_name}.code"])
    domains = ["domain_math", "domain_code"]
    for name, report in reports.items():
        results = {r.task: r for r in report.results}
        assert list(results) == (domains if name.endswith("-mergekit-way") else TASKS + domains)
        assert all(results[t].n == 2 and 0 <= results[t].value <= 1 for t in results if t in TASKS)
        assert results["domain_math"].n == results["domain_code"].n == 16  # the recipe's eval_data limit
    rows = {r["domain"]: r for r in json.loads((out / "retention.json").read_text())}
    assert set(rows) == {"math", "code"} and rows["code"]["expert"] == "code"
    assert rows["code"]["mergekit_way"] == {r.task: r.value for r in reports[f"{moe_name}-mergekit-way"].results}[
        "domain_code"]
    table = pd.read_csv(out / "compare" / "compare.csv")
    assert set(TASKS) <= set(table["Name"]) and "Bigbench" in set(table["Name"])
    probe = json.loads((out / "probe.json").read_text())
    assert probe["expert_names"] == ["chat", "math", "code"] and probe["num_prompts"] == 12
    assert 1 / 3 < probe["accuracy"] <= 1  # better than chance routing of held-out domain prompts
    for artifact in [f"{moe_name}/moelab.json", f"{moe_name}-mergekit-way/moelab.json", "retention.md",
                     "routing.png", f"{moe_name}-Nous.md", "compare/compare.md", "compare/compare.png",
                     "leaderboard/leaderboard.md", "leaderboard/leaderboard.csv", "leaderboard/leaderboard.png",
                     "run.json"]:
        assert (out / artifact).stat().st_size > 0, artifact
    assert moe_name in (out / "leaderboard" / "leaderboard.md").read_text()
