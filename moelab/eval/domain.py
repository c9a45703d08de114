"""Domain tasks: an expert's own held-out data, scored by exact-match generation or text NLL, as lm-eval custom tasks.

A domain is declared per expert in the recipe (`eval_data:`) or in a tasks file (`moelab eval --tasks FILE.yaml`,
a mapping of domain name -> the same fields):

    path: pkg:moelab/data/heldout/arith.jsonl   # JSONL; pkg:PACKAGE/FILE, absolute, or relative to the YAML's folder
    kind: exact_match                           # or nll
    limit: 40                                   # first N items (default: all)
    # exact_match: greedy generation from the question with the model's chat template applied; the item scores 1
    # when the last match of answer_pattern (its first group, commas dropped) equals the answer field.
    question_field: question
    answer_field: answer
    answer_pattern: 'answer is\\s*\\$?(-?[\\d,]*\\d)'
    max_new_tokens: 64
    # nll: mean negative log-likelihood per token over the first `tokens` tokens of text_field (each token predicted
    # from the ones before it; the first token is the context). Lower is better. With prompt_field, the text is
    # scored as the assistant's answer to that field (chat template), e.g. a worked solution given its question.
    text_field: text
    tokens: 256
    prompt_field: null

Each domain becomes one task, `domain_<name>`, in group `domain:<name>` of the EvalReport.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moelab.errors import MoelabError
from moelab.files import json_lines, read_user_text

DEFAULT_ANSWER_PATTERN = r"answer is\s*\$?(-?[\d,]*\d)"
GROUP_PREFIX = "domain:"
TASKS_FROM_RECIPE = "domains"


class DomainSpec(BaseModel):
    """The `eval_data` fields (see the module docstring)."""
    model_config = ConfigDict(extra="forbid")

    path: str
    kind: Literal["exact_match", "nll"]
    limit: Optional[int] = Field(None, ge=1)
    question_field: str = "question"
    answer_field: str = "answer"
    answer_pattern: str = DEFAULT_ANSWER_PATTERN
    max_new_tokens: int = Field(64, ge=1)
    text_field: str = "text"
    tokens: int = Field(256, ge=2)
    prompt_field: Optional[str] = None


@dataclass(frozen=True)
class DomainTask:
    """One domain's held-out data and how it is scored; the eval runner treats it like a SuiteTask."""

    domain: str
    kind: str
    data_file: str  # absolute
    data_sha256: str
    items: int | None
    question_field: str
    answer_field: str
    answer_pattern: str
    max_new_tokens: int
    text_field: str
    tokens: int
    prompt_field: str | None = None
    num_fewshot: int = 0

    @property
    def name(self) -> str:
        return f"domain_{self.domain}"

    @property
    def group(self) -> str:
        return GROUP_PREFIX + self.domain

    @property
    def metric(self) -> str:  # the kind names the metric
        return self.kind

    lm_eval_metric = metric


def lower_is_better(metric: str) -> bool:
    return metric == "nll"


def domain_task(domain: str, spec: dict, base_dir: Path | None, source: str) -> DomainTask:
    """Validate one `eval_data` mapping and read its data file (every line checked, errors name the line)."""
    from moelab.build.sources import resolve_data_path

    try:
        checked = DomainSpec.model_validate(spec)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise MoelabError(f"{source}: eval_data of '{domain}': field '{field}': {first['msg']} "
                          "(fields: path, kind exact_match|nll, limit, question_field, answer_field, answer_pattern, "
                          "max_new_tokens, text_field, tokens)") from None
    try:
        re.compile(checked.answer_pattern)
    except re.error as err:
        raise MoelabError(f"{source}: eval_data of '{domain}': answer_pattern is not a regular expression ({err})") \
            from None
    path = resolve_data_path(checked.path, base_dir).resolve()
    needed = ([checked.question_field, checked.answer_field] if checked.kind == "exact_match"
              else [checked.text_field] + ([checked.prompt_field] if checked.prompt_field else []))
    raw = _read_jsonl(path, needed, f"eval_data of '{domain}'")
    return DomainTask(domain, checked.kind, str(path), hashlib.sha256(raw).hexdigest(), checked.limit,
                      checked.question_field, checked.answer_field, checked.answer_pattern, checked.max_new_tokens,
                      checked.text_field, checked.tokens, checked.prompt_field)


