"""Run the Nous suite on this machine through lm-eval's Python API, one task at a time, with a resume cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from moelab.errors import MoelabError
from moelab.eval.report import (EvalReport, EvalSettings, TaskResult, group_scores, overall_average,
                                write_text_atomic)
from moelab.eval.domain import NLL_STDERR_METRIC, DomainTask, domain_task_config, split_selection
from moelab.eval.suite import SuiteTask
from moelab.recipe import NAME_PATTERN

# On CPU lm-eval's "auto" batch probe runs five full-length forwards at batch 64: slower than the eval itself.
CPU_AUTO_BATCH_SIZE = 8
# The Nous-era harness split these two BIG-bench tasks by number of objects; hails/bigbench mixes them in one config.
OBJECT_COUNTS = {"three": 3, "five": 5, "seven": 7}
# Offline task data shipped with moelab (the first rows of the 18 BIG-bench tasks): `--data-dir pkg:moelab/data`.
SHIPPED_DATA = "pkg:moelab/data"
SHIPPED_ROWS_PER_TASK = 30


def multiple_choice_grade(doc: dict, loglikelihoods: list) -> dict[str, float]:
    """BIG-bench's multiple_choice_grade: the score of the most likely choice, so any choice that scores 1 counts.

    lm-eval 0.4's `acc` credits only targets[0]; 816 reasoning_about_colored_objects and 72 geometric_shapes rows
    have two right answers ("3"/"three"), which the Nous numbers credit.
    """
    scores = [ll for ll, _ in loglikelihoods]
    best = max(range(len(scores)), key=scores.__getitem__)
    return {"multiple_choice_grade": float(doc["multiple_choice_scores"][best] == 1)}


def docs_with_choice_count(dataset, count: int):
    return dataset.filter(lambda doc: len(doc["multiple_choice_targets"]) == count)


def bigbench_config(task: SuiteTask, data_dir: Path | None) -> dict:
    """Our own lm-eval task for one of the 18 Nous BIG-bench tasks, from hails/bigbench or a local JSONL file."""
    stem = Path(task.data_file).stem
    parent, _, objects = stem.rpartition("_objects")[0].rpartition("_")
    count = OBJECT_COUNTS.get(objects) if parent in ("logical_deduction", "tracking_shuffled_objects") else None
    if data_dir is not None:
        source = {"dataset_path": "json", "dataset_name": None,
                  "dataset_kwargs": {"data_files": {"default": str(data_dir / task.data_file)}}}
        process_docs = None
    else:
        source = {"dataset_path": "hails/bigbench", "dataset_name": f"{parent if count else stem}_zero_shot"}
        process_docs = partial(docs_with_choice_count, count=count) if count else None
    return {
        "task": task.name, **source, "output_type": "multiple_choice", "test_split": "default",
        **({"process_docs": process_docs} if process_docs else {}),
        "doc_to_text": "inputs", "doc_to_target": "{{multiple_choice_targets.index(targets[0])}}",
        "doc_to_choice": "{{multiple_choice_targets}}", "process_results": multiple_choice_grade,
        "metric_list": [{"metric": "multiple_choice_grade", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": task.num_fewshot, "metadata": {"version": 1.0},
    }


def stock_config(task: SuiteTask, data_dir: Path | None) -> dict:
    """lm-eval's own YAML for the task, renamed to the Nous name and, with a data dir, pointed at a local file."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / task.lm_eval_yaml, resolve_func=True)
    for key in ("tag", "group"):
        config.pop(key, None)
    config.update(task=task.name, num_fewshot=task.num_fewshot)
    if data_dir is not None:
        split = config.get("test_split") or config["validation_split"]
        config.update(dataset_path="json", dataset_name=None,
                      dataset_kwargs={"data_files": {split: str(data_dir / task.data_file)}},
                      training_split=None, fewshot_split=None,
                      validation_split=split if split == config.get("validation_split") else None)
    return config


def task_config(task: SuiteTask, data_dir: Path | None) -> dict:
    return stock_config(task, data_dir) if task.lm_eval_yaml else bigbench_config(task, data_dir)


