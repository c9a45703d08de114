"""The heal step: distillation of each expert into the merged MoE on tiny random models, its checkpoint and report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelab.build.heal import bucket_kl
from moelab.build.tensors import SafetensorsFolder
from moelab.errors import MoelabError
from moelab.recipe import parse_recipe
from test_build import build, logits, write_recipe

MATH = [{"question": f"What is {a} plus {b}?", "solution": f"{a} + {b} = {a + b}. The answer is {a + b}."}
        for a, b in [(12, 7), (6, 3), (40, 2), (9, 9), (21, 5), (33, 4), (8, 17), (50, 6), (3, 14), (70, 1)]]
CODE = [{"text": t} for t in ["def add(a, b):\n    return a + b", "import os\nclass Model(nn.Module): pass",
                              "for key in state:\n    print(key)", "return self.linear(x).view(batch, -1)",
                              "if name.startswith('model.'):\n    continue", "x = [i * 2 for i in range(10)]"] * 2]
CHAT = [{"text": t} for t in ["Hello! How are you today?", "Tell me a fun fact about cats.",
                              "What should I cook tonight?", "I like to chat with a helpful assistant."] * 3]
FAST_HEAL = {"steps": 40, "lr": 1e-2, "examples": 12, "tokens": 24, "top_k": 8, "holdout": 0.25}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many times faster on one thread than on two that share a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def changed_copy(dense: Path, out: Path, noise: float, seed: int, head_scale: float = 1.0) -> Path:
    """A copy of `dense` whose inner matrices moved by `noise` x their own spread (an expert that really differs),
    and whose LM head is `head_scale` times larger (random tiny models predict nearly uniformly otherwise)."""
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lm_head" in name:
                p.mul_(head_scale)
            elif p.dim() == 2 and "embed" not in name:
                p.add_(noise * p.std() * torch.randn(p.shape, generator=generator))
    model.to(torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(dense).save_pretrained(out)
    return out


def write_rows(folder: Path, name: str, rows: list[dict]) -> str:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"{name}.jsonl"


def heal_recipe(folder: Path, base: Path, math: Path, code: Path, heal: dict | None = None, **extra) -> dict:
    fields = dict(base_model=str(base), gate_mode="random", experts_per_token=1, heal=heal or dict(FAST_HEAL),
                  experts=[{"source_model": str(base), "name": "chat", "router_data": write_rows(folder, "chat", CHAT)},
                           {"source_model": str(math), "name": "math", "heal_data": write_rows(folder, "math", MATH)},
                           {"source_model": str(code), "name": "code", "router_data": write_rows(folder, "code", CODE)}])
    fields.update(extra)
    return fields


@pytest.fixture
def three_models(tmp_path, tiny_dense):
    base = changed_copy(tiny_dense("dense"), tmp_path / "base", 0.0, 0, head_scale=20.0)
    return base, changed_copy(base, tmp_path / "math", 0.5, 1), changed_copy(base, tmp_path / "code", 0.5, 2)


def test_heal_reduces_heldout_kl_and_writes_a_loadable_checkpoint(tmp_path, three_models):
    out = build(tmp_path, **heal_recipe(tmp_path, *three_models))
    heal = json.loads((out / "moelab.json").read_text())["heal"]
    assert set(heal["domains"]) == {"math", "code", "general"}
    for name in ("math", "code"):
        assert heal["domains"][name]["kl_after"] < 0.8 * heal["domains"][name]["kl_before"], heal
    assert heal["domains"]["general"]["kl_after"] <= heal["domains"]["general"]["kl_before"], heal
    assert heal["domains"]["math"]["nll_after"] < heal["domains"]["math"]["nll_before"]
    assert heal["rewritten_tensors"] == 2 * 4 + 2  # q/k/v/o of 2 layers, 2 routers
    assert "## Heal" in (out / "README.md").read_text()

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # native class, no remote code
    assert type(model).__name__ == "MixtralForCausalLM" and not info["unexpected_keys"]
    ids = model.generate(torch.tensor([[1, 5, 17]]), max_new_tokens=5, do_sample=False)
    assert ids.shape == (1, 8)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(SafetensorsFolder(out).names())


def test_heal_of_the_experts_alone_is_merged_into_each_experts_tensors(tmp_path, three_models):
    # qwen2_moe as well: the fused gate_up tensors must split back into each expert's gate and up matrices.
    base, math, code = three_models
    heal = dict(FAST_HEAL, parts=["experts"], general_weight=0)
    out = build(tmp_path, **heal_recipe(tmp_path, base, math, code, heal, architecture="qwen2_moe"))
    report = json.loads((out / "moelab.json").read_text())["heal"]
    assert report["rewritten_tensors"] == 2 * 3 * 3  # 2 layers x 3 experts x gate/up/down
    assert set(report["domains"]) == {"math", "code"}
    for domain in report["domains"].values():
        assert domain["kl_after"] < 0.8 * domain["kl_before"]


def test_heal_with_experts_identical_to_the_base_leaves_the_logits(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    fields = dict(base_model=str(dense), gate_mode="random", experts_per_token=2, allow_identical_experts=True,
                  heal=dict(FAST_HEAL, parts=["shared", "router", "experts"]),
                  experts=[{"source_model": str(dense), "router_data": write_rows(tmp_path, "chat", CHAT)}] * 2)
    out = build(tmp_path, **fields)
    heal = json.loads((out / "moelab.json").read_text())["heal"]
    assert list(heal["domains"]) == ["general"] and heal["domains"]["general"]["kl_before"] < 1e-3
    assert heal["notes"][0].startswith("nothing trained") and heal["rewritten_tensors"] == 0
    torch.testing.assert_close(logits(out), logits(dense), atol=2e-2, rtol=1e-2)


def test_bucket_kl_is_zero_for_the_teacher_and_counts_mass_outside_its_top_k():
    teacher = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), dim=-1)
    values, indices = teacher.topk(2, dim=-1)
    assert float(bucket_kl(teacher, values, indices)) == pytest.approx(0.0, abs=1e-6)
    # Same top-2 shares, but more mass outside them: renormalizing over the top-2 would call this 0.
    student = torch.log_softmax(torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]]), dim=-1)
    full = float((teacher.exp() * (teacher - student)).sum())
    assert 0.05 < float(bucket_kl(student, values, indices)) <= full + 1e-6


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_heal_leaves_no_output(tmp_path, three_models, stop):
    fields = heal_recipe(tmp_path, *three_models, heal=dict(FAST_HEAL, steps=100_000))
    recipe, _ = write_recipe(tmp_path, **fields)
    out = tmp_path / "moe"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "moelab", "build", str(recipe), str(out)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not any((tmp / "config.json").is_file() for tmp in tmp_path.glob(".moe.tmp-*")):  # merged: heal runs
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0].decode()
        time.sleep(0.1)
    time.sleep(1.0)
    process.send_signal(stop)
    output = process.communicate(timeout=60)[0].decode()
    assert process.returncode in (130, 128 + signal.SIGTERM), output
    assert not out.exists() and not list(tmp_path.glob(".moe*")), output


@pytest.mark.parametrize("heal, message", [
    ({"steps": 0}, "heal.steps"),
    ({"lr": -1}, "heal.lr"),
    ({"rank": "eight"}, "heal.rank"),
    ({"parts": ["attention"]}, r"heal.parts is \['attention'\]"),
    ({"parts": []}, r"heal.parts is \[\]"),
    ({"holdout": 1.5}, "heal.holdout"),
    ({"stepz": 3}, "unknown field 'heal.stepz'"),
    ({"examples": 2, "holdout": 0.1}, "leaves no training or no held-out example"),
])
def test_bad_heal_blocks_are_one_line_errors(heal, message):
    text = json.dumps({"base_model": "b", "gate_mode": "random", "heal": heal,
                       "experts": [{"source_model": "a"}, {"source_model": "b"}]})
    with pytest.raises(MoelabError, match=message) as err:
        parse_recipe(text, "r.yaml")
    assert "\n" not in str(err.value)


def test_heal_needs_data_for_every_expert_that_differs(tmp_path, three_models):
    fields = heal_recipe(tmp_path, *three_models)
    del fields["experts"][1]["heal_data"]
    with pytest.raises(MoelabError, match="expert math has no heal_data or router_data"):
        build(tmp_path, **fields)
    assert not list(tmp_path.glob(".moe*")) and not (tmp_path / "moe").exists()
