"""`moelab leaderboard`: AutoEval gists (files and through a fake GitHub API) and local reports, ranked in one table."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from fakes.github import FakeGitHub

from moelab.errors import MoelabError
from moelab.eval.report import (EvalReport, EvalSettings, TaskResult, group_scores, overall_average,
                                report_markdown)
from moelab.eval.suite import NOUS_TASKS
from moelab.leaderboard import (collect_entries, gist_id_of, leaderboard_markdown, leaderboard_table,
                                parse_autoeval_gist, write_leaderboard)

GISTS = Path(__file__).parent / "fixtures" / "gists"
REAL_GIST = GISTS / "llama3-alpaca-dpo-instruct-Nous.md"  # AutoEval output for vincentoh/llama3-alpaca-dpo-instruct
FAILED_GIST = GISTS / "SmolLM2-MoE-2x135M-Nous.md"  # AutoEval output when bigbench.json was missing
TOKEN = "ghp_leaderboardtesttoken0000"


def make_report(name: str, value: float, limit: int | None = None, skip_group: str | None = None,
                model: str | None = None) -> EvalReport:
    """A report over the whole Nous suite where every task scores `value` (stderr 0.02), minus `skip_group`."""
    results = [TaskResult(t.name, t.group, t.metric, value, 0.02, 50 if limit else 500, "1", 0)
               for t in NOUS_TASKS if t.group != skip_group]
    groups = group_scores(results)
    return EvalReport(model=model or f"/models/{name}", model_name=name,
                      settings=EvalSettings(tasks=[r.task for r in results], limit=limit), results=results,
                      groups=groups, average=overall_average(groups), limited=limit is not None)


def test_real_autoeval_gist_reads_its_summary_row():
    entry = parse_autoeval_gist(REAL_GIST.read_text(), str(REAL_GIST))
    assert entry.model == "llama3-alpaca-dpo-instruct"
    assert entry.model_url == "https://huggingface.co/vincentoh/llama3-alpaca-dpo-instruct"
    assert entry.scores == {"AGIEval": 30.67, "GPT4All": 70.01, "TruthfulQA": 46.56, "Bigbench": 37.3}
    assert entry.average == 46.14
    # The fixture is self-consistent the way AutoEval's output is: each group section ends with the summary's score,
    # and the overall average is the mean of the four rounded group scores.
    sections = dict(re.findall(r"### (\w+)\n.*?\nAverage: ([\d.]+)%", REAL_GIST.read_text(), re.S))
    assert {g: float(v) for g, v in sections.items()} == entry.scores
    assert round(sum(entry.scores.values()) / 4, 2) == entry.average


def test_gist_with_a_failed_group_keeps_the_groups_that_ran():
    entry = parse_autoeval_gist(FAILED_GIST.read_text(), str(FAILED_GIST))
    assert entry.model == "SmolLM2-MoE-2x135M"
    assert entry.scores == {"AGIEval": 26.07, "GPT4All": 43.4, "TruthfulQA": 40.51}
    assert entry.average is None


@pytest.mark.parametrize("limit", [None, 5])
def test_moelab_gists_read_back_with_their_scores(limit):
    report = make_report("moe-full", 0.4567, limit=limit, skip_group="TruthfulQA" if limit else None,
                         model="org/moe-full")
    entry = parse_autoeval_gist(report_markdown(report), "gist")
    assert (entry.model, entry.model_url) == ("moe-full", "https://huggingface.co/org/moe-full")
    assert (entry.scores, entry.average, entry.limited) == (report.groups, report.average, limit is not None)


@pytest.mark.parametrize("fixture, message", [
    ("malformed/no-table.md", "no summary table"),
    ("malformed/truncated.md", "no summary table"),
    ("malformed/bad-score.md", "cannot read the AGIEval score '3O.67'"),
    ("llama3-alpaca-dpo-instruct-Openllm.md", "lacks AGIEval, GPT4All, Bigbench"),
])
def test_malformed_or_foreign_gists_are_refused_with_the_reason(fixture, message):
    with pytest.raises(MoelabError, match=re.escape(message)):
        collect_entries([str(GISTS / fixture)])


def test_gist_ids_and_urls():
    gist_id = "1d33c86824b3a11d2308e36db1ba41c1"
    assert gist_id_of(gist_id) == gist_id
    assert gist_id_of(f"https://gist.github.com/mlabonne/{gist_id}") == gist_id
    assert gist_id_of(f"https://gist.github.com/{gist_id}") == gist_id
    assert gist_id_of("reports/nothing-here") is None


def test_table_ranks_reports_and_gists_cell_by_cell(tmp_path):
    make_report("moe-full", 0.5).save(tmp_path / "moe-full" / "nous.json")
    make_report("moe-limited", 0.6, limit=20).save(tmp_path / "moe-limited" / "nous.json")
    make_report("no-bigbench", 0.7, skip_group="Bigbench", model="org/no-bigbench").save(
        tmp_path / "no-bigbench" / "nous.json")
    (tmp_path / "bench.json").write_text('{"not": "a report"}')  # other JSON in the folder is skipped
    shutil.copy(REAL_GIST, tmp_path / REAL_GIST.name)

    table = leaderboard_table(collect_entries([str(tmp_path), str(FAILED_GIST)]))

    nan = math.nan
    expected = pd.DataFrame({
        "Model": ["moe-limited", "moe-full", "llama3-alpaca-dpo-instruct", "SmolLM2-MoE-2x135M", "no-bigbench"],
        "AGIEval": [60.0, 50.0, 30.67, 26.07, 70.0],
        "GPT4All": [60.0, 50.0, 70.01, 43.4, 70.0],
        "TruthfulQA": [60.0, 50.0, 46.56, 40.51, 70.0],
        "Bigbench": [60.0, 50.0, 37.3, nan, nan],
        "Average": [60.0, 50.0, 46.14, nan, nan],
        "Limited": [True, False, False, False, False],
    })
    pd.testing.assert_frame_equal(table[expected.columns], expected)
    assert table["Model URL"].tolist()[2:] == ["https://huggingface.co/vincentoh/llama3-alpaca-dpo-instruct",
                                               "https://huggingface.co/moelab/SmolLM2-MoE-2x135M",
                                               "https://huggingface.co/org/no-bigbench"]
    assert table["Source"].tolist() == [str(tmp_path / "moe-limited" / "nous.json"),
                                        str(tmp_path / "moe-full" / "nous.json"), str(tmp_path / REAL_GIST.name),
                                        str(FAILED_GIST), str(tmp_path / "no-bigbench" / "nous.json")]


def test_outputs_markdown_csv_html_and_png(tmp_path):
    entries = collect_entries([str(REAL_GIST), str(FAILED_GIST)])
    entries.append(collect_entries([str(make_report("moe-limited", 0.25, limit=5).save(tmp_path / "r.json"))])[0])
    table = leaderboard_table(entries)
    written = write_leaderboard(table, tmp_path / "out")
    assert [p.name for p in written] == ["leaderboard.md", "leaderboard.csv", "leaderboard.html", "leaderboard.png"]

    markdown = (tmp_path / "out" / "leaderboard.md").read_text()
    assert markdown == leaderboard_markdown(table)
    lines = markdown.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["Model", "AGIEval", "GPT4All", "TruthfulQA",
                                                              "Bigbench", "Average"]
    assert [c.strip()[-1] for c in lines[1].split("|")[1:-1]] == ["-", ":", ":", ":", ":", ":"]  # numbers align right
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "[llama3-alpaca-dpo-instruct](https://huggingface.co/vincentoh/llama3-alpaca-dpo-instruct)",
        "30.67", "70.01", "46.56", "37.30", "46.14"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["moe-limited *(limited)*", "25.00", "25.00", "25.00",
                                                              "25.00", "25.00"]
    assert [c.strip() for c in lines[4].split("|")[1:-1]] == [
        "[SmolLM2-MoE-2x135M](https://huggingface.co/moelab/SmolLM2-MoE-2x135M)", "26.07", "43.40", "40.51", "", ""]
    assert "evaluated with --limit" in markdown

    csv = pd.read_csv(tmp_path / "out" / "leaderboard.csv")
    assert csv["Model"].tolist() == ["llama3-alpaca-dpo-instruct", "moe-limited", "SmolLM2-MoE-2x135M"]
    assert csv["Average"].tolist()[:2] == [46.14, 25.0] and math.isnan(csv["Average"][2])
    assert csv["Bigbench"].tolist()[:2] == [37.3, 25.0]

    page = (tmp_path / "out" / "leaderboard.html").read_text()
    assert page.index("llama3-alpaca-dpo-instruct</a>") < page.index("moe-limited") < page.index("SmolLM2-MoE")
    assert '<td data-sort="46.14">46.14</td>' in page
    assert not re.search(r'<(script|link)[^>]+(src|href)=', page)  # self-contained: no external script or style
    if shutil.which("node"):
        script = page.split("<script>")[1].split("</script>")[0]
        (tmp_path / "sort.js").write_text(script)
        subprocess.run(["node", "--check", str(tmp_path / "sort.js")], check=True)

    png = (tmp_path / "out" / "leaderboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def _upload(fake: FakeGitHub, files: dict[str, str]) -> str:
    """Create a gist through the real API, as AutoEval's upload does; return its html_url."""
    import github

    client = github.Github(auth=github.Auth.Token(TOKEN), base_url=fake.base_url)
    gist = client.get_user().create_gist(True, {name: github.InputFileContent(text) for name, text in files.items()})
    return gist.html_url