def check_data_files(tasks: list[SuiteTask], data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise MoelabError(f"--data-dir {data_dir} is not a folder; it should hold bigbench/, agieval/, gpt4all/ "
                          "and truthfulqa/ subfolders")
    for task in tasks:
        if not (data_dir / task.data_file).is_file():
            raise MoelabError(f"task {task.name} needs {data_dir / task.data_file}, which is missing; add the file "
                              f"(the dataset's own JSONL schema) or leave {task.name} out of --tasks")
        check_jsonl_rows(data_dir / task.data_file, bigbench_row_problem if task.lm_eval_yaml is None else None)


def check_jsonl_rows(path: Path, row_problem=None) -> None:
    """Every line of a task's data file is a JSON object (and passes `row_problem`), and there is at least one,
    so that bad data is a one-line error before the model loads, not a traceback inside lm-eval."""
    from moelab.files import json_lines, read_user_text

    for number, row in json_lines(read_user_text(path, "task data file"), path, "task data"):
        problem = row_problem and row_problem(row)
        if problem:
            raise MoelabError(f"{path} line {number}: {problem}; fix the line or the file")


def bigbench_row_problem(row: dict) -> str | None:
    """What makes a hails/bigbench row unscorable, or None."""
    def strings(value) -> bool:
        return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)

    choices, scores = row.get("multiple_choice_targets"), row.get("multiple_choice_scores")
    if not isinstance(row.get("inputs"), str):
        return "'inputs' is not text"
    if not strings(row.get("targets")):
        return "'targets' is not a non-empty list of text"
    if not strings(choices):
        return "'multiple_choice_targets' is not a non-empty list of text"
    if row["targets"][0] not in choices:
        return f"the target {row['targets'][0]!r:.40} is not among the multiple_choice_targets"
    if not isinstance(scores, list) or len(scores) != len(choices) \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores):
        return "'multiple_choice_scores' is not one number per choice"
    return None


def resolve_data_dir(data_dir: Path | str | None) -> Path | None:
    """--data-dir as a folder: a path, or `pkg:PACKAGE/FOLDER` (e.g. pkg:moelab/data, the shipped subset)."""
    if data_dir is None:
        return None
    if str(data_dir).startswith("pkg:"):
        from moelab.build.sources import package_path

        return package_path(str(data_dir))
    return Path(data_dir).expanduser()


def is_shipped_data(data_dir: Path | None) -> bool:
    return data_dir is not None and data_dir.resolve() == resolve_data_dir(SHIPPED_DATA).resolve()