def _read_jsonl(path: Path, fields: list[str], what: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise MoelabError(f"cannot read {what} {path}: {err.strerror}; check the path") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MoelabError(f"{path} is not UTF-8 text (byte {err.start}); {what} needs UTF-8 JSON lines") from None
    for number, row in json_lines(text, path, what):
        missing = [f for f in fields if f not in row]
        if missing:
            raise MoelabError(f"{path} line {number} has no field {', '.join(missing)}, which {what} reads; "
                              "add it or set the field names in eval_data")
        empty = [f for f in fields if isinstance(row[f], bool) or not isinstance(row[f], (str, int, float))
                 or str(row[f]).strip() == ""]
        if empty:
            raise MoelabError(f"{path} line {number}: field {empty[0]} is {json.dumps(row[empty[0]])[:40]}, not "
                              f"text or a number; {what} needs a value on every line")
    return raw


def domains_of_recipe(recipe: dict | None, base_dir: Path | None, source: str) -> list[DomainTask]:
    """The domain task of every expert with `eval_data` in a recipe (as a dict, e.g. a model's moelab_recipe.yaml)."""
    experts = (recipe or {}).get("experts") or []
    tasks = [domain_task(e.get("name") or f"E{i}", e["eval_data"], base_dir, source)
             for i, e in enumerate(experts) if isinstance(e, dict) and e.get("eval_data")]
    if not tasks:
        raise MoelabError(f"--tasks {TASKS_FROM_RECIPE}: {source} names no expert eval_data; add eval_data to the "
                          "recipe's experts, or pass a tasks file: --tasks domains.yaml")
    return tasks


def domains_of_file(path: Path) -> list[DomainTask]:
    """The domains of a tasks file: a YAML mapping of domain name -> eval_data fields."""
    import yaml

    try:
        data = yaml.safe_load(read_user_text(path, "tasks file"))
    except (yaml.YAMLError, RecursionError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise MoelabError(f"{path}: malformed YAML ({first_line}); fix the YAML syntax") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise MoelabError(f"{path}: a tasks file maps each domain name to its fields, e.g. "
                          "'math: {path: arith.jsonl, kind: exact_match}'")
    return [domain_task(str(name), spec, path.parent, str(path)) for name, spec in data.items()]


def split_selection(words: list[str], model_dir: Path | None, recipe: dict | None
                    ) -> tuple[list[str], list[DomainTask]]:
    """Separate --tasks words into Nous words and domain tasks (a `.yaml` tasks file, or `domains` for the
    eval_data of the model's own recipe)."""
    nous, domains = [], []
    for word in (w.strip() for w in words if w.strip()):
        if word.lower().endswith((".yaml", ".yml")):
            domains += domains_of_file(Path(word).expanduser())
        elif word.lower() == TASKS_FROM_RECIPE:
            domains += domains_of_recipe(recipe, model_dir, f"{model_dir or 'the model'}/moelab_recipe.yaml")
        else:
            nous.append(word)
    names = [t.name for t in domains]
    if len(set(names)) != len(names):
        raise MoelabError(f"two domains share a name ({', '.join(names)}); give each a distinct name")
    return nous, domains


def tasks_file_text(tasks: list[DomainTask]) -> str:
    """A tasks file (YAML) that gives these domain tasks again, e.g. to evaluate a MoE's experts as the MoE was."""
    import yaml

    return yaml.safe_dump({t.domain: {"path": t.data_file, "kind": t.kind, "limit": t.items,
                                      "question_field": t.question_field, "answer_field": t.answer_field,
                                      "answer_pattern": t.answer_pattern, "max_new_tokens": t.max_new_tokens,
                                      "text_field": t.text_field, "tokens": t.tokens,
                                      "prompt_field": t.prompt_field} for t in tasks},
                          sort_keys=False)


# ---------------------------------------------------------------- lm-eval task configs


def domain_task_config(task: DomainTask, tokenizer) -> dict:
    """An lm-eval task config for one domain; the docs are prepared with the model's tokenizer."""
    source = {"task": task.name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {"test": task.data_file}}, "test_split": "test",
              "num_fewshot": 0, "metadata": {"version": 1.0}}
    if task.kind == "exact_match":
        return {**source, "output_type": "generate_until",
                "process_docs": partial(exact_match_docs, task=task, tokenizer=tokenizer),
                "doc_to_text": "prompt", "doc_to_target": "answer",
                "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": task.max_new_tokens},
                "process_results": partial(score_exact_match, pattern=task.answer_pattern),
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    return {**source, "output_type": "loglikelihood", "target_delimiter": "",
            "process_docs": partial(nll_docs, task=task, tokenizer=tokenizer),
            "doc_to_text": "context", "doc_to_target": "continuation",
            "process_results": nll_of_doc,
            "metric_list": [{"metric": "nll", "aggregation": mean_token_nll, "higher_is_better": False}]}


def _first_items(dataset, task: DomainTask) -> list[dict]:
    rows = list(dataset)
    return rows[:task.items] if task.items else rows


def chat_prompt(question: str, tokenizer) -> str:
    """The question as a user turn of the model's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        return question + "\n"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def exact_match_docs(dataset, task: DomainTask, tokenizer):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": chat_prompt(str(row[task.question_field]), tokenizer),
                               "answer": normalize_answer(str(row[task.answer_field]))}
                              for row in _first_items(dataset, task)])


def normalize_answer(text: str) -> str:
    return text.strip().replace(",", "").rstrip(".")


def extract_answer(generation: str, pattern: str) -> str | None:
    """The last match of `pattern` in the generation (its first group when it has one), normalized."""
    matches = list(re.finditer(pattern, generation))
    if not matches:
        return None
    last = matches[-1]
    return normalize_answer(last.group(1) if last.re.groups else last.group(0))


def score_exact_match(doc: dict, results: list[str], pattern: str) -> dict[str, float]:
    return {"exact_match": float(extract_answer(results[0], pattern) == doc["answer"])}


def nll_split(text: str, tokens: int, tokenizer, prompt: str | None = None) -> tuple[str, str, int]:
    """(context, continuation, tokens scored) for the first `tokens` tokens of `text`, after `prompt` if given.

    Without a prompt the context is the first token(s), extended until it ends on a non-space character. lm-eval
    moves a context's trailing whitespace into the continuation, and so does the count here. A cut that does not
    re-encode to itself drops its last tokens, so lm-eval scores exactly the tokens counted here.
    """
    def encode(piece: str) -> list[int]:
        return tokenizer(piece, add_special_tokens=False)["input_ids"]

    ids = encode(text)[:tokens]
    while len(ids) > 2 and encode(tokenizer.decode(ids)) != ids:  # a cut inside a run of spaces re-encodes merged
        ids = ids[:-1]
    if prompt is not None:
        context, continuation = prompt, tokenizer.decode(ids)
    else:
        head = 1
        while head < len(ids) - 1 and (not tokenizer.decode(ids[:head]).strip()
                                       or tokenizer.decode(ids[:head])[-1].isspace()):
            head += 1
        context = tokenizer.decode(ids[:head])
        continuation = tokenizer.decode(ids)[len(context):]
    scored = len(encode(context + continuation)) - len(encode(context.rstrip()))
    return context, continuation, scored


def nll_docs(dataset, task: DomainTask, tokenizer):
    from datasets import Dataset

    docs = []
    for row in _first_items(dataset, task):
        prompt = chat_prompt(str(row[task.prompt_field]), tokenizer) if task.prompt_field else None
        context, continuation, scored = nll_split(str(row[task.text_field]), task.tokens, tokenizer, prompt)
        if scored > 0:
            docs.append({"context": context, "continuation": continuation, "scored_tokens": scored})
    return Dataset.from_list(docs)


def nll_of_doc(doc: dict, results: list) -> dict[str, tuple[float, int]]:
    loglikelihood, _ = results[0]
    return {"nll": (loglikelihood, doc["scored_tokens"])}


def mean_token_nll(items: list[tuple[float, int]]) -> float:
    """Mean NLL per token over all scored tokens (longer texts weigh more, as in a language-model loss)."""
    return -sum(ll for ll, _ in items) / sum(n for _, n in items)
