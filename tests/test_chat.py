"""moelab chat on tiny MoE models: tracing leaves generation unchanged, conversations, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rich.console import Console

from moelab.chat import ChatSession, GenerationSettings, generate_traced, probe_view
from moelab.probe import load_labelled_prompts, load_moe, probe_routing, route_tokens
from test_probe import FIXTURES, MOE_CONFIGS, make_tiny_moe

SAMPLING = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)


@pytest.fixture
def random_moe(tmp_path, tiny_tokenizer_dir):
    """Factory: a tiny MoE with random weights (routing varies by token and layer)."""
    def make(layout: str = "mixtral", top_k: int = 2) -> Path:
        return make_tiny_moe(tmp_path / layout, tiny_tokenizer_dir, layout, num_experts=3, top_k=top_k,
                             hand_routed=False)
    return make


@pytest.mark.parametrize("layout", MOE_CONFIGS)
def test_tracing_does_not_change_generation(random_moe, layout):
    moe = load_moe(str(random_moe(layout)), device="cpu")
    prompt = moe.tokenizer("Hello! How are you today?")["input_ids"]

    plain, no_trace = generate_traced(moe, prompt, SAMPLING, trace=False)
    streamed: list[str] = []
    traced, trace = generate_traced(moe, prompt, SAMPLING, on_text=streamed.append)

    assert no_trace is None and traced == plain and "".join(streamed) == plain
    answer_ids = trace.token_ids[len(prompt):]
    assert trace.token_ids[:len(prompt)] == prompt and trace.num_prompt_tokens == len(prompt)
    assert 0 < len(answer_ids) <= SAMPLING.max_new_tokens
    assert trace.expert_ids.shape == (len(trace), 3, 2) and trace.expert_weights.shape == (len(trace), 3, 2)
    # Routing recorded token by token during generation equals one forward pass over the whole text.
    whole = route_tokens(moe, trace.token_ids)
    np.testing.assert_array_equal(trace.expert_ids, whole.expert_ids)
    np.testing.assert_allclose(trace.expert_weights, whole.expert_weights, atol=1e-4)


def test_conversation_keeps_history_and_traces_only_new_tokens(random_moe):
    moe = load_moe(str(random_moe("qwen3_moe")), device="cpu")
    session = ChatSession(moe, GenerationSettings(max_new_tokens=6, temperature=0))

    first_answer, first = session.ask("Hello!")
    second_answer, second = session.ask("Two plus three?")

    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first_answer and session.history[3]["content"] == second_answer
    assert "".join(first.tokens).startswith("<|user|>Hello!")
    assert "".join(second.tokens).startswith("<|user|>Two plus three?</s><|assistant|>")
    session.reset()
    again_answer, again = session.ask("Hello!")
    assert (again_answer, again.token_ids) == (first_answer, first.token_ids)


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, "COLUMNS": "120"})


def test_cli_answers_prompts_and_writes_trace_and_heatmap(tmp_path, random_moe):
    folder = random_moe("qwen2_moe", top_k=1)
    (folder / "moelab.json").write_text(json.dumps({"experts": [{"name": n} for n in ("chat", "math", "code")]}))
    result = run_cli("chat", folder, "--prompt", "Hello!", "--prompt", "Seven times six?", "--max-new-tokens", 5,
                     "--temperature", 0, "--trace", tmp_path / "trace.json", "--heatmap", tmp_path / "routing.png")
    assert result.returncode == 0, result.stderr
    assert "3 experts (chat, math, code) in 3 MoE layers" in result.stderr
    assert result.stdout.count("assistant>") == 2 and "expert usage" in result.stdout
    assert "── answer ──" in result.stdout
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert len(trace["turns"]) == 2 and trace["turns"][0]["expert_names"] == ["chat", "math", "code"]
    token = trace["turns"][1]["tokens"][0]
    assert len(token["experts"]) == 3 and len(token["experts"][0]) == 1 and token["weights"][0] == [1.0]
    assert {t["part"] for t in trace["turns"][1]["tokens"]} == {"prompt", "answer"}
    assert (tmp_path / "routing.png").stat().st_size > 10_000


def test_cli_interactive_commands(random_moe):
    result = run_cli("chat", random_moe(), "--max-new-tokens", 3, stdin="Hello!\n/bogus\n/reset\n/quit\nnever\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant>") == 1
    assert "unknown command /bogus" in result.stdout and "conversation cleared" in result.stdout


def test_cli_probe_prints_json_and_the_same_as_a_table(tmp_path, tiny_tokenizer_dir):
    folder = make_tiny_moe(tmp_path / "moe", tiny_tokenizer_dir, "mixtral", layer_shift=0)
    (folder / "moelab.json").write_text(json.dumps({"experts": [{"name": n} for n in ("chat", "math", "code")]}))
    as_json = run_cli("chat", folder, "--probe", FIXTURES / "tiny.yaml", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["num_prompts"] == 6 and 0 <= report["accuracy"] <= 1 and report["load_balance_cv"] >= 0

    moe = load_moe(str(folder), device="cpu")
    console = Console(record=True, width=120)
    console.print(probe_view(probe_routing(moe, load_labelled_prompts(FIXTURES / "tiny.yaml", moe.expert_names))))
    table = console.export_text()
    assert "routing confusion" in table and f"routing accuracy {report['accuracy']:.1%}" in table
    assert f"coefficient of variation {report['load_balance_cv']:.3f}" in table


def without_weights(folder: Path) -> Path:
    """The model folder with its weights replaced by garbage: loading them would fail, checking the inputs not."""
    for shard in folder.glob("*.safetensors"):
        shard.write_bytes(b"not safetensors")
    return folder


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_cli_refuses_a_dense_model_from_its_config_before_loading_weights(tiny_dense):
    line = one_error_line(run_cli("chat", without_weights(tiny_dense("dense")), "--prompt", "hi"))
    assert "not a Mixture-of-Experts model: the config.json of" in line and "(llama) has no experts" in line


def test_cli_checks_the_probe_file_before_loading_the_model(random_moe, tmp_path):
    line = one_error_line(run_cli("chat", without_weights(random_moe()), "--probe", tmp_path / "missing.yaml"))
    assert "cannot read probe file" in line and "missing.yaml" in line