def test_gists_read_through_the_github_api():
    with FakeGitHub(token=TOKEN) as fake:
        real = _upload(fake, {REAL_GIST.name: REAL_GIST.read_text()})
        failed = _upload(fake, {"notes.txt": "run on a 3090", FAILED_GIST.name: FAILED_GIST.read_text()})
        entries = collect_entries([real, gist_id_of(failed)], github_token=TOKEN, github_api_url=fake.base_url)
        fetched = [path for method, path, _ in fake.requests if method == "GET"]

    assert [(e.model, e.average, e.source_url) for e in entries] == [
        ("llama3-alpaca-dpo-instruct", 46.14, real), ("SmolLM2-MoE-2x135M", None, failed)]
    assert entries[0].scores["Bigbench"] == 37.3 and "Bigbench" not in entries[1].scores
    assert fetched == [f"/gists/{gist_id_of(real)}", f"/gists/{gist_id_of(failed)}"]


def test_gist_errors_are_one_line_with_the_fix():
    with FakeGitHub(token=TOKEN) as fake:
        url = _upload(fake, {REAL_GIST.name: REAL_GIST.read_text()})
        with pytest.raises(MoelabError, match="Gist 00000000000000000000 not found"):
            collect_entries(["00000000000000000000"], TOKEN, fake.base_url)
        with pytest.raises(MoelabError, match="GitHub rejected the token"):
            collect_entries([url], "ghp_wrong", fake.base_url)
        _upload(fake, {"notes.txt": "no markdown here"})
        with pytest.raises(MoelabError, match="holds no markdown file"):
            collect_entries([next(reversed(fake.gists))], TOKEN, fake.base_url)


