"""Leaderboard: Nous scores of many models, from local EvalReports and AutoEval Gists, as markdown, CSV, HTML and PNG."""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from moelab.errors import MoelabError
from moelab.files import read_user_text, temp_file_beside
from moelab.eval.report import EvalReport, measured_groups, partial_mark, unwritable, write_text_atomic
from moelab.eval.suite import GROUPS

GITHUB_API_URL = "https://api.github.com"
COLUMNS = ["Model", *GROUPS, "Average"]
PARTIAL_COLUMNS = [f"{g} tasks" for g in GROUPS]  # "4/18" for a group of which only some tasks ran
# What AutoEval writes in place of a group score when that group's result file is missing.
AUTOEVAL_MISSING_GROUP = "Error: File does not exist"
# How moelab's own gists (eval.report.report_markdown) flag a --limit run.
MOELAB_LIMITED_MARK = "**Limited run**"
GIST_ID = re.compile(r"[0-9a-f]{20}|[0-9a-f]{32}")
GIST_URL = re.compile(r"https?://gist\.github(?:usercontent)?\.com/(?:[\w.-]+/)?([0-9a-f]{20}|[0-9a-f]{32})\b")
MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
# Links in the pages we write: a gist is untrusted text, and `javascript:` or `data:` links would run in a browser.
SAFE_URL = re.compile(r"https?://[^\s\"'<>`]+", re.IGNORECASE)


@dataclass
class LeaderboardEntry:
    """One model's row: group scores x100 (a missing group is absent), where they came from, where the model lives.

    `partial`: groups of which only some tasks ran, as (tasks run, tasks in the group); their score is the mean of
    the tasks that ran. `date`: when the report was made (reports only), to keep the newest of one model's rows.
    """

    model: str
    scores: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    model_url: str | None = None
    source: str = ""
    source_url: str | None = None
    limited: bool = False
    partial: dict[str, tuple[int, int]] = field(default_factory=dict)
    date: str = ""
    from_report: bool = False


# ---------------------------------------------------------------- reading


