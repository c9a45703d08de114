"""EvalReport: the versioned JSON result of `moelab eval` that compare, publish and remote read, and its Gist markdown.

Schema version 1 (all fields always present; JSON null where a value is unknown):
- schema_version: 1; suite: "nous"; model: local path or Hub repo id; model_name: the folder/repo name;
  revision: Hub commit or None; content_hash: for a local folder, sha256 of its JSON files and of each
  safetensors shard's size and header (cheap, changes with any weight layout/config change), else None;
  recipe: the moelab recipe (dict) when the model was built by moelab, else None; model_ref: the reference a
  recipe names the model by (e.g. `pkg:...gguf+ADAPTER`) when `model` is the folder moelab resolved it to, else None.
- settings: EvalSettings (tasks, num_fewshot per task, limit, backend, device, dtype, batch_size, max_length,
  engine: "moelab" (one scheduled pass, moelab/eval/scheduler.py) or "lm-eval" (lm-eval's own loop, task by task),
  batch_tokens: the moelab engine's tokens per forward pass, None for lm-eval; parallel: the strategy used, single,
  replicas (one model per GPU, requests split) or shard (one model across GPUs); gpus: how many GPUs it used).
- results: one TaskResult per task (value and stderr are fractions in 0..1; n = examples scored).
- groups: {"AGIEval"|"GPT4All"|"TruthfulQA"|"Bigbench": mean of its task values x100, rounded to 2}, only for a
  group whose tasks all ran; average: mean of the four rounded group scores, rounded to 2, only when all four exist.
- limited: True when the run used --limit (such scores are never comparable to full runs).
- versions: {"moelab", "lm_eval", "torch", "transformers"}; wall_time_s; date (ISO 8601, UTC); gist_id or None.
- speed: {"stages_s": {stage: seconds}, and for the moelab engine "requests", "cached", "requests_per_s", "rows",
  "batches", "tokens", "padded_tokens"} of this run (only the tasks it computed); {} in older reports.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from moelab.errors import MoelabError
from moelab.files import read_user_text, temp_file_beside
from moelab.redact import mask
from moelab.eval.suite import GROUPS, NOUS_TASKS, short_task_name, tasks_of_group

SCHEMA_VERSION = 1


@dataclass
class EvalSettings:
    tasks: list[str] = field(default_factory=lambda: [t.name for t in NOUS_TASKS])
    num_fewshot: dict[str, int] = field(default_factory=dict)
    limit: int | None = None
    backend: str = "hf"
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: str = "auto"
    max_length: int | None = None
    engine: str = "auto"
    batch_tokens: int | None = None
    parallel: str = "auto"  # auto, single, replicas or shard (see moelab/eval/parallel.py)
    gpus: int | None = None  # GPUs to use of those visible; None: all


@dataclass
class TaskResult:
    task: str
    group: str
    metric: str
    value: float  # 0..1
    stderr: float | None
    n: int
    version: str | None
    num_fewshot: int


@dataclass
class EvalReport:
    model: str
    model_name: str
    settings: EvalSettings
    results: list[TaskResult]
    revision: str | None = None
    content_hash: str | None = None
    recipe: dict | None = None
    groups: dict[str, float] = field(default_factory=dict)
    average: float | None = None
    limited: bool = False
    versions: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    date: str = ""
    gist_id: str | None = None
    model_ref: str | None = None
    speed: dict[str, Any] = field(default_factory=dict)
    suite: str = "nous"
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Any, source: str = "the report") -> "EvalReport":
        """Check the shape and every score (JSON allows NaN and Infinity, which no verdict may rest on)."""
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise MoelabError(f"{source} is not a moelab eval report (a JSON object); re-run `moelab eval`")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise MoelabError(f"{source}: schema_version {data.get('schema_version')!r:.40} is not {SCHEMA_VERSION}; "
                              "re-run `moelab eval` with this moelab version")
        try:
            report = _report_adapter().validate_python(data)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the top level"
            raise MoelabError(f"{source} is not a moelab eval report: {where}: {first['msg']}; "
                              "re-run `moelab eval`") from None
        problems = report.score_problems()
        if problems:
            raise MoelabError(f"{source}: {problems[0]}; re-run `moelab eval` for this model")
        return report

    def score_problems(self) -> list[str]:
        from moelab.eval.domain import lower_is_better

        problems = []
        for r in self.results:
            high = math.inf if lower_is_better(r.metric) else 1
            if not (0 <= r.value <= high):
                problems.append(f"task {r.task} has the score {r.value}, outside 0..{high:g}")
            if r.stderr is not None and not (0 <= r.stderr < math.inf):
                problems.append(f"task {r.task} has the standard error {r.stderr}")
            if r.n < 0:
                problems.append(f"task {r.task} has {r.n} examples")
        scores = {**self.groups, **({} if self.average is None else {"Average": self.average})}
        problems += [f"{name} is {value}, outside 0..100" for name, value in scores.items() if not 0 <= value <= 100]
        return problems

    @classmethod
    def load(cls, path: Path) -> "EvalReport":
        if not Path(path).exists():
            raise MoelabError(f"no report at {path}; run `moelab eval MODEL --output {path}` first")
        text = read_user_text(path, "eval report")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise MoelabError(f"{path} is not a moelab eval report (not JSON: {str(err)[:80]}); re-run `moelab eval`") \
                from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> Path:
        """Write JSON atomically (temp file in the same folder, then rename)."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return Path(path)


