"""The moelab eval engine against lm-eval's own hf scoring on tiny models (float32 on CPU): per-request
log-likelihoods, per-task results, resume of an interrupted pass, and no batch-size probing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import make_tiny_dense
from moelab.eval import EvalSettings, run_eval
from moelab.eval.local import load_language_model, model_identity, resolve_settings, task_config, task_fingerprint
from moelab.eval.scheduler import (ScheduleOptions, encode_requests, plan_rows, run_scheduled, scheduled_lm,
                                   templates_compiled_once)
from moelab.eval.suite import NOUS_TASKS

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "moelab" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nous"
LIMIT = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The shipped BIG-bench subset and the AGIEval/GPT4All/TruthfulQA fixtures, laid out as --data-dir."""
    data = tmp_path_factory.mktemp("data")
    for name, target in (("bigbench", PACKAGE_DATA / "bigbench"), ("agieval", FIXTURES / "agieval"),
                         ("gpt4all", FIXTURES / "gpt4all"), ("truthfulqa", FIXTURES / "truthfulqa")):
        (data / name).symlink_to(target)
    return data


@pytest.fixture(scope="module")
def tasks(data_dir) -> list:
    """Every Nous task whose data is shipped (the BIG-bench subset may hold fewer than 18)."""
    return [t for t in NOUS_TASKS if (data_dir / t.data_file).is_file()]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_dense(tmp_path_factory.mktemp("sched") / "tiny-llama")


def hf_lm_of(model: Path):
    return load_language_model(str(model), resolve_settings(EvalSettings(device="cpu")))


def lm_eval_requests(tasks: list, data_dir: Path, limit: int) -> list:
    """The log-likelihood Instances lm-eval's own task objects build for the tasks."""
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_defaults=False).load([task_config(t, data_dir) for t in tasks])
    instances = []
    for task in loaded["tasks"].values():
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        instances += task.instances
    return instances


def mixed_tasks(tasks: list) -> list:
    """The shipped BIG-bench tasks and one task of each other scheme: long passages (truncated), a shared
    continuation after different contexts (winogrande), the TruthfulQA preamble."""
    return [t for t in tasks if t.group == "Bigbench" or t.name in ("agieval_lsat_rc", "winogrande", "truthfulqa_mc")]


def assert_same_answers(ours: list, theirs: list) -> None:
    assert len(ours) == len(theirs)
    for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs):
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy


def test_each_request_scores_as_lm_eval_scores_it(tiny_model, tasks, data_dir):
    """All shipped tasks' requests: shared contexts packed in rows equal lm-eval's one-request-per-row scoring,
    including the requests lm-eval left-truncates (AGIEval passages exceed the tiny model's 256 positions)."""
    hf_lm = hf_lm_of(tiny_model)
    requests = lm_eval_requests(mixed_tasks(tasks), data_dir, 2)
    theirs = hf_lm.loglikelihood(requests, disable_tqdm=True)
    lm = scheduled_lm(hf_lm, ScheduleOptions(batch_tokens=1024))
    assert_same_answers(lm.loglikelihood(requests), theirs)

    encoded = encode_requests(hf_lm, [r.args for r in requests])
    rows = plan_rows(encoded, hf_lm.max_length)
    truncated = [r for r in rows if len(r.answers) == 1 and len(r.tokens) == hf_lm.max_length]
    assert truncated and len(rows) < len(requests)  # contexts shared by several choices share a row
    assert lm.stats.rows == len(rows) and lm.stats.tokens < sum(len(c) + len(t) for c, t in encoded)


def test_empty_contexts_and_trailing_spaces_encode_as_lm_eval_encodes_them(tiny_model):
    from lm_eval.api.instance import Instance

    hf_lm = hf_lm_of(tiny_model)
    pairs = [("", "Hello there"), ("The answer is ", "42."), ("The answer is", " 42."), ("Two plus  ", " five"),
             ("Solve:", "\n12 minus 5"), ("The answer is ", "forty-two")]
    requests = [Instance("loglikelihood", {}, pair, idx, ("demo", 0, 1)) for idx, pair in enumerate(pairs)]
    expected = [(([hf_lm.prefix_token_id], hf_lm.tok_encode("Hello there", add_special_tokens=False)))]
    expected += [hf_lm._encode_pair(*pair) for pair in pairs[1:]]
    assert encode_requests(hf_lm, pairs) == expected
    assert_same_answers(scheduled_lm(hf_lm, ScheduleOptions(batch_tokens=64)).loglikelihood(requests),
                        hf_lm.loglikelihood(requests, disable_tqdm=True))


