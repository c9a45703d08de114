"""What a fresh clone needs: the offline eval data shipped with moelab, and generated reports kept out of git."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from conftest import SHIPPED_DATA_DIR
from moelab.eval.local import check_data_files, default_report_path, resolve_data_dir
from moelab.eval.suite import select_tasks

ROOT = Path(__file__).resolve().parents[1]


def test_every_bigbench_task_ships_30_rows_in_the_hails_schema_with_its_license():
    tasks = select_tasks("Bigbench")
    data_dir = resolve_data_dir("pkg:moelab/data")

    assert data_dir == SHIPPED_DATA_DIR and len(tasks) == 18
    check_data_files(tasks, data_dir)  # raises for a missing file
    for task in tasks:
        rows = [json.loads(line) for line in (data_dir / task.data_file).read_text().splitlines()]
        assert len(rows) == 30 and [r["idx"] for r in rows] == list(range(30)), task.name
        assert all(r["targets"][0] in r["multiple_choice_targets"] for r in rows), task.name
    assert "Apache License" in (data_dir / "bigbench" / "LICENSE").read_text()
    assert "canary GUID" in (data_dir / "bigbench" / "README.md").read_text()


def test_generated_reports_are_ignored_and_benchmarks_are_not():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0

    assert ignored("reports/demo/SmolLM2-3x135M-demo/model-00001-of-00001.safetensors")
    assert ignored("reports/leaderboard/leaderboard.png") and ignored("reports/my-moe/nous.json")
    assert not ignored("reports/bench/build.json") and not ignored("moelab/data/bigbench/navigate.jsonl")


def test_a_built_model_is_named_by_its_recipe_not_its_folder(tiny_moe_dir, tmp_path):
    demo = shutil.copytree(tiny_moe_dir, tmp_path / "demo")  # `moelab build ... out/demo`

    assert json.loads((demo / "moelab.json").read_text())["name"] == "tiny-moe"
    assert default_report_path(str(demo)) == Path("reports") / "tiny-moe" / "nous.json"
    (demo / "moelab.json").write_text('{"experts": []}')  # a build without a name: the folder's
    assert default_report_path(str(demo)) == Path("reports") / "demo" / "nous.json"