@functools.cache
def _report_adapter():
    from pydantic import TypeAdapter

    return TypeAdapter(EvalReport)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text`, secrets masked, whole or not at all; a full or read-only disk is a MoelabError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_file_beside(path)
    except OSError as err:
        raise unwritable(path, err) from None
    try:
        tmp.write_text(mask(text), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise unwritable(path, err) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unwritable(path: Path, err: OSError) -> MoelabError:
    return MoelabError(f"cannot write {path} ({err.strerror or type(err).__name__}); free some space or choose "
                       "a writable output folder")


def group_scores(results: list[TaskResult]) -> dict[str, float]:
    """AutoEval's group score: unweighted mean of task values x100, rounded to 2; only for complete groups."""
    by_task = {r.task: r.value for r in results}
    scores = {}
    for group in GROUPS:
        names = [t.name for t in tasks_of_group(group)]
        if all(n in by_task for n in names):
            scores[group] = round(sum(by_task[n] for n in names) / len(names) * 100, 2)
    return scores


def measured_groups(results: list[TaskResult]) -> dict[str, tuple[float, int, int]]:
    """Each Nous group with at least one task run: (mean of those task values x100, rounded to 2; tasks run; tasks
    in the group). A group with fewer tasks run than it has is partial: its mean is not the group's score."""
    measured = {}
    for group in GROUPS:
        values = [r.value for r in results if r.group == group]
        if values:
            measured[group] = (round(sum(values) / len(values) * 100, 2), len(values), len(tasks_of_group(group)))
    return measured


def partial_mark(ran: int, total: int) -> str:
    """How a partial group's score is marked wherever it is shown: "(4/18 tasks)"; nothing for a complete group."""
    return "" if ran == total else f"({ran}/{total} tasks)"


def overall_average(groups: dict[str, float]) -> float | None:
    """AutoEval's overall score: mean of the four already-rounded group scores, rounded to 2."""
    if not all(g in groups for g in GROUPS):
        return None
    return round(sum(groups[g] for g in GROUPS) / len(GROUPS), 2)


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w)
                              for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + "|"
    return "\n".join([line([h.center(w) for h, w in zip(header, widths)]), rule] + [line(r) for r in rows])


def _percent(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else "%.2f" % (value * 100)


def report_view(report: EvalReport):
    """A rich table per group: task rows, then the group score; the overall average in the caption."""
    from rich.table import Table

    limited = f", limited to {report.settings.limit} examples per task" if report.limited else ""
    average = "not all four groups ran" if report.average is None else f"{report.average:.2f}"
    table = Table(title=f"{report.model_name} on the Nous suite{limited}", title_justify="left",
                  caption=f"Average of the four groups: {average}", caption_justify="left")
    table.add_column("Task", overflow="fold", min_width=16)  # listed by group: names without the group prefix
    table.add_column("Metric", overflow="fold")
    for column in ("Value", "Stderr", "n"):
        table.add_column(column, justify="right")
    for group, (score, ran, total) in measured_groups(report.results).items():
        for r in (r for r in report.results if r.group == group):
            table.add_row(short_task_name(r.task), r.metric, _percent(r.value), _percent(r.stderr), str(r.n))
        table.add_row(f"[b]{group}[/b]", " ".join(["mean x100", partial_mark(ran, total)]).strip(),
                      f"[b]{score:.2f}[/b]", "", "", end_section=True)
    return table


def report_markdown(report: EvalReport, repo_id: str | None = None) -> str:
    """AutoEval's Gist layout: summary row, one table per group with its average, overall average, elapsed time.

    The model cell links to huggingface.co/<repo_id> (YALL parses that link); `repo_id` defaults to `report.model`
    when that looks like a Hub id.
    """
    hub_id = repo_id or (report.model if report.model.count("/") == 1 and not Path(report.model).exists()
                         and not report.model.startswith((".", "/")) else None)
    model_cell = f"[{report.model_name}](https://huggingface.co/{hub_id})" if hub_id else report.model_name
    summary = _table(["Model", *GROUPS, "Average"],
                     [[model_cell, *(str(report.groups.get(g, "")) for g in GROUPS),
                       "" if report.average is None else str(report.average)]], right=set(range(1, 6)))
    parts = [summary, ""]
    if report.limited:
        parts.append(f"**Limited run** (at most {report.settings.limit} examples per task): "
                     "not comparable to full scores.\n")
    for group, (average, ran, total) in measured_groups(report.results).items():
        rows = [[r.task, r.version or "", r.metric, _percent(r.value), "±", _percent(r.stderr)]
                for r in report.results if r.group == group]
        partial = f" (partial: {ran} of {total} tasks, not the group's score)" if ran < total else ""
        parts.append(f"### {group}\n"
                     + _table(["Task", "Version", "Metric", "Value", "", "Stderr"], rows, right={1, 3, 5})
                     + f"\n\nAverage: {average}%{partial}\n")
    overall = "Not available (not all four groups ran)" if report.average is None else f"{report.average}%"
    parts.append(f"Average score: {overall}")
    seconds = int(report.wall_time_s)
    parts.append(f"\nElapsed time: {seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}")
    return "\n".join(parts) + "\n"