def built_model_name(folder: Path) -> str | None:
    """The name `moelab build` recorded in a model folder's moelab.json (the recipe's name), if any."""
    try:
        name = json.loads((folder / "moelab.json").read_text()).get("name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return name if isinstance(name, str) and name else None


def model_name_of(model: str) -> str:
    """A local model's name (moelab.json's, else its folder's), or the name part of a Hub repo id (org/name)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return built_model_name(path) or path.resolve().name
    if (path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
            or not NAME_PATTERN.fullmatch(model.split("/")[-1])):
        raise MoelabError(f"model '{model}' is neither a model folder nor a Hub repo id (org/name)")
    return model.split("/")[-1]


def default_report_path(model: str) -> Path:
    return Path("reports") / model_name_of(model) / "nous.json"


def model_identity(model: str) -> tuple[str, str | None, dict | None]:
    """(name, content hash, moelab recipe) of a local folder; (name, None, None) for a Hub repo id."""
    import yaml

    name, path = model_name_of(model), Path(model).expanduser()
    if not path.is_dir():
        return name, None, None
    if not (path / "config.json").is_file():
        raise MoelabError(f"model folder '{model}' has no config.json; point to a Hugging Face model folder (e.g. "
                          "the one moelab build wrote)")
    # Hash what identifies the weights without reading gigabytes: config, index, and each shard's size + header.
    digest = hashlib.sha256()
    for file in sorted(path.glob("*.json")) + sorted(path.glob("*.safetensors")):
        if file.suffix == ".json":
            digest.update(file.name.encode() + file.read_bytes())
        else:
            with file.open("rb") as f:
                header = f.read(8)
                digest.update(file.name.encode() + str(file.stat().st_size).encode()
                              + header + f.read(int.from_bytes(header, "little")))
    recipe_file = path / "moelab_recipe.yaml"
    recipe = None
    if recipe_file.is_file():
        from moelab.files import read_user_text

        try:
            recipe = yaml.safe_load(read_user_text(recipe_file, "recipe"))
        except (yaml.YAMLError, RecursionError):
            recipe = None
        if not isinstance(recipe, dict):
            raise MoelabError(f"{recipe_file} is damaged (not the recipe mapping `moelab build` writes); rebuild "
                              "the model or delete the file")
    return name, digest.hexdigest(), recipe


def resolve_settings(settings: EvalSettings) -> EvalSettings:
    """Fill "auto" device/dtype/batch size with what this machine will actually use (the report records these)."""
    from moelab.build.gates import resolve_device

    device = resolve_device(settings.device)
    # AutoEval runs float16 on GPU; CPU float16 matmuls are slow and lossy, so CPU uses float32.
    dtype = settings.dtype if settings.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise MoelabError(f"--dtype {dtype} is not one of auto, float16, bfloat16, float32")
    batch_size = settings.batch_size
    if batch_size == "auto" and device == "cpu":
        batch_size = str(CPU_AUTO_BATCH_SIZE)
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise MoelabError(f"--batch-size {batch_size} is not a positive integer or 'auto'")
    if settings.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None or not device.startswith("cuda"):
            raise MoelabError("--backend vllm needs the vllm package and a CUDA GPU; use --backend hf")
    elif settings.backend != "hf":
        raise MoelabError(f"--backend {settings.backend} is not hf or vllm")
    if settings.limit is not None and settings.limit <= 0:
        raise MoelabError(f"--limit {settings.limit} must be a positive number of examples per task")
    engine = settings.engine if settings.engine != "auto" else ("moelab" if settings.backend == "hf" else "lm-eval")
    if engine not in ("moelab", "lm-eval") or (engine == "moelab" and settings.backend != "hf"):
        raise MoelabError(f"--engine {settings.engine} is not moelab (hf backend only), lm-eval or auto")
    batch_tokens = None
    if engine == "moelab":
        from moelab.eval.scheduler import default_batch_tokens

        batch_tokens = settings.batch_tokens or default_batch_tokens(device)
        if batch_tokens <= 0:
            raise MoelabError(f"--batch-tokens {batch_tokens} must be a positive number of tokens per forward pass")
    return replace(settings, device=device, dtype=dtype, batch_size=batch_size, engine=engine,
                   batch_tokens=batch_tokens)


def resolve_parallel(model: str, settings: EvalSettings) -> tuple[EvalSettings, list[str]]:
    """Settings with the parallel strategy this machine will use, and the devices of its replicas or shards."""
    from moelab.eval.parallel import plan_for

    plan = plan_for(model, settings.dtype, settings.device, settings.parallel, settings.gpus)
    if plan.strategy == "replicas" and settings.engine != "moelab":
        raise MoelabError("--parallel replicas needs --engine moelab (lm-eval's engine runs replicas only under "
                          "accelerate launch)")
    on_gpus = plan.devices[0].startswith("cuda")
    return replace(settings, parallel=plan.strategy, gpus=len(plan.devices) if on_gpus else None), plan.devices


def load_language_model(model: str, settings: EvalSettings):
    from lm_eval.api.registry import get_model

    batch_size = int(settings.batch_size) if settings.batch_size.isdigit() else settings.batch_size
    arguments = dict(pretrained=model, dtype=settings.dtype, batch_size=batch_size, max_length=settings.max_length,
                     add_bos_token=False)  # the Nous harness encodes with add_special_tokens=False
    if settings.backend == "hf" and settings.parallel == "shard":
        arguments["parallelize"] = True  # device_map="auto" over the visible GPUs
    elif settings.backend == "hf":
        arguments["device"] = settings.device
    try:
        return get_model(settings.backend)(**arguments)
    except (OSError, ValueError, KeyError, ImportError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MoelabError(f"cannot load model '{model}' with lm-eval's {settings.backend} backend: {first_line}") \
            from None


def task_fingerprint(model: str, content_hash: str | None, settings: EvalSettings, task: SuiteTask,
                     data_dir: Path | None) -> str:
    """What a cached task result depends on; a cached result with another fingerprint is recomputed."""
    data_file = data_dir / task.data_file if data_dir else None
    key = {"model": model, "content_hash": content_hash, "task": task.name, "num_fewshot": task.num_fewshot,
           "domain": asdict(task) if isinstance(task, DomainTask) else None,
           "limit": settings.limit, "backend": settings.backend, "dtype": settings.dtype,
           "max_length": settings.max_length,
           "data": [str(data_file.resolve()), data_file.stat().st_size] if data_file else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def cache_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def read_cached(cache_dir: Path, task: SuiteTask, fingerprint: str) -> TaskResult | None:
    file = cache_dir / f"{task.name}.json"
    try:
        entry = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return TaskResult(**entry["result"]) if entry.get("fingerprint") == fingerprint else None


def task_result(task: SuiteTask, output: dict) -> TaskResult:
    """Our TaskResult from lm-eval's results dict for one task."""
    metrics = output["results"][task.name]
    value = float(metrics[f"{task.lm_eval_metric},none"])
    stderr_key = f"{NLL_STDERR_METRIC},none" if task.metric == "nll" else f"{task.lm_eval_metric}_stderr,none"
    stderr = metrics.get(stderr_key)
    if value != value:  # AutoEval scores a NaN (e.g. TruthfulQA mc2) as 0
        value = 0.0
    return TaskResult(task=task.name, group=task.group, metric=task.metric, value=value,
                      stderr=float(stderr) if isinstance(stderr, (int, float)) and stderr == stderr else None,
                      n=int(output["n-samples"][task.name]["effective"]),
                      version=str(output["versions"][task.name]), num_fewshot=int(output["n-shot"][task.name]))


def seed_as_simple_evaluate() -> None:
    import random

    import numpy
    import torch

    random.seed(0)
    numpy.random.seed(1234)
    torch.manual_seed(1234)


def data_error_types() -> tuple[type[BaseException], ...]:
    """What lm-eval raises when a --data-dir file does not read as its dataset's schema."""
    import jinja2
    from datasets.exceptions import DatasetGenerationError

    return DatasetGenerationError, jinja2.UndefinedError, KeyError


def evaluate_task(lm, task: SuiteTask, settings: EvalSettings, data_dir: Path | None, task_manager) -> TaskResult:
    """One task through lm_eval.evaluator.evaluate, seeded as simple_evaluate seeds it.

    Not simple_evaluate itself: on every call it also collects torch's environment report (pip list, lscpu...),
    1-2 s per task, and we call once per task so that each finished task is cached.
    """
    from lm_eval.evaluator import evaluate

    seed_as_simple_evaluate()
    try:
        loaded = task_manager.load([domain_task_config(task, lm.tokenizer) if isinstance(task, DomainTask)
                                    else task_config(task, data_dir)])
        for lm_eval_task in loaded["tasks"].values():
            lm_eval_task.set_fewshot_seed(seed=1234)
        # A domain's own limit (eval_data) was applied to its docs already, and takes precedence over --limit.
        limit = None if isinstance(task, DomainTask) and task.items else settings.limit
        return task_result(task, evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False))
    except ConnectionError as err:  # datasets' own wording of "offline": the builtin, not requests'
        if data_dir is not None:
            raise
        shipped = resolve_data_dir(SHIPPED_DATA)
        raise MoelabError(f"task {task.name}: cannot download its data from the Hub ({err}); offline, point "
                          f"--data-dir at local task files (bigbench/<task>.jsonl, agieval/, gpt4all/, truthfulqa/), "
                          f"e.g. the BIG-bench subset shipped with moelab: --data-dir {shipped}") from None
    except data_error_types() as err:
        if data_dir is None:
            raise
        cause = err.__cause__ or err
        raise MoelabError(f"task {task.name}: {data_dir / task.data_file} does not read as its dataset's schema "
                          f"({type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}); "
                          "fix the file and re-run, finished tasks are kept") from None


