"""Domain tasks (exact-match generation, text NLL) through lm-eval, checked against plain transformers."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelab.errors import MoelabError
from moelab.eval import run_eval
from moelab.eval.domain import chat_prompt, extract_answer, split_selection
from moelab.eval.report import EvalReport, EvalSettings

LAST_WORD = r"(\S+)\s*$"
QUESTIONS = ["What is 2 and 2?", "Name a colour.", "Say hello.", "Count to three.", "Is water wet?", "Pick a number."]
TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "class Point:\n    x: int = 0\n    y: int = 0\n"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy_outputs(model_dir: Path, questions: list[str], max_new_tokens: int) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    outputs = []
    for question in questions:
        ids = tokenizer(chat_prompt(question, tokenizer), add_special_tokens=False, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def plain_nlls(model_dir: Path, texts: list[str], tokens: int) -> list[tuple[float, int]]:
    """(summed NLL, tokens scored) of tokens 2..N of each text (the first token is the context)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    items = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]])
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        items.append((loss * (ids.shape[1] - 1), ids.shape[1] - 1))
    return items


def plain_mean_nll(model_dir: Path, texts: list[str], tokens: int) -> float:
    """Token-weighted mean NLL of tokens 2..N of each text."""
    items = plain_nlls(model_dir, texts, tokens)
    return sum(total for total, _ in items) / sum(count for _, count in items)


def test_exact_match_and_nll_match_plain_transformers(tiny_dense, tmp_path):
    model = tiny_dense("dense", seed=3)
    generations = greedy_outputs(model, QUESTIONS, max_new_tokens=8)
    last_words = [extract_answer(g, LAST_WORD) for g in generations]
    assert sum(w is not None for w in last_words) >= 4, generations
    # Items alternate between the model's real last word (right) and a word it never says (wrong).
    answers = [w if i % 2 == 0 and w else "NEVER-SAID" for i, w in enumerate(last_words)]
    expected_exact = sum(a != "NEVER-SAID" for a in answers) / len(answers)
    write_jsonl(tmp_path / "qa.jsonl", [{"q": q, "a": a} for q, a in zip(QUESTIONS, answers)])
    write_jsonl(tmp_path / "code.jsonl", [{"text": t} for t in TEXTS])
    tasks_file = tmp_path / "domains.yaml"
    tasks_file.write_text(yaml.safe_dump({
        "qa": {"path": "qa.jsonl", "kind": "exact_match", "question_field": "q", "answer_field": "a",
               "answer_pattern": LAST_WORD, "max_new_tokens": 8},
        "code": {"path": "code.jsonl", "kind": "nll", "tokens": 10}}))

    report = run_eval(str(model), EvalSettings(tasks=[str(tasks_file)], device="cpu", batch_size="1"), None,
                      tmp_path / "report.json")

    results = {r.task: r for r in report.results}
    assert results["domain_qa"].group == "domain:qa" and results["domain_qa"].n == len(QUESTIONS)
    assert results["domain_qa"].value == pytest.approx(expected_exact)
    assert results["domain_code"].metric == "nll" and results["domain_code"].n == len(TEXTS)
    assert results["domain_code"].value == pytest.approx(plain_mean_nll(model, TEXTS, 10), rel=1e-4)
    # Its standard error: the ratio estimator's, sqrt(sum_i (nll_i - mean * tokens_i)^2 / (n (n-1))) / mean tokens.
    items = plain_nlls(model, TEXTS, 10)
    mean = sum(t for t, _ in items) / sum(c for _, c in items)
    spread = sum((t - mean * c) ** 2 for t, c in items) / (len(items) * (len(items) - 1))
    assert results["domain_code"].stderr == pytest.approx(spread ** 0.5 / (sum(c for _, c in items) / len(items)),
                                                          rel=1e-3)
    assert results["domain_qa"].stderr > 0
    assert EvalReport.load(tmp_path / "report.json").results == report.results


def test_nll_of_an_answer_given_its_prompt(tiny_dense, tmp_path):
    model = tiny_dense("dense", seed=4)
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "What is 2 and 2?", "solution": "2 + 2 = 4. The answer is 4."}])
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"qa": {"path": "qa.jsonl", "kind": "nll", "text_field": "solution",
                                                            "prompt_field": "q"}}))
    report = run_eval(str(model), EvalSettings(tasks=[str(tmp_path / "t.yaml")], device="cpu"), None,
                      tmp_path / "r.json")

    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 and 2?"}], tokenize=False,
                                           add_generation_prompt=True)
    context = tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([tokenizer(prompt + "2 + 2 = 4. The answer is 4.", add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[0, :len(context)] = -100  # only the answer is scored
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(ids, labels=labels).loss.item()
    assert report.results[0].value == pytest.approx(expected, rel=1e-4)


def test_limit_and_recipe_domains(tiny_dense, tmp_path):
    model = tiny_dense("dense")
    write_jsonl(tmp_path / "code.jsonl", [{"text": t} for t in TEXTS])
    recipe = {"experts": [{"name": "chat", "source_model": "x"},
                          {"name": "code", "source_model": "y",
                           "eval_data": {"path": str(tmp_path / "code.jsonl"), "kind": "nll", "limit": 2,
                                         "tokens": 10}}]}
    (model / "moelab_recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = run_eval(str(model), EvalSettings(tasks=["domains"], device="cpu"), None, tmp_path / "r.json")
    assert [(r.task, r.n) for r in report.results] == [("domain_code", 2)]
    assert report.results[0].value == pytest.approx(plain_mean_nll(model, TEXTS[:2], 10), rel=1e-4)
    # The domain's own limit wins over --limit (a quick run of Nous tasks keeps the domain's items).
    limited = run_eval(str(model), EvalSettings(tasks=["domains"], device="cpu", limit=1), None, tmp_path / "l.json")
    assert [(r.task, r.n) for r in limited.results] == [("domain_code", 2)]


@pytest.mark.parametrize("spec, message", [
    ({"path": "missing.jsonl", "kind": "nll"}, "data file 'missing.jsonl' not found"),
    ({"path": "bad.jsonl", "kind": "nll"}, "line 2 is not JSON"),
    ({"path": "ok.jsonl", "kind": "exact_match"}, "has no field question, answer"),
    ({"path": "ok.jsonl", "kind": "bleu"}, "field 'kind'"),
    ({"path": "ok.jsonl", "kind": "nll", "answer_pattern": "("}, "answer_pattern is not a regular expression"),
])
def test_bad_domain_specs_are_one_line_errors(tmp_path, spec, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    write_jsonl(tmp_path / "ok.jsonl", [{"text": "a"}])
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"d": spec}))
    with pytest.raises(MoelabError, match=message):
        split_selection([str(tmp_path / "t.yaml")], None, None)


def test_domains_word_needs_eval_data():
    with pytest.raises(MoelabError, match="names no expert eval_data"):
        split_selection(["Bigbench", "domains"], None, {"experts": [{"source_model": "x"}]})
    assert split_selection(["Bigbench", "truthfulqa_mc"], None, None) == (["Bigbench", "truthfulqa_mc"], [])


def test_answer_extraction_takes_the_last_answer():
    text = "12 x 3 = 36. The answer is 30. Sorry, the answer is 1,036."
    assert extract_answer(text, r"answer is\s*\$?(-?[\d,]*\d)") == "1036"
    assert extract_answer("no number here", r"answer is\s*(\d+)") is None