def test_cli_ranks_a_folder_and_a_gist_and_never_prints_the_token(tmp_path):
    make_report("moe-full", 0.5).save(tmp_path / "reports" / "moe-full" / "nous.json")
    with FakeGitHub(token=TOKEN) as fake:
        url = _upload(fake, {REAL_GIST.name: REAL_GIST.read_text()})
        run = subprocess.run([sys.executable, "-m", "moelab", "leaderboard", str(tmp_path / "reports"), url,
                              "--out", str(tmp_path / "board"), "--github-api-url", fake.base_url],
                             env={**os.environ, "GITHUB_TOKEN": TOKEN, "COLUMNS": "120"},
                             capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert TOKEN not in run.stdout + run.stderr
    assert run.stdout.index("moe-full") < run.stdout.index("llama3-alpaca-dpo-instruct")
    assert sorted(p.name for p in (tmp_path / "board").iterdir()) == [
        "leaderboard.csv", "leaderboard.html", "leaderboard.md", "leaderboard.png"]
    assert TOKEN not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "board").iterdir())

    bad = subprocess.run([sys.executable, "-m", "moelab", "leaderboard", str(GISTS / "malformed" / "bad-score.md")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "cannot read the AGIEval score '3O.67'" in bad.stderr


def demo_like_report(limit: int = 6) -> EvalReport:
    """What `moelab demo` measures: 4 of the 18 Bigbench tasks, --limit 6, no other group."""
    tasks = [t for t in NOUS_TASKS if t.group == "Bigbench"][:4]
    results = [TaskResult(t.name, t.group, t.metric, v, 0.2, limit, "1", 0) for t, v in zip(tasks, (0.5, 0.5, 1, 0))]
    return EvalReport(model="/reports/demo/SmolLM2-3x135M-demo", model_name="SmolLM2-3x135M-demo",
                      settings=EvalSettings(tasks=[t.name for t in tasks], limit=limit), results=results,
                      groups=group_scores(results), limited=True, date="2026-12-01T09:00:00+00:00")


def test_a_partial_limited_run_shows_what_was_measured_once_per_model(tmp_path):
    from matplotlib.image import imread

    report = demo_like_report()
    report.save(tmp_path / "reports" / "SmolLM2-3x135M-demo" / "nous.json")
    gist_markdown = report_markdown(report)
    (tmp_path / "SmolLM2-3x135M-demo-Nous.md").write_text(gist_markdown)  # the same model, as the demo writes it

    assert "Average: 50.0% (partial: 4 of 18 tasks, not the group's score)" in gist_markdown
    assert "Average: %" not in gist_markdown
    table = leaderboard_table(collect_entries([str(tmp_path)]))
    assert table["Model"].tolist() == ["SmolLM2-3x135M-demo"]  # one row, from the report (the gist holds less)
    assert table["Source"][0].endswith("nous.json")
    write_leaderboard(table, tmp_path / "board")

    row = (tmp_path / "board" / "leaderboard.md").read_text().splitlines()[2]
    assert [c.strip() for c in row.split("|")[1:-1]] == ["SmolLM2-3x135M-demo *(limited)*", "", "", "",
                                                         "50.00 (4/18 tasks)", ""]
    assert "a partial group" in (tmp_path / "board" / "leaderboard.md").read_text()
    assert pd.read_csv(tmp_path / "board" / "leaderboard.csv")["Bigbench tasks"].tolist() == ["4/18"]
    assert ">50.00 (4/18 tasks)</td>" in (tmp_path / "board" / "leaderboard.html").read_text()
    # The chart has the measured bar: pixels of the first series colour (matplotlib's C0, #1f77b4).
    pixels = imread(tmp_path / "board" / "leaderboard.png")[..., :3]
    c0 = ((abs(pixels - [0x1f / 255, 0x77 / 255, 0xb4 / 255]) < 0.02).all(axis=-1)).sum()
    assert c0 > 500