def check_writable(output: Path) -> None:
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise MoelabError(f"cannot write the report at {output} ({err.strerror}); choose another --output") from None
    if output.is_dir():
        raise MoelabError(f"--output {output} is a folder; give a file path such as {output / 'nous.json'}")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name, dist in (("moelab", "moelab"), ("lm_eval", "lm_eval"), ("torch", "torch"),
                       ("transformers", "transformers")):
        try:
            versions[name] = version(dist)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_eval(model: str, settings: EvalSettings, data_dir: Path | None, output: Path) -> EvalReport:
    """Evaluate MODEL on settings.tasks, reusing finished tasks cached beside OUTPUT, and save the EvalReport there.

    Finished tasks are written to `<output>.partial/<task>.json` as they complete, so a run stopped by an error or
    Ctrl-C continues where it stopped; the folder is removed once the report is written.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from moelab.eval.suite import select_tasks

    started = time.perf_counter()
    model_name, content_hash, recipe = model_identity(model)
    nous_words, domain_tasks = split_selection(
        settings.tasks, Path(model).expanduser() if Path(model).expanduser().is_dir() else None, recipe)
    tasks = (select_tasks(",".join(nous_words)) if nous_words or not domain_tasks else []) + domain_tasks
    output = Path(output)
    data_dir = resolve_data_dir(data_dir)
    if data_dir is not None:
        check_data_files([t for t in tasks if isinstance(t, SuiteTask)], data_dir)
    check_writable(output)
    if is_shipped_data(data_dir) and settings.limit is None:  # a subset: its scores are marked limited
        settings = replace(settings, limit=SHIPPED_ROWS_PER_TASK)
    settings = resolve_settings(replace(settings, tasks=[t.name for t in tasks],
                                        num_fewshot={t.name: t.num_fewshot for t in tasks}))
    settings, devices = resolve_parallel(model, settings)
    replica_devices = devices if settings.parallel == "replicas" else []

    cache_dir = cache_dir_for(output)
    fingerprints = {t.name: task_fingerprint(model, content_hash, settings, t, data_dir) for t in tasks}
    results = {t.name: r for t in tasks if (r := read_cached(cache_dir, t, fingerprints[t.name]))}
    pending = [t for t in tasks if t.name not in results]
    revision, stages_s, stats = None, {}, None
    # The bar's console keeps this stderr: quiet_lm_eval points sys.stderr (lm-eval's own bars) elsewhere.
    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
                  TimeElapsedColumn(), console=Console(file=sys.stderr)) as bar, quiet_lm_eval():
        overall = bar.add_task("cached", total=len(tasks), completed=len(results), unit="tasks")

        def finish(task, result: TaskResult) -> None:
            results[task.name] = result
            write_text_atomic(cache_dir / f"{task.name}.json", json.dumps(
                {"fingerprint": fingerprints[task.name], "result": asdict(result)}))
            bar.advance(overall)

        if pending:
            from lm_eval.tasks import TaskManager

            bar.update(overall, description=f"loading {model_name}")
            loading = time.perf_counter()
            lm = load_language_model(model, settings)
            stages_s["load_model"] = round(time.perf_counter() - loading, 2)
            task_manager = TaskManager(include_defaults=False)  # our configs are inline dicts
            revision = getattr(getattr(getattr(lm, "model", None), "config", None), "_commit_hash", None)
        evaluating = time.perf_counter()
        if pending and settings.engine == "moelab":
            from moelab.eval.scheduler import ScheduleOptions, run_scheduled

            bar.update(overall, description=f"{len(pending)} tasks in one pass")
            requests = bar.add_task("requests", total=None, unit="requests")
            stats = run_scheduled(lm, pending, settings, data_dir, task_manager, cache_dir / "requests.jsonl",
                                  fingerprints, finish,
                                  on_progress=lambda done, total: bar.update(requests, completed=done, total=total),
                                  options=ScheduleOptions(settings.batch_tokens, replica=(model, settings.dtype),
                                                          replica_devices=tuple(replica_devices)))
        else:
            for task in pending:
                bar.update(overall, description=task.name)
                finish(task, evaluate_task(lm, task, settings, data_dir, task_manager))
        if pending:
            stages_s["evaluate"] = round(time.perf_counter() - evaluating, 2)
        bar.update(overall, description="done")

    ordered = [results[t.name] for t in tasks]
    groups = group_scores(ordered)
    report = EvalReport(
        model=model, model_name=model_name, settings=settings, results=ordered,
        revision=revision if content_hash is None else None, content_hash=content_hash, recipe=recipe,
        groups=groups, average=overall_average(groups), limited=settings.limit is not None, versions=package_versions(),
        wall_time_s=round(time.perf_counter() - started, 2), speed=speed_of_run(stages_s, stats),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report.save(output)
    if cache_dir.is_dir():
        shutil.rmtree(cache_dir)
    return report


def speed_of_run(stages_s: dict[str, float], stats) -> dict:
    """The report's speed section: wall time per stage and, for the moelab engine, what the scheduled pass did."""
    if stats is None:
        return {"stages_s": stages_s}
    scored = stats.requests - stats.cached
    return {"stages_s": {**stages_s, "tokenize": round(stats.tokenize_s, 2), "score": round(stats.score_s, 2)},
            "requests": stats.requests, "cached": stats.cached,
            "requests_per_s": round(scored / stats.score_s, 1) if stats.score_s else None,
            "rows": stats.rows, "batches": stats.batches, "tokens": stats.tokens, "padded_tokens": stats.padded_tokens}


class quiet_lm_eval:
    """Silence datasets' and transformers' progress bars, lm-eval's INFO logs and its per-request tqdm bars (which
    it shows whatever TQDM_DISABLE says) while our per-task bar runs: sys.stderr goes to /dev/null meanwhile."""

    def __enter__(self):
        import logging

        import datasets
        import transformers

        self.stderr = sys.stderr
        sys.stderr = open(os.devnull, "w")

        self.bars_were_on = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
        self.loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets", "transformers")]
        self.levels = [logger.level for logger in self.loggers]
        for logger in self.loggers:
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        import warnings

        import datasets
        import transformers

        if self.bars_were_on:
            with warnings.catch_warnings():  # huggingface_hub warns when HF_HUB_DISABLE_PROGRESS_BARS overrides us
                warnings.simplefilter("ignore")
                datasets.enable_progress_bars()
                transformers.utils.logging.enable_progress_bar()
        for logger, level in zip(self.loggers, self.levels):
            logger.setLevel(level)
        sys.stderr.close()
        sys.stderr = self.stderr
        return False
