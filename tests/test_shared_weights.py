"""Shared (non-expert) weights: base, average, task_arithmetic and ties, and the warning about dropped changes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.build.merge import merge_shared, sum_of_squares
from moelab.build.tensors import SafetensorsFolder
from test_build import assert_one_line_error, build, logits, run_cli, write_recipe

ATTENTION = "model.layers.0.self_attn.q_proj.weight"
MLP = "model.layers.0.mlp.up_proj.weight"


def fine_tune(source: Path, out: Path, deltas: dict[str, float], seed: int = 0) -> tuple[Path, dict]:
    """A copy of `source` with seeded random changes of the given scale added to the named tensors."""
    shutil.copytree(source, out)
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    applied = {}
    for name, scale in deltas.items():
        delta = (torch.randn(tensors[name].shape, generator=generator) * scale).to(torch.bfloat16)
        tensors[name] = tensors[name] + delta
        applied[name] = tensors[name].float() - load_file(source / "model.safetensors")[name].float()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out, applied


def test_task_arithmetic_with_one_expert_adds_its_delta(tmp_path, tiny_dense):
    base = tiny_dense("base")
    expert, applied = fine_tune(base, tmp_path / "expert", {ATTENTION: 0.05, "model.norm.weight": 0.1})
    out = build(tmp_path, base_model=str(base), gate_mode="random", dtype="float32", shared_weights="task_arithmetic",
                experts=[{"source_model": str(base)}, {"source_model": str(expert)}])
    moe, source = SafetensorsFolder(out), SafetensorsFolder(base)
    for name, delta in applied.items():
        torch.testing.assert_close(moe.get(name), source.get(name).float() + delta, atol=1e-6, rtol=0)
    assert torch.equal(moe.get("model.layers.1.self_attn.k_proj.weight"),
                       source.get("model.layers.1.self_attn.k_proj.weight").float())


def test_average_is_the_mean_of_base_and_experts(tmp_path, tiny_dense):
    base = tiny_dense("base")
    one, _ = fine_tune(base, tmp_path / "one", {ATTENTION: 0.05}, seed=1)
    two, _ = fine_tune(base, tmp_path / "two", {ATTENTION: 0.05}, seed=2)
    out = build(tmp_path, base_model=str(base), gate_mode="random", dtype="float32", shared_weights="average",
                experts=[{"source_model": str(one)}, {"source_model": str(two)}])
    expected = torch.stack([SafetensorsFolder(m).get(ATTENTION).float() for m in (base, one, two)]).mean(dim=0)
    torch.testing.assert_close(SafetensorsFolder(out).get(ATTENTION), expected, atol=1e-6, rtol=0)


def test_ties_matches_a_hand_computation():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])
    e1 = base + torch.tensor([0.5, -0.1, 0.3, 0.0, -2.0])
    e2 = base + torch.tensor([-0.2, -0.4, 0.1, 0.6, 1.0])
    # density 0.6 keeps 3 of 5 entries: d1 -> [0.5, 0, 0.3, 0, -2.0], d2 -> [-0.2, -0.4, 0, 0.6, 1.0]
    # elected sign of the sums [0.3, -0.4, 0.3, 0.6, -1.0] -> [+, -, +, +, -]
    # agreeing entries: [0.5], [-0.4], [0.3], [0.6], [-2.0] -> disjoint means as they are
    merged = merge_shared("ties", base, [e1, e2], [1.0, 1.0], density=0.6)
    torch.testing.assert_close(merged, base + torch.tensor([0.5, -0.4, 0.3, 0.6, -2.0]))
    weighted = merge_shared("task_arithmetic", base, [e1, e2], [0.5, 2.0])
    torch.testing.assert_close(weighted, base + 0.5 * (e1 - base) + 2.0 * (e2 - base))


@pytest.mark.parametrize("mode", ["base", "average", "task_arithmetic", "ties"])
def test_identical_experts_stay_dense_in_every_mode(tmp_path, tiny_dense, mode):
    dense = tiny_dense("dense")
    out = build(tmp_path, base_model=str(dense), gate_mode="random", shared_weights=mode,
                allow_identical_experts=True, experts=[{"source_model": str(dense)}] * 3)
    torch.testing.assert_close(logits(out), logits(dense), atol=2e-4, rtol=1e-4)


def test_expert_with_other_shared_shapes_gets_a_one_line_error(tmp_path, tiny_dense):
    base, narrow = tiny_dense("base"), tiny_dense("narrow", seed=1, head_dim=8)
    path, _ = write_recipe(tmp_path, base_model=str(base), gate_mode="random", shared_weights="task_arithmetic",
                           experts=[{"source_model": str(base)}, {"source_model": str(narrow), "name": "narrow"}])
    assert_one_line_error(run_cli("build", path, tmp_path / "out"), "expert narrow", "has shape [16, 64]",
                          "shared_weights: base")
    assert not (tmp_path / "out").exists()


def test_dropped_changes_warn_for_attention_experts_only(tmp_path, tiny_dense):
    base = tiny_dense("base")
    attention, _ = fine_tune(base, tmp_path / "attention", {ATTENTION: 0.05, MLP: 0.05})
    mlp_only, _ = fine_tune(base, tmp_path / "mlp_only", {MLP: 0.05, "model.layers.1.mlp.down_proj.weight": 0.05})
    path, _ = write_recipe(tmp_path, base_model=str(base), gate_mode="random", experts=[
        {"source_model": str(attention), "name": "lora_all"}, {"source_model": str(mlp_only), "name": "mlp"}])
    result = run_cli("build", path, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "expert lora_all" in warnings[0] and "task_arithmetic" in warnings[0], warnings
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| lora_all |" in card and "| mlp | 0.00% |" in card


def test_merged_shared_weights_feed_the_hidden_gate_pass(tmp_path, tiny_dense):
    base = tiny_dense("base")
    expert, _ = fine_tune(base, tmp_path / "expert", {"model.embed_tokens.weight": 0.5,
                                                      "model.layers.0.self_attn.v_proj.weight": 0.5})
    fields = dict(base_model=str(base), gate_mode="hidden", dtype="float32", experts=[
        {"source_model": str(base), "positive_prompts": ["The answer is 42"]},
        {"source_model": str(expert), "positive_prompts": ["def add(a, b)"]}])
    plain = build(tmp_path, "plain", **fields)
    merged = build(tmp_path, "merged", shared_weights="task_arithmetic", **fields)
    router = "model.layers.1.block_sparse_moe.gate.weight"
    assert not torch.allclose(SafetensorsFolder(plain).get(router), SafetensorsFolder(merged).get(router), atol=1e-3)


def test_sum_of_squares_of_an_embedding_sized_delta_is_within_1e_5():
    """One float32 reduction over 16M entries is off by about a percent; chunks summed in float64 are not."""
    generator = torch.Generator().manual_seed(0)
    base = (torch.randn(8192, 2048, generator=generator) * 0.02).to(torch.bfloat16)
    tuned = (base.float() + 2e-4 * torch.randn(base.shape, generator=generator)).to(torch.bfloat16)
    exact = float(((tuned.double() - base.double()) ** 2).sum())
    assert sum_of_squares(tuned, base) == pytest.approx(exact, rel=1e-5)
    assert sum_of_squares(base) == pytest.approx(float((base.double() ** 2).sum()), rel=1e-5)
    one_reduction = float(torch.linalg.vector_norm(tuned - base, dtype=torch.float32)) ** 2
    assert abs(one_reduction / exact - 1) > 1e-4  # what the chunks are for