def parse_autoeval_gist(text: str, source: str) -> LeaderboardEntry:
    """Read the summary table (the first table) of a Gist in AutoEval's Nous layout (moelab's own gists included).

    Columns are found by their header names, so a gist whose Average column is missing (AutoEval drops it when a
    group failed) still reads; a group shown as AutoEval's "Error: File does not exist" is left out.
    """
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    if start is None or len(lines) < start + 3 or not lines[start + 2].startswith("|"):
        raise MoelabError(f"{source}: no summary table (header, rule and one model row) found; "
                          "is this an AutoEval Nous gist (MODEL-Nous.md)?")
    header = _cells(lines[start])
    row = _cells(lines[start + 2])
    missing = [c for c in ["Model", *GROUPS] if c not in header]
    if missing:
        raise MoelabError(f"{source}: the summary table has columns {', '.join(header)} but lacks "
                          f"{', '.join(missing)}; only AutoEval's Nous gists (AGIEval, GPT4All, TruthfulQA, Bigbench) "
                          "can be ranked")
    if len(row) != len(header):
        raise MoelabError(f"{source}: the summary row has {len(row)} cells for {len(header)} columns; "
                          "the gist is damaged or hand-edited")
    cells = dict(zip(header, row))
    link = MARKDOWN_LINK.fullmatch(cells["Model"])
    name, url = (link.group(1), link.group(2)) if link else (cells["Model"], None)
    scores = {g: value for g in GROUPS if (value := _gist_number(cells[g], g, source)) is not None}
    average = _gist_number(cells["Average"], "Average", source) if "Average" in cells else None
    return LeaderboardEntry(model=name, scores=scores, average=average, model_url=url, source=source,
                            limited=MOELAB_LIMITED_MARK in text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _gist_number(cell: str, column: str, source: str) -> float | None:
    if cell in ("", AUTOEVAL_MISSING_GROUP):
        return None
    try:
        value = float(cell.rstrip("%"))
    except ValueError:
        raise MoelabError(f"{source}: cannot read the {column} score '{cell}' in the summary table; "
                          "expected a number or AutoEval's 'Error: File does not exist'") from None
    if not 0 <= value <= 100:
        raise MoelabError(f"{source}: the {column} score {cell} is outside 0..100")
    return value


def entry_from_report(report: EvalReport, source: str) -> LeaderboardEntry:
    measured = measured_groups(report.results)
    return LeaderboardEntry(model=report.model_name, scores={g: score for g, (score, _, _) in measured.items()},
                            average=report.average, model_url=_hub_url(report.model), source=source,
                            source_url=f"https://gist.github.com/{report.gist_id}" if report.gist_id else None,
                            limited=report.limited, date=report.date, from_report=True,
                            partial={g: (ran, total) for g, (_, ran, total) in measured.items() if ran < total})


def one_row_per_model(entries: list[LeaderboardEntry]) -> list[LeaderboardEntry]:
    """The best-founded entry of each model: a full run over a limited one, then the one scoring more groups, a
    report over its gist markdown (which holds less), then the newest. Entries without a Nous score (a report of
    domain tasks only) have nothing to rank and are left out."""
    def rank(entry: LeaderboardEntry) -> tuple:
        return not entry.limited, len(entry.scores), entry.from_report, entry.date

    best: dict[str, LeaderboardEntry] = {}
    for entry in entries:
        if entry.scores and (entry.model not in best or rank(entry) > rank(best[entry.model])):
            best[entry.model] = entry
    return list(best.values())


def _hub_url(model: str) -> str | None:
    """huggingface.co link for a Hub id ("org/name"); None for local paths."""
    looks_like_hub_id = model.count("/") == 1 and not model.startswith((".", "/", "~")) and not Path(model).exists()
    return f"https://huggingface.co/{model}" if looks_like_hub_id else None


def gist_id_of(ref: str) -> str | None:
    """The Gist id in a gist URL or a bare id; None when `ref` is neither."""
    if GIST_ID.fullmatch(ref):
        return ref
    match = GIST_URL.match(ref)
    return match.group(1) if match else None


def read_gist_entry(gist_id: str, github_token: str | None, github_api_url: str = GITHUB_API_URL) -> LeaderboardEntry:
    """Fetch a Gist through the GitHub API (PyGithub) and parse its AutoEval Nous markdown file."""
    from github import Auth, BadCredentialsException, Github, GithubException, UnknownObjectException
    from requests.exceptions import RequestException

    github = Github(auth=Auth.Token(github_token) if github_token else None, base_url=github_api_url, retry=2)
    try:
        gist = github.get_gist(gist_id)
        files = gist.files
        html_url = gist.html_url
    except UnknownObjectException:
        raise MoelabError(f"Gist {gist_id} not found at {github_api_url}; check the id (a private gist needs "
                          "--github-token or GITHUB_TOKEN)") from None
    except BadCredentialsException:
        raise MoelabError("GitHub rejected the token; check --github-token / GITHUB_TOKEN") from None
    except GithubException as err:
        raise MoelabError(f"GitHub answered {err.status} for Gist {gist_id}; try again later") from None
    except RequestException as err:
        raise MoelabError(f"cannot reach {github_api_url} ({type(err).__name__}); check the network "
                          "or --github-api-url") from None
    markdown = [f for name, f in sorted(files.items()) if name.endswith(".md")]
    nous = [f for f in markdown if f.filename.endswith("-Nous.md")]
    if not (nous or markdown):
        raise MoelabError(f"Gist {gist_id} holds no markdown file ({', '.join(files) or 'no files'}); "
                          "expected AutoEval's MODEL-Nous.md")
    chosen = (nous or markdown)[0]
    entry = parse_autoeval_gist(chosen.content or "", f"Gist {gist_id} ({chosen.filename})")
    entry.source, entry.source_url = html_url, html_url
    return entry


def eval_reports_under(folder: Path) -> list[tuple[Path, EvalReport]]:
    """Every moelab eval report (a *.json with "suite" and "results") under `folder`; other JSON is skipped."""
    found = []
    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(data, dict) and "suite" in data and "results" in data:
            found.append((path, EvalReport.from_dict(data, f"{path} (move it out of the folder or re-run eval)")))
    return found


def _entries_in_folder(folder: Path) -> list[LeaderboardEntry]:
    """Every eval report and AutoEval gist (*-Nous.md) under `folder`."""
    entries = [entry_from_report(report, str(path)) for path, report in eval_reports_under(folder)]
    return entries + [parse_autoeval_gist(read_user_text(path, "gist"), str(path))
                      for path in sorted(folder.rglob("*-Nous.md"))]


def collect_entries(refs: list[str], github_token: str | None = None,
                    github_api_url: str | None = None) -> list[LeaderboardEntry]:
    """Entries from local report files (.json), gist markdown files (.md), folders of them, and Gist ids/URLs."""
    entries = []
    for ref in refs:
        path = Path(ref)
        if path.is_dir():
            found = _entries_in_folder(path)
            if not found:
                raise MoelabError(f"{ref} holds no eval report (*.json) or AutoEval gist (*-Nous.md); "
                                  "run `moelab eval` first")
            entries += found
        elif path.is_file() and path.suffix == ".json":
            entries.append(entry_from_report(EvalReport.load(path), ref))
        elif path.is_file():
            entries.append(parse_autoeval_gist(read_user_text(path, "gist"), ref))
        elif gist_id := gist_id_of(ref):
            entries.append(read_gist_entry(gist_id, github_token, github_api_url or GITHUB_API_URL))
        else:
            raise MoelabError(f"'{ref}' is neither a file, a folder, nor a Gist id/URL")
    return entries


# ---------------------------------------------------------------- the table


def leaderboard_table(entries: list[LeaderboardEntry]):
    """A pandas DataFrame, best Average first (models without one last), with the links and provenance of each row."""
    import pandas as pd

    rows = [{"Model": e.model, **{g: e.scores.get(g, math.nan) for g in GROUPS},
             "Average": math.nan if e.average is None else e.average, "Limited": e.limited,
             **{f"{g} tasks": "{}/{}".format(*e.partial[g]) if g in e.partial else "" for g in GROUPS},
             "Model URL": e.model_url, "Source": e.source, "Source URL": e.source_url}
            for e in one_row_per_model(entries)]
    table = pd.DataFrame(rows, columns=[*COLUMNS, "Limited", *PARTIAL_COLUMNS, "Model URL", "Source", "Source URL"])
    return table.sort_values(["Average", "Model"], ascending=[False, True], na_position="last",
                             kind="stable").reset_index(drop=True)


def _score(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _score_cell(row, column: str) -> str:
    """A group score, marked "(4/18 tasks)" when only some of the group's tasks ran."""
    tasks = row.get(f"{column} tasks") or ""
    return " ".join(filter(None, [_score(row[column]), partial_mark(*map(int, tasks.split("/"))) if tasks else ""]))


def _notes(table) -> list[str]:
    notes = []
    if table["Limited"].any():
        notes.append("(limited): evaluated with --limit, at most that many examples per task; not comparable to full "
                     "runs.")
    if (table[PARTIAL_COLUMNS] != "").any().any():
        notes.append("(n/m tasks): a partial group, the mean of the n tasks that ran; Average needs all four full "
                     "groups.")
    return notes


def _link(row, column: str) -> str | None:
    """A URL cell, when it is an http(s) link; pandas stores a missing one as None or NaN depending on the dtype."""
    value = row[column]
    return value if isinstance(value, str) and SAFE_URL.fullmatch(value) else None


def _model_markdown(row) -> str:
    model_url, source_url = _link(row, "Model URL"), _link(row, "Source URL")
    name = row["Model"].replace("|", "\\|")  # a pipe would end the cell
    cell = f"[{name}]({model_url})" if model_url else name
    if source_url:
        cell += f" [📄]({source_url})"
    return cell + (" *(limited)*" if row["Limited"] else "")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table; columns holding only numbers (or blanks) are right-aligned."""
    widths = [max(3, *(len(r[i]) for r in [header, *rows])) for i in range(len(header))]
    numeric = [all(_is_number(r[i]) or not r[i] for r in rows) and any(r[i] for r in rows) for i in range(len(header))]
    rule = ["-" * (w - 1) + ":" if right else "-" * w for w, right in zip(widths, numeric)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right else c.ljust(w)
                                 for c, w, right in zip(cells, widths, numeric)) + " |"

    return "\n".join([line(header), line(rule), *(line(r) for r in rows)])


def rich_table(title: str | None, header: list[str], rows: list[list[str]]):
    """The terminal twin of markdown_table: numbers right-aligned; one space between columns and long words folded,
    so that it stays readable in 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, title_style="bold", collapse_padding=True,
                  pad_edge=False)
    for i, name in enumerate(header):
        numeric = all(_is_number(r[i]) or not r[i] for r in rows)
        # Numbers never break; the first column (names) keeps up to 16 characters before it folds; other text
        # wraps at 8 characters (or its longest word), which rich's own shrinking does not do reliably.
        longest = max((len(r[i]) for r in rows), default=0)
        longest_word = max((len(word) for r in [header, *rows] for word in r[i].split()), default=0)
        table.add_column(name, justify="right" if numeric else "left", overflow="fold",
                         min_width=longest if numeric else min(16, longest) if i == 0 else None,
                         max_width=None if numeric or i == 0 else max(8, longest_word))
    for row in rows:
        table.add_row(*row)
    return table


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def leaderboard_markdown(table) -> str:
    rows = [[_model_markdown(row), *(_score_cell(row, c) for c in COLUMNS[1:])] for _, row in table.iterrows()]
    return "\n\n".join([markdown_table(COLUMNS, rows), *(f"*{note}*" for note in _notes(table))]) + "\n"


def leaderboard_view(table):
    """The leaderboard as rich renderables for the terminal (links are in the markdown and HTML files)."""
    from rich.console import Group
    from rich.text import Text

    rows = [[row["Model"] + (" (limited)" if row["Limited"] else ""), *(_score_cell(row, c) for c in COLUMNS[1:])]
            for _, row in table.iterrows()]
    return Group(rich_table("Leaderboard (Nous suite)", COLUMNS, rows),
                 *(Text(note, style="dim") for note in _notes(table)))


def leaderboard_html(table) -> str:
    """A self-contained page: the table sorts by any column when its header is clicked (no server, no CDN)."""
    def model_cell(row) -> str:
        name, model_url, source_url = html.escape(row["Model"]), _link(row, "Model URL"), _link(row, "Source URL")
        cell = f'<a href="{html.escape(model_url)}">{name}</a>' if model_url else name
        if source_url:
            cell += f' <a href="{html.escape(source_url)}" title="source">📄</a>'
        return cell + (' <em title="evaluated with --limit">(limited)</em>' if row["Limited"] else "")

    body = "\n".join(
        f'<tr><td data-sort="{html.escape(row["Model"].lower())}">{model_cell(row)}</td>'
        + "".join(f'<td data-sort="{"" if math.isnan(row[c]) else row[c]}">{html.escape(_score_cell(row, c))}</td>'
                  for c in COLUMNS[1:])
        + "</tr>" for _, row in table.iterrows())
    header = "".join(f"<th>{c}</th>" for c in COLUMNS)
    notes = "".join(f"<p><em>{html.escape(note)}</em></p>\n" for note in _notes(table))
    return _HTML_PAGE.replace("{header}", header).replace("{body}", body).replace("{notes}", notes)


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moelab leaderboard (Nous suite)</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em; }
table { border-collapse: collapse; }
th, td { padding: 4px 12px; border-bottom: 1px solid #ddd; }
td:not(:first-child) { text-align: right; font-variant-numeric: tabular-nums; }
th { cursor: pointer; background: #f3f3f3; user-select: none; }
th.asc::after { content: " \\25B2"; } th.desc::after { content: " \\25BC"; }
</style></head>
<body>
<h1>Leaderboard (Nous suite)</h1>
<p>Scores are percentages; Average is the mean of the four groups. Click a column header to sort.</p>
<table id="leaderboard"><thead><tr>{header}</tr></thead>
<tbody>
{body}
</tbody></table>
{notes}<script>
document.querySelectorAll("#leaderboard th").forEach((th, column) => th.addEventListener("click", () => {
  const tbody = document.querySelector("#leaderboard tbody");
  // first click: names A to Z, scores best first; a second click reverses
  const descending = column === 0 ? th.classList.contains("asc") : !th.classList.contains("desc");
  const key = row => row.children[column].dataset.sort;
  const rows = [...tbody.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (x === "" || y === "") return (x === "") - (y === "");  // empty cells always last
    const order = column === 0 ? x.localeCompare(y) : Number(x) - Number(y);
    return descending ? -order : order;
  });
  document.querySelectorAll("#leaderboard th").forEach(h => h.classList.remove("asc", "desc"));
  th.classList.add(descending ? "desc" : "asc");
  rows.forEach(row => tbody.appendChild(row));
}));
</script>
</body></html>
"""


def plot_leaderboard(table, path: Path) -> Path:
    """Horizontal grouped bars: one block per model (best on top), one bar per group plus the Average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{m} (limited)" if lim else m for m, lim in zip(table["Model"], table["Limited"])]
    series = [c for c in COLUMNS[1:] if table[c].notna().any()]  # only what was measured: no empty bars
    bar_height = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(10, 1.6 + 0.9 * len(table)), layout="constrained")
    for i, column in enumerate(series):
        measured = [(row, value) for row, value in enumerate(table[column]) if not math.isnan(value)]
        bars = axes.barh([row - 0.4 + bar_height * (i + 0.5) for row, _ in measured], [v for _, v in measured],
                         height=bar_height, label=column, color="black" if column == "Average" else f"C{i}")
        axes.bar_label(bars, labels=[_score_cell(table.iloc[row], column) for row, _ in measured], padding=2,
                       fontsize=7)
    axes.set_yticks(range(len(table)), labels)
    axes.invert_yaxis()
    axes.set_xlim(0, 115)
    axes.set_xlabel("score (%)")
    axes.set_title("Nous suite leaderboard" + ("" if series else ": no group scores to show"))
    if series:
        figure.legend(loc="outside lower center", fontsize=8, ncols=len(series))
    return save_figure_atomic(figure, path)


def save_figure_atomic(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path, ".png")
        figure.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except OSError as err:
        raise unwritable(path, err) from None
    finally:
        plt.close(figure)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def write_leaderboard(table, out_dir: Path) -> list[Path]:
    """leaderboard.md, .csv, .html and .png in `out_dir`, each written atomically."""
    out_dir = Path(out_dir)
    written = []
    for name, text in [("leaderboard.md", leaderboard_markdown(table)),
                       ("leaderboard.csv", table.to_csv(index=False)),
                       ("leaderboard.html", leaderboard_html(table))]:
        write_text_atomic(out_dir / name, text)
        written.append(out_dir / name)
    written.append(plot_leaderboard(table, out_dir / "leaderboard.png"))
    return written