def test_a_mixtral_moe_scores_as_lm_eval_scores_it(tiny_moe_dir, tasks, data_dir):
    hf_lm = hf_lm_of(tiny_moe_dir)
    requests = lm_eval_requests([t for t in tasks if t.group == "Bigbench"], data_dir, 2)
    assert_same_answers(scheduled_lm(hf_lm, ScheduleOptions(batch_tokens=2048)).loglikelihood(requests),
                        hf_lm.loglikelihood(requests, disable_tqdm=True))


def test_one_pass_gives_the_task_at_a_time_results(tiny_model, tasks, data_dir, tmp_path):
    names = [t.name for t in tasks if t.group in ("Bigbench", "TruthfulQA")] + ["arc_easy", "agieval_lsat_ar"]
    settings = EvalSettings(tasks=names, limit=LIMIT, device="cpu")
    one_pass = run_eval(str(tiny_model), settings, data_dir, tmp_path / "moelab.json")
    task_at_a_time = run_eval(str(tiny_model), replace(settings, engine="lm-eval"), data_dir, tmp_path / "lm.json")
    assert one_pass.settings.engine == "moelab" and task_at_a_time.settings.engine == "lm-eval"
    for ours, theirs in zip(one_pass.results, task_at_a_time.results, strict=True):
        assert replace(ours, value=0, stderr=0) == replace(theirs, value=0, stderr=0)
        assert ours.value == pytest.approx(theirs.value, rel=1e-6, abs=1e-12), ours.task
        assert ours.stderr == pytest.approx(theirs.stderr, rel=1e-6, abs=1e-12), ours.task
    speed = one_pass.speed
    assert speed["requests"] > speed["rows"] > 0 and speed["cached"] == 0 and speed["requests_per_s"] > 0
    assert set(speed["stages_s"]) == {"load_model", "evaluate", "tokenize", "score"}
    assert set(task_at_a_time.speed["stages_s"]) == {"load_model", "evaluate"}


def test_an_interrupted_pass_resumes_from_its_scored_requests(tiny_model, tasks, data_dir, tmp_path):
    from lm_eval.tasks import TaskManager

    bigbench = [t for t in tasks if t.group == "Bigbench"]
    output = tmp_path / "out" / "nous.json"
    settings = resolve_settings(EvalSettings(tasks=[t.name for t in bigbench], limit=LIMIT, device="cpu",
                                             batch_tokens=256))
    fingerprints = {t.name: task_fingerprint(str(tiny_model), model_identity(str(tiny_model))[1], settings, t,
                                             data_dir) for t in bigbench}
    requests_file = output.with_name("nous.json.partial") / "requests.jsonl"
    progress = []

    def stop_after_two_batches(done: int, total: int) -> None:
        progress.append(done)
        if len(progress) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_scheduled(hf_lm_of(tiny_model), bigbench, settings, data_dir, TaskManager(include_defaults=False),
                      requests_file, fingerprints, on_result=lambda task, result: None,
                      on_progress=stop_after_two_batches, options=ScheduleOptions(settings.batch_tokens))
    scored_before = len(requests_file.read_text().splitlines())
    assert scored_before == progress[-1] > 0

    resumed = run_eval(str(tiny_model), settings, data_dir, output)
    fresh = run_eval(str(tiny_model), settings, data_dir, tmp_path / "fresh.json")
    assert resumed.speed["cached"] == scored_before and fresh.speed["cached"] == 0
    assert [r.value for r in resumed.results] == [r.value for r in fresh.results]
    assert not requests_file.parent.exists()


def test_no_batch_size_is_probed(tiny_model, tasks, data_dir):
    """Every forward pass scores a planned batch: the model runs exactly once per batch."""
    hf_lm = hf_lm_of(tiny_model)
    calls = []
    hook = hf_lm.model.base_model.register_forward_hook(lambda module, args, output: calls.append(1))
    lm = scheduled_lm(hf_lm, ScheduleOptions(batch_tokens=2048))
    try:
        lm.loglikelihood(lm_eval_requests([t for t in tasks if t.group == "Bigbench"], data_dir, LIMIT))
    finally:
        hook.remove()
    assert len(calls) == lm.stats.batches and 1 < lm.stats.batches < lm.stats.rows


def test_templates_compiled_once_render_the_same_text():
    import lm_eval.utils

    doc = {"question": "What is 2+3?", "choices": ["4", "5"]}
    template = "Q: {{question}}\nChoices: {{choices | join(', ')}}"
    plain = lm_eval.utils.apply_template(template, doc)
    with templates_compiled_once():
        assert lm_eval.utils.apply_template(template, doc) == plain == "Q: What is 2+3?\nChoices: 4, 5"
