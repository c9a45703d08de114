"""gate_modes trained and ridge: router rows fitted to each expert's data, measured on held-out tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moelab.build.router_training import read_router_data, ridge_routers, routing_quality
from moelab.build.tensors import SafetensorsFolder
from moelab.errors import MoelabError
from moelab.recipe import RouterTraining
from test_build import build, logits

DIGITS = ["12 34 56 78 90", "7 plus 8 is 15", "3 times 4 is 12", "99 minus 9 is 90", "42 and 17 and 5"]
CODE = ["def add(a, b): return a", "class Model(nn.Module): pass", "import os\nimport sys", "return self.x"]


def write_data(folder: Path, name: str, rows: list[str]) -> str:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path.name


def trained_recipe(folder: Path, source: Path, **extra) -> dict:
    fields = dict(base_model=str(source), gate_mode="trained", experts_per_token=1, allow_identical_experts=True,
                  router_training={"examples": 40, "steps": 60},
                  experts=[{"source_model": str(source), "name": "math", "positive_prompts": ["The answer is 42"],
                            "router_data": write_data(folder, "math", DIGITS * 8)},
                           {"source_model": str(source), "name": "code", "positive_prompts": ["def add(a, b)"],
                            "router_data": write_data(folder, "code", CODE * 10)}])
    fields.update(extra)
    return fields


def test_trained_gates_are_deterministic_and_route_better(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    first = build(tmp_path, "first", **trained_recipe(tmp_path, dense))
    second = build(tmp_path, "second", **trained_recipe(tmp_path, dense))
    name = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.equal(SafetensorsFolder(first).get(name), SafetensorsFolder(second).get(name))
    routing = json.loads((first / "moelab.json").read_text())["routing"]
    assert set(routing["trained"]["accuracy"]) == {"math", "code"} and routing["heldout_tokens"] > 0
    assert routing["trained"]["overall"] >= routing["hidden"]["overall"]
    assert routing["trained"]["overall"] > 0.9
    assert "## Routing" in (first / "README.md").read_text()


def test_trained_gates_keep_identical_experts_dense(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    out = build(tmp_path, **trained_recipe(tmp_path, dense, experts_per_token=2))
    torch.testing.assert_close(logits(out), logits(dense), atol=2e-4, rtol=1e-4)


def two_domains(tokens: int, noise_seed: int):
    """(L=2, N, H=16) features of two domains: a large mean shared by both (as after a norm), plus each domain's
    own direction and noise; labels 0/1, domain 1 three times as frequent."""
    geometry = torch.Generator().manual_seed(0)
    shared, own = 5 * torch.randn(16, generator=geometry), torch.randn(2, 16, generator=geometry)
    labels = torch.cat([torch.zeros(tokens, dtype=torch.long), torch.ones(3 * tokens, dtype=torch.long)])
    noise = torch.randn(2, len(labels), 16, generator=torch.Generator().manual_seed(noise_seed))
    return shared + own[labels] + 0.5 * noise, labels


def test_ridge_routes_two_synthetic_domains():
    features, labels = two_domains(200, noise_seed=1)
    options = RouterTraining()
    gates = ridge_routers(features, labels, 2, options)
    assert gates.shape == (2, 2, 16)
    quality = routing_quality(gates, *two_domains(100, noise_seed=2), ["a", "b"])
    assert min(quality.accuracy.values()) > 0.97  # the rarer domain is not swallowed by the frequent one
    # With little penalty, the logit gap between a token's own expert and the other is about `margin` on average;
    # the default penalty shrinks it.
    light = ridge_routers(features, labels, 2, RouterTraining(alpha=1e-4))
    logits = torch.einsum("lnh,leh->lne", features, light)
    gap = (logits[..., 1] - logits[..., 0]) * (2 * labels - 1)
    assert float(gap.mean()) == pytest.approx(options.margin, rel=0.1)
    shrunk = torch.einsum("lnh,leh->lne", features, gates)
    assert 0 < float(((shrunk[..., 1] - shrunk[..., 0]) * (2 * labels - 1)).mean()) < float(gap.mean())
    doubled = ridge_routers(features, labels, 2, RouterTraining(margin=2 * options.margin))
    torch.testing.assert_close(doubled, 2 * gates)
    torch.testing.assert_close(ridge_routers(features, labels, 2, options), gates, atol=0, rtol=0)


def test_ridge_build_routes_and_reports(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    out = build(tmp_path, **trained_recipe(tmp_path, dense, gate_mode="ridge"))
    meta = json.loads((out / "moelab.json").read_text())
    routing = meta["routing"]
    assert meta["gate_mode"] == "ridge" and routing["mode"] == "ridge" and "trained" not in routing
    assert routing["ridge"]["overall"] > 0.9 and routing["ridge"]["overall"] >= routing["hidden"]["overall"]
    assert routing["fit_s"] < 5
    card = (out / "README.md").read_text()
    assert "| expert | hidden | ridge |" in card and f"| **overall** | {routing['hidden']['overall']:.3f} | " \
        f"{routing['ridge']['overall']:.3f} |" in card


def test_routing_quality_by_hand():
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]]])  # one layer, three tokens
    gates = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    labels = torch.tensor([0, 1, 1])
    quality = routing_quality(gates, features, labels, ["a", "b"])
    assert quality.accuracy == {"a": 1.0, "b": 0.5} and quality.overall == 0.75
    usage = torch.tensor([2 / 3, 1 / 3])
    assert quality.balance_cv == pytest.approx(float(usage.std(unbiased=False) / usage.mean()))


def test_router_data_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    (tmp_path / "b.jsonl").write_text('{"question": "q?", "answer": 3, "solution": "s."}\n{"text": "t"}\n')
    (tmp_path / "c.jsonl").write_text("not json\n")
    assert read_router_data(tmp_path / "a.txt") == ["first line", "second line"]
    assert read_router_data(tmp_path / "b.jsonl") == ["q? s.", "t"]
    with pytest.raises(MoelabError, match="line 1 is not JSON"):
        read_router_data(tmp_path / "c.jsonl")


def test_too_few_examples_to_hold_out_is_a_clear_error(tmp_path, tiny_dense):
    fields = trained_recipe(tmp_path, tiny_dense("dense"), gate_mode="ridge")
    for expert in fields["experts"]:
        del expert["router_data"]  # one positive prompt each: nothing to hold out
    with pytest.raises(MoelabError, match="no expert has the 2 or more examples"):
        build(tmp_path, **fields)
    assert not (tmp_path / "moe").exists()


def test_missing_router_data_is_a_clear_error(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    fields = trained_recipe(tmp_path, dense)
    fields["experts"][0]["router_data"] = "nowhere.jsonl"
    with pytest.raises(MoelabError, match="data file 'nowhere.jsonl' not found"):
        build(tmp_path, **fields)
    assert not (tmp_path / "moe").exists()


@pytest.mark.slow
def test_trained_gates_beat_hidden_on_smollm2(tmp_path, smollm2_dir):
    """Three real domains (chat, math word problems, Python code) from moelab's router data."""
    source = str(smollm2_dir)
    demo = yaml.safe_load((Path(__file__).parents[1] / "moelab" / "recipes" / "demo-smollm2.yaml").read_text())
    experts = [{"source_model": source, "name": e["name"], "positive_prompts": e["positive_prompts"],
                "router_data": f"pkg:moelab/data/router/{e['name']}.jsonl"} for e in demo["experts"]]
    out = build(tmp_path, base_model=source, gate_mode="trained", experts_per_token=1,
                allow_identical_experts=True, experts=experts)
    routing = json.loads((out / "moelab.json").read_text())["routing"]
    hidden, trained = routing["hidden"], routing["trained"]
    print(f"held-out routing accuracy: hidden {hidden['overall']:.3f}, trained {trained['overall']:.3f}; "
          f"imbalance (CV): hidden {hidden['balance_cv']:.3f}, trained {trained['balance_cv']:.3f}")
    # Measured when written: hidden 0.858 -> trained 0.985; CV 0.173 -> 0.011.
    assert trained["overall"] >= hidden["overall"] + 0.08
    assert min(trained["accuracy"].values()) > 0.9
    assert trained["balance_cv"] <= hidden["balance_cv"] + 0.02
