"""Several devices without GPUs: the choice of replicas or sharding, the split of batches between replicas, and
two CPU processes scoring halves of a pass exactly as one process scores all of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import make_tiny_dense
from moelab.errors import MoelabError
from moelab.eval import EvalSettings
from moelab.eval.local import load_language_model, resolve_settings
from moelab.eval.parallel import choose_plan, plan_for, score_replicated, split_batches, weight_bytes
from moelab.eval.scheduler import (ScheduleOptions, ScheduleStats, batches_of, encode_requests, plan_rows,
                                   score_batches)

GiB = 2**30
H200 = 141 * GiB


def test_a_model_that_fits_one_gpu_gets_a_replica_on_each():
    plan = choose_plan(2 * GiB, [H200, H200])
    assert plan.strategy == "replicas" and plan.devices == ["cuda:0", "cuda:1"]
    assert choose_plan(2 * GiB, [H200]).strategy == "single"
    assert choose_plan(2 * GiB, [H200, H200], gpus=1) == choose_plan(2 * GiB, [H200])
    assert choose_plan(2 * GiB, []).devices == ["cpu"]


def test_a_model_too_big_for_one_gpu_is_sharded_across_them():
    mixtral_8x7b = 94 * GiB  # 47B parameters in float16
    plan = choose_plan(mixtral_8x7b, [80 * GiB, 80 * GiB])
    assert plan.strategy == "shard" and plan.devices == ["cuda:0", "cuda:1"]
    assert choose_plan(mixtral_8x7b, [H200, H200]).strategy == "replicas"  # 94 GiB fit 80% of 141
    assert choose_plan(2 * GiB, [H200, H200], "shard").strategy == "shard"  # the flag overrides

    with pytest.raises(MoelabError, match="do not fit one GPU"):
        choose_plan(mixtral_8x7b, [80 * GiB, 80 * GiB], "replicas")
    with pytest.raises(MoelabError, match="do not fit one GPU"):
        choose_plan(mixtral_8x7b, [80 * GiB], "auto")
    with pytest.raises(MoelabError, match="do not fit the 2 GPUs together"):
        choose_plan(140 * GiB, [80 * GiB, 80 * GiB])
    with pytest.raises(MoelabError, match="--gpus 3: this machine has 2"):
        choose_plan(2 * GiB, [H200, H200], gpus=3)
    with pytest.raises(MoelabError, match="--parallel data is not one of"):
        choose_plan(2 * GiB, [H200, H200], "data")


def test_without_gpus_only_a_single_process_is_planned(tmp_path):
    assert plan_for(str(tmp_path), "float32", "cpu", "auto", None).strategy == "single"
    assert plan_for("org/model", "float16", "cuda:1", "auto", None).devices == ["cuda:1"]
    with pytest.raises(MoelabError, match="--parallel replicas needs CUDA GPUs"):
        plan_for(str(tmp_path), "float32", "cpu", "replicas", None)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_dense(tmp_path_factory.mktemp("parallel") / "tiny-llama")


def test_weight_bytes_follow_the_eval_dtype(tiny_model):
    stored = (tiny_model / "model.safetensors").stat().st_size  # bf16
    assert weight_bytes(tiny_model, "float32") == 2 * stored
    assert weight_bytes(tiny_model, "float16") == stored


def test_batches_are_split_evenly_and_each_once(tiny_model):
    hf_lm = load_language_model(str(tiny_model), resolve_settings(EvalSettings(device="cpu")))
    pairs = [(f"Question {i}: what is {i} plus {i}? Answer:", f" {2 * i + k}") for i in range(40) for k in range(3)]
    batches = batches_of(plan_rows(encode_requests(hf_lm, pairs), hf_lm.max_length), 64)
    shares = split_batches(batches, 3)
    assert sorted(i for share in shares for i in share) == list(range(len(batches)))
    loads = [sum(len(batches[i]) * len(batches[i][0].tokens) for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(len(b) * len(b[0].tokens) for b in batches)


def test_two_cpu_processes_score_as_one(tiny_model):
    """This process scores one share, a spawned worker (its own model load) the other: same answers as one
    process scoring all, each request once."""
    hf_lm = load_language_model(str(tiny_model), resolve_settings(EvalSettings(device="cpu")))
    pairs = [(f"The answer to {i} times {i} is", f" {i * i}{tail}") for i in range(24) for tail in ("", ".", "!")]
    batches = batches_of(plan_rows(encode_requests(hf_lm, pairs), hf_lm.max_length), 96)
    options = ScheduleOptions(batch_tokens=96)

    def collect(into: dict):
        return lambda requests, answers: into.update(zip(requests, answers, strict=True))

    alone, together = {}, {}
    score_batches(hf_lm.model, batches, options, ScheduleStats(), collect(alone))
    stats = ScheduleStats()
    score_replicated(hf_lm.model, (str(tiny_model), "float32"), ["cpu", "cpu"], batches, options, stats,
                     collect(together))
    assert sorted(together) == sorted(alone) == list(range(len(pairs)))
    for request, (ll, greedy) in alone.items():
        assert together[request][0] == pytest.approx(ll, abs=1e-5) and together[request][1] == greedy
    assert stats.tokens == sum(len(row.tokens) for batch in batches for row in batch)
