"""The Nous benchmark suite as one table: task, group, the lm-eval 0.4 task it runs, data file, metric."""

from __future__ import annotations

from dataclasses import dataclass

# Sources (read to derive this table; nothing copied):
# - mlabonne/llm-autoeval `runpod.sh` (BENCHMARK == "nous": four `main.py` runs, no --num_fewshot, so all 0-shot)
#   and `llm_autoeval/table.py` (acc_norm else acc for AGIEval/GPT4All, mc2 for TruthfulQA, multiple_choice_grade
#   for Bigbench; unweighted mean x100 per group, round 2; overall = mean of the four rounded group scores).
# - dmahan93/lm-evaluation-harness branch add-agieval (lm-eval 0.3.0 fork the suite runs on): task names and
#   datasets of agieval.py, bigbench.py (18 tasks; logical_deduction and tracking_shuffled_objects split by
#   number of objects), truthfulqa.py (fixed 6-pair preamble, 0-shot).
# - EleutherAI/lm-evaluation-harness 0.4.13 (installed): lm_eval/tasks/agieval/*.yaml (acc_norm by character
#   length), tasks/hellaswag, openbookqa, winogrande, arc, super_glue/boolq, piqa, truthfulqa/truthfulqa_mc2.yaml,
#   tasks/bigbench/multiple_choice (hails/bigbench schema, which ../shared/data/bigbench follows).
# See ../shared/notes/autoeval.md for the full comparison.

GROUPS = ("AGIEval", "GPT4All", "TruthfulQA", "Bigbench")


@dataclass(frozen=True)
class SuiteTask:
    """One scored task. `lm_eval_task` is the stock lm-eval 0.4 task it runs; None for our own bigbench tasks."""

    name: str  # the Nous (lm-eval 0.3) name, as AutoEval gists show it
    group: str
    lm_eval_task: str | None
    lm_eval_yaml: str | None  # that task's YAML, relative to lm_eval/tasks (saves indexing all 10k YAMLs)
    metric: str  # the name the report and gist show
    lm_eval_metric: str  # the key lm-eval's results carry for it
    data_file: str  # relative to --data-dir, in the dataset's own schema
    num_fewshot: int = 0


def _agieval(name: str, hub_name: str) -> SuiteTask:
    return SuiteTask(f"agieval_{name}", "AGIEval", f"agieval_{name}", f"agieval/{hub_name}.yaml", "acc_norm",
                     "acc_norm", f"agieval/{hub_name}.jsonl")


def _gpt4all(name: str, yaml_file: str, metric: str) -> SuiteTask:
    return SuiteTask(name, "GPT4All", name, yaml_file, metric, metric, f"gpt4all/{name}.jsonl")


def _bigbench(nous_name: str, file_stem: str) -> SuiteTask:
    return SuiteTask(f"bigbench_{nous_name}", "Bigbench", None, None, "multiple_choice_grade", "multiple_choice_grade",
                     f"bigbench/{file_stem}.jsonl")


def _bigbench_same(name: str) -> SuiteTask:
    return _bigbench(name, name)


NOUS_TASKS: tuple[SuiteTask, ...] = (
    _agieval("aqua_rat", "aqua-rat"),
    _agieval("logiqa_en", "logiqa-en"),
    _agieval("lsat_ar", "lsat-ar"),
    _agieval("lsat_lr", "lsat-lr"),
    _agieval("lsat_rc", "lsat-rc"),
    _agieval("sat_en", "sat-en"),
    _agieval("sat_en_without_passage", "sat-en-without-passage"),
    _agieval("sat_math", "sat-math"),
    _gpt4all("arc_challenge", "arc/arc_challenge.yaml", "acc_norm"),
    _gpt4all("arc_easy", "arc/arc_easy.yaml", "acc_norm"),
    _gpt4all("boolq", "super_glue/boolq/default.yaml", "acc"),
    _gpt4all("hellaswag", "hellaswag/hellaswag.yaml", "acc_norm"),
    _gpt4all("openbookqa", "openbookqa/openbookqa.yaml", "acc_norm"),
    _gpt4all("piqa", "piqa/piqa.yaml", "acc_norm"),
    _gpt4all("winogrande", "winogrande/default.yaml", "acc"),
    # lm-eval 0.4 names mc2 "acc" inside truthfulqa_mc2; the 6-pair preamble is in its doc_to_text.
    SuiteTask("truthfulqa_mc", "TruthfulQA", "truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", "mc2", "acc",
              "truthfulqa/truthfulqa_mc.jsonl"),
    _bigbench("causal_judgement", "causal_judgment"),  # Nous spells it "judgement", BIG-bench "judgment"
    _bigbench_same("date_understanding"),
    _bigbench_same("disambiguation_qa"),
    _bigbench_same("geometric_shapes"),
    _bigbench_same("logical_deduction_five_objects"),
    _bigbench_same("logical_deduction_seven_objects"),
    _bigbench_same("logical_deduction_three_objects"),
    _bigbench_same("movie_recommendation"),
    _bigbench_same("navigate"),
    _bigbench_same("reasoning_about_colored_objects"),
    _bigbench_same("ruin_names"),
    _bigbench_same("salient_translation_error_detection"),
    _bigbench_same("snarks"),
    _bigbench_same("sports_understanding"),
    _bigbench_same("temporal_sequences"),
    _bigbench_same("tracking_shuffled_objects_five_objects"),
    _bigbench_same("tracking_shuffled_objects_seven_objects"),
    _bigbench_same("tracking_shuffled_objects_three_objects"),
)


def short_task_name(task: str) -> str:
    """A task's name without its group prefix (navigate for bigbench_navigate), for tables listed by group."""
    prefixes = [f"{group.lower()}_" for group in GROUPS] + ["domain_"]
    return next((task[len(p):] for p in prefixes if task.startswith(p)), task)


def tasks_of_group(group: str) -> list[SuiteTask]:
    return [t for t in NOUS_TASKS if t.group == group]


def select_tasks(selection: str | None) -> list[SuiteTask]:
    """Tasks named by a comma list of groups and/or tasks (case-insensitive), in suite order; all when None."""
    from moelab.errors import MoelabError

    if not selection or selection.strip().lower() in ("all", "nous"):
        return list(NOUS_TASKS)
    wanted: set[str] = set()
    for word in (w.strip().lower() for w in selection.split(",") if w.strip()):
        group = next((g for g in GROUPS if g.lower() == word), None)
        if group:
            wanted.update(t.name for t in tasks_of_group(group))
        elif any(t.name == word for t in NOUS_TASKS):
            wanted.add(word)
        else:
            raise MoelabError(f"unknown task or group '{word}'; choose from the groups {', '.join(GROUPS)} "
                              f"or a task such as bigbench_navigate (see `moelab eval --help`)")
    if not wanted:
        raise MoelabError("--tasks is empty; name groups or tasks, e.g. --tasks Bigbench,truthfulqa_mc")
    return [t for t in NOUS_TASKS if t.name in wanted]
