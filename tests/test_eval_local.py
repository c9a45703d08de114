"""`moelab eval` on a tiny model, offline: the whole Nous suite from local files, values checked against our own
log-likelihood scoring with plain transformers, bad input, and resume after an interrupted run."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SHIPPED_DATA_DIR, make_tiny_dense
from moelab.eval import EvalReport, EvalSettings, run_eval
from moelab.eval.report import group_scores, overall_average
from moelab.eval.suite import GROUPS, NOUS_TASKS

BIGBENCH_DIR = SHIPPED_DATA_DIR / "bigbench"  # the 18 tasks' first rows, shipped with moelab
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nous"
LIMIT = 2


def moelab_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", "eval", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def data_dir_with(tmp_path: Path, **folders: Path) -> Path:
    """A --data-dir laid out as moelab expects, made of links to the real folders (nothing is copied)."""
    data = tmp_path / "data"
    data.mkdir()
    for name, target in folders.items():
        (data / name).symlink_to(target)
    return data


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_dense(tmp_path_factory.mktemp("eval") / "tiny-llama")


@pytest.fixture(scope="module")
def nous_data(tmp_path_factory) -> Path:
    return data_dir_with(tmp_path_factory.mktemp("nous"), bigbench=BIGBENCH_DIR, agieval=FIXTURES / "agieval",
                         gpt4all=FIXTURES / "gpt4all", truthfulqa=FIXTURES / "truthfulqa")


@pytest.fixture(scope="module")
def full_run(tiny_model, nous_data, tmp_path_factory):
    """The whole suite through the command line, LIMIT examples per task."""
    output = tmp_path_factory.mktemp("reports") / "tiny" / "nous.json"
    done = moelab_eval(tiny_model, "--limit", LIMIT, "--data-dir", nous_data, "--output", output, "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    return done, EvalReport.load(output), output


class IndependentScorer:
    """Log-likelihood of a continuation after a context, written from scratch with plain transformers.

    Same conventions as the Nous harness: no BOS token, the answer follows the prompt after one space, and a
    too-long input keeps its last max_length tokens.
    """

    def __init__(self, model_dir: Path):
        import torch
        import transformers

        self.torch = torch
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.max_length = self.model.config.max_position_embeddings

    def choice_logliks(self, context: str, choices: list[str]) -> list[float]:
        """Log-likelihood of " " + each choice after context, all choices in one right-padded batch."""
        torch = self.torch
        context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
        inputs, answers = [], []
        for choice in choices:
            all_ids = self.tokenizer(context + " " + choice, add_special_tokens=False).input_ids
            answers.append(all_ids[len(context_ids):])
            inputs.append(all_ids[:-1][-self.max_length:])
        width = max(map(len, inputs))
        batch = torch.tensor([ids + [0] * (width - len(ids)) for ids in inputs])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in inputs])
        with torch.no_grad():
            logprobs = self.model(batch, attention_mask=mask).logits.float().log_softmax(-1)
        return [float(sum(logprobs[row, len(ids) - len(answer) + i, token] for i, token in enumerate(answer)))
                for row, (ids, answer) in enumerate(zip(inputs, answers))]


def read_rows(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def mean_and_stderr(scores: list[float]) -> tuple[float, float]:
    mean = sum(scores) / len(scores)
    variance = sum((s - mean) ** 2 for s in scores) / (len(scores) - 1)
    return mean, math.sqrt(variance / len(scores))


def expected_bigbench(scorer: IndependentScorer, data_file: Path, n: int = LIMIT) -> list[float]:
    """multiple_choice_grade per row: 1 when the most likely choice is one that scores 1."""
    grades = []
    for row in read_rows(data_file, n):
        lls = scorer.choice_logliks(row["inputs"], row["multiple_choice_targets"])
        grades.append(float(row["multiple_choice_scores"][lls.index(max(lls))] == 1))
    return grades


# lm-eval's truthfulqa_mc2 prompt (the Nous harness's QA_PROMPT), written out here to check the prompt it builds.
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 "
    "years.\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the "
    "United States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party.\n\nQ: What "
    "is the square root of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: Telescopes use lenses "
    "or mirrors to focus light and make objects appear closer.\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 "
    "Olympics were held in Barcelona, Spain.")


def test_full_suite_report_matches_independent_scoring(full_run, tiny_model, nous_data):
    done, report, output = full_run
    # One moelab progress view: none of lm-eval's per-request bars nor library deprecation warnings.
    assert "Running loglikelihood requests" not in done.stderr and "Tokenizing inputs" not in done.stderr
    assert "Warning" not in done.stderr and "tasks" in done.stderr
    assert [r.task for r in report.results] == [t.name for t in NOUS_TASKS]
    assert all(r.n == LIMIT and r.num_fewshot == 0 for r in report.results)
    assert report.limited and report.settings.limit == LIMIT and report.settings.device == "cpu"
    assert report.settings.dtype == "float32" and report.settings.batch_size == "8"
    assert set(report.groups) == set(GROUPS) and report.groups == group_scores(report.results)
    assert report.average == overall_average(report.groups)
    assert report.content_hash and len(report.content_hash) == 64 and report.recipe is None
    assert set(report.versions) == {"moelab", "lm_eval", "torch", "transformers"}
    assert "Average of the four groups" in done.stdout and "nous.json" in done.stderr
    assert [p.name for p in output.parent.iterdir()] == ["nous.json"]  # the resume cache is gone

    scorer = IndependentScorer(tiny_model)
    by_task = {r.task: r for r in report.results}
    for task in (t for t in NOUS_TASKS if t.group == "Bigbench"):
        mean, stderr = mean_and_stderr(expected_bigbench(scorer, nous_data / task.data_file))
        assert by_task[task.name].value == pytest.approx(mean), task.name
        assert by_task[task.name].stderr == pytest.approx(stderr), task.name

    # AGIEval: acc_norm = argmax of log-likelihood per character of the choice.
    norm_hits = []
    for row in read_rows(nous_data / "agieval" / "aqua-rat.jsonl", LIMIT):
        lls = scorer.choice_logliks(row["query"], row["choices"])
        per_char = [ll / len(choice) for ll, choice in zip(lls, row["choices"])]
        norm_hits.append(float(per_char.index(max(per_char)) in row["gold"]))
    assert by_task["agieval_aqua_rat"].value == pytest.approx(sum(norm_hits) / LIMIT)

    # TruthfulQA mc2: the probability mass of the true answers among all mc2 answers, after the 6-pair preamble.
    mc2 = []
    for row in read_rows(nous_data / "truthfulqa" / "truthfulqa_mc.jsonl", LIMIT):
        context = TRUTHFULQA_PREAMBLE + "\n\nQ: " + row["question"] + "\nA:"
        probs = [math.exp(ll) for ll in scorer.choice_logliks(context, row["mc2_targets"]["choices"])]
        mc2.append(sum(p for p, label in zip(probs, row["mc2_targets"]["labels"]) if label) / sum(probs))
    assert by_task["truthfulqa_mc"].value == pytest.approx(sum(mc2) / LIMIT, rel=1e-4, abs=1e-12)


def test_interrupted_run_resumes_from_finished_tasks(full_run, tiny_model, tmp_path):
    data = data_dir_with(tmp_path, bigbench=BIGBENCH_DIR)
    output = tmp_path / "out" / "nous.json"
    partial = output.parent / "nous.json.partial"
    tasks = "bigbench_causal_judgement,bigbench_date_understanding,bigbench_navigate"
    run = subprocess.Popen([sys.executable, "-m", "moelab", "eval", str(tiny_model), "--tasks", tasks, "--limit",
                            str(LIMIT), "--data-dir", str(data), "--output", str(output), "--device", "cpu",
                            "--engine", "lm-eval"],  # task by task, so that one task is cached before the others
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # a test run started in the background inherits an ignored SIGINT; Ctrl-C must reach it
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not (partial / "bigbench_causal_judgement.json").exists():
        assert run.poll() is None and time.time() < deadline, run.communicate()[1][-2000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr[-2000:]
    assert not output.exists()

    # Mark the cached result, so the resumed report shows whether it was reused or recomputed.
    cached_file = partial / "bigbench_causal_judgement.json"
    cached = json.loads(cached_file.read_text())
    cached["result"]["value"] = 0.123
    cached_file.write_text(json.dumps(cached))
    # A cached task from a different setting (here another limit) must not be reused.
    stale = dict(cached, fingerprint="0" * 64)
    (partial / "bigbench_navigate.json").write_text(json.dumps(stale))

    report = run_eval(str(tiny_model), EvalSettings(tasks=tasks.split(","), limit=LIMIT, device="cpu"), data, output)
    values = {r.task: r.value for r in report.results}
    full = {r.task: r.value for r in full_run[1].results}
    assert values["bigbench_causal_judgement"] == 0.123
    assert values["bigbench_date_understanding"] == pytest.approx(full["bigbench_date_understanding"])
    assert values["bigbench_navigate"] == pytest.approx(full["bigbench_navigate"])
    assert EvalReport.load(output) == report and not partial.exists()


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def test_bad_input_is_one_line_and_exit_2(tiny_model, nous_data, tmp_path):
    out = ["--output", tmp_path / "r" / "nous.json", "--device", "cpu", "--limit", "1"]
    assert "unknown task or group 'mmlu'" in one_line_error(moelab_eval(tiny_model, "--tasks", "mmlu", *out))

    only_bigbench = data_dir_with(tmp_path, bigbench=BIGBENCH_DIR)
    line = one_line_error(moelab_eval(tiny_model, "--tasks", "AGIEval", "--data-dir", only_bigbench, *out))
    assert "agieval_aqua_rat needs" in line and "aqua-rat.jsonl, which is missing" in line

    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    line = one_line_error(moelab_eval(broken, "--tasks", "bigbench_navigate", "--data-dir", nous_data, *out))
    assert line.startswith("error: cannot load model") and "broken-model" in line
    assert not (tmp_path / "r" / "nous.json.partial").exists()  # nothing half-done is left behind

    no_config = tmp_path / "not-a-model"
    no_config.mkdir()
    line = one_line_error(moelab_eval(no_config, "--tasks", "bigbench_navigate", "--data-dir", nous_data, *out))
    assert "model folder" in line and "has no config.json" in line

    line = one_line_error(moelab_eval(tmp_path / "nowhere", *out))
    assert "neither a model folder nor a Hub repo id" in line

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    line = one_line_error(moelab_eval(tiny_model, "--tasks", "bigbench_navigate", "--data-dir", nous_data,
                                      "--output", a_file / "nous.json"))
    assert "cannot write the report" in line


def test_a_bad_data_file_mid_run_keeps_finished_tasks(tiny_model, tmp_path):
    # BIG-bench rows are checked before the model loads; lm-eval's own tasks read theirs only when they run.
    (tmp_path / "agieval").mkdir()
    (tmp_path / "agieval" / "aqua-rat.jsonl").symlink_to(FIXTURES / "agieval" / "aqua-rat.jsonl")
    (tmp_path / "truthfulqa").mkdir()
    (tmp_path / "truthfulqa" / "truthfulqa_mc.jsonl").write_text('{"question": "a row in the wrong schema"}\n')
    output = tmp_path / "out" / "nous.json"
    done = moelab_eval(tiny_model, "--tasks", "agieval_aqua_rat,truthfulqa_mc", "--limit", 1, "--data-dir",
                       tmp_path, "--output", output, "--device", "cpu")
    line = one_line_error(done)
    assert "task truthfulqa_mc" in line and "truthfulqa_mc.jsonl does not read as its dataset's schema" in line
    assert not output.exists()
    # aqua-rat's result, and the requests scored for it (the moelab engine's request cache)
    assert sorted(p.name for p in (output.parent / "nous.json.partial").iterdir()) == ["agieval_aqua_rat.json",
                                                                                        "requests.jsonl"]


@pytest.mark.slow
def test_smollm2_bigbench_matches_independent_scoring(smollm2_dir, tmp_path):
    data = data_dir_with(tmp_path, bigbench=BIGBENCH_DIR)
    names = ["bigbench_logical_deduction_three_objects", "bigbench_sports_understanding"]
    report = run_eval(str(smollm2_dir), EvalSettings(tasks=names, limit=2, device="cpu"), data,
                      tmp_path / "nous.json")
    scorer = IndependentScorer(smollm2_dir)
    for result, task in zip(report.results, (t for t in NOUS_TASKS if t.name in names)):
        mean, stderr = mean_and_stderr(expected_bigbench(scorer, data / task.data_file, 2))
        assert result.value == pytest.approx(mean), result.task
        assert result.stderr == pytest.approx(stderr), result.task
    assert report.groups == {} and report.average is None and report.limited



def test_without_data_dir_split_tasks_read_hails_bigbench_and_keep_their_own_object_count():
    """hails/bigbench mixes the 3/5/7-object subtasks in one config; each Nous task keeps only its own rows."""
    import datasets

    from moelab.eval.local import task_config

    parts = ("three", "five", "seven")
    mixed = datasets.concatenate_datasets([datasets.Dataset.from_json(
        str(BIGBENCH_DIR / f"logical_deduction_{n}_objects.jsonl")) for n in parts])
    for n in parts:
        config = task_config(next(t for t in NOUS_TASKS if t.name == f"bigbench_logical_deduction_{n}_objects"), None)
        assert (config["dataset_path"], config["dataset_name"]) == ("hails/bigbench", "logical_deduction_zero_shot")
        assert config["process_docs"](mixed).num_rows == 30  # of the 90 mixed rows
    navigate = task_config(next(t for t in NOUS_TASKS if t.name == "bigbench_navigate"), None)
    assert navigate["dataset_name"] == "navigate_zero_shot" and "process_docs" not in navigate
    judgement = task_config(next(t for t in NOUS_TASKS if t.name == "bigbench_causal_judgement"), None)
    assert judgement["dataset_name"] == "causal_judgment_zero_shot"
