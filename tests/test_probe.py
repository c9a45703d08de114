"""Routing capture on tiny MoE models whose routers are set by hand, so the expected routing is known exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
import yaml

from moelab.build.gates import encode_prompts
from moelab.errors import MoelabError
from moelab.probe import (find_routers, load_labelled_prompts, load_moe, probe_routing, route_tokens,
                          save_heatmap)

FIXTURES = Path(__file__).parent / "fixtures" / "probe"
HIDDEN = 64
MOE_CONFIGS = {
    # layout: (config class, keyword for the number of experts, extra config)
    "mixtral": ("MixtralConfig", "num_local_experts", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "num_experts",
                  {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1,
                   "norm_topk_prob": True}),
    "qwen3_moe": ("Qwen3MoeConfig", "num_experts", {"moe_intermediate_size": 32, "decoder_sparse_step": 1,
                                                    "norm_topk_prob": True}),
}


def make_tiny_moe(out: Path, tokenizer_dir: Path, layout: str, num_experts: int = 3, top_k: int = 1,
                  num_layers: int = 3, layer_shift: int = 1, hand_routed: bool = True, seed: int = 0) -> Path:
    """A tiny float32 MoE. Hand-routed: attention and MLP outputs are zero, so every layer's router reads the
    normalized token embedding; token t's embedding is 4 on dimension t % E and 2 on (t + 1) % E, and layer l's
    router row for expert e reads dimension (e + l * layer_shift) % E. So layer l ranks expert
    (t - l * layer_shift) % E first and (t + 1 - l * layer_shift) % E second."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    class_name, experts_key, extra = MOE_CONFIGS[layout]
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        num_experts_per_tok=top_k, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **{experts_key: num_experts}, **extra)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if hand_routed:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "o_proj" in name or "down_proj" in name:
                    param.zero_()
            embedding = torch.zeros(len(tokenizer), HIDDEN)
            tokens = torch.arange(len(tokenizer))
            embedding[tokens, tokens % num_experts] = 4.0
            embedding[tokens, (tokens + 1) % num_experts] = 2.0
            model.get_input_embeddings().weight.copy_(embedding)
            for router in find_routers(model):
                rows = torch.zeros(num_experts, HIDDEN)
                for e in range(num_experts):
                    rows[e, (e + router.layer * layer_shift) % num_experts] = 1.0
                router.module.weight.copy_(rows)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def expected_routing(token_ids, num_layers: int, num_experts: int, layer_shift: int = 1):
    """(tokens, layers, 2) expert ids, and the top-2 weights renormalized (the same for every token)."""
    t = np.asarray(token_ids)[:, None]
    layers = np.arange(num_layers)[None, :] * layer_shift
    first, second = (t - layers) % num_experts, (t + 1 - layers) % num_experts
    scale = np.sqrt((4.0 ** 2 + 2.0 ** 2) / HIDDEN)  # RMSNorm of the embedding
    logits = np.array([4.0, 2.0]) / scale
    weights = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return np.stack([first, second], axis=-1), weights


@pytest.mark.parametrize("layout", MOE_CONFIGS)
def test_trace_equals_the_hand_set_routing(tmp_path, tiny_tokenizer_dir, layout):
    folder = make_tiny_moe(tmp_path / layout, tiny_tokenizer_dir, layout, num_experts=3, top_k=2)
    moe = load_moe(str(folder), device="cpu")
    token_ids = [1, 5, 17, 42, 99, 7, 3, 200]

    trace = route_tokens(moe, token_ids)

    expected_ids, expected_weights = expected_routing(token_ids, num_layers=3, num_experts=3)
    assert trace.layers == [0, 1, 2] and trace.expert_names == ["E0", "E1", "E2"]
    assert trace.expert_ids.shape == (8, 3, 2) and trace.token_ids == token_ids
    np.testing.assert_array_equal(trace.expert_ids, expected_ids)
    np.testing.assert_allclose(trace.expert_weights, np.broadcast_to(expected_weights, (8, 3, 2)), atol=1e-4)
    top, share = trace.top_expert_per_token()
    # 3 layers each rank a different expert first, so no expert has a majority beyond 1 of 3 layers.
    np.testing.assert_allclose(share, 1 / 3)
    assert trace.usage().tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.05)


def test_single_expert_per_token_and_majority(tmp_path, tiny_tokenizer_dir):
    folder = make_tiny_moe(tmp_path / "moe", tiny_tokenizer_dir, "mixtral", num_experts=4, top_k=1, layer_shift=0)
    moe = load_moe(str(folder), device="cpu")
    trace = route_tokens(moe, [4, 5, 6, 7, 8])
    assert trace.expert_ids.shape == (5, 3, 1)
    np.testing.assert_array_equal(trace.expert_ids[:, :, 0], [[0] * 3, [1] * 3, [2] * 3, [3] * 3, [0] * 3])
    np.testing.assert_allclose(trace.expert_weights, 1.0)
    top, share = trace.top_expert_per_token()
    assert top.tolist() == [0, 1, 2, 3, 0] and share.tolist() == [1.0] * 5
    assert trace.usage().tolist() == [0.4, 0.2, 0.2, 0.2]


def test_expert_names_come_from_moelab_json_then_the_recipe(tmp_path, tiny_tokenizer_dir):
    folder = make_tiny_moe(tmp_path / "moe", tiny_tokenizer_dir, "qwen3_moe")
    (folder / "moelab_recipe.yaml").write_text(yaml.safe_dump({
        "base_model": "x", "gate_mode": "random",
        "experts": [{"source_model": "x", "name": n} for n in ("chat", "math", "code")]}))
    assert load_moe(str(folder), device="cpu").expert_names == ["chat", "math", "code"]
    (folder / "moelab.json").write_text(json.dumps({"experts": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}))
    assert load_moe(str(folder), device="cpu").expert_names == ["a", "b", "c"]



@pytest.mark.parametrize("architecture, shared", [("mixtral", False), ("qwen2_moe", True)])
def test_built_checkpoints_from_elsewhere_match_the_models_own_router_logits(tmp_path, tiny_dense, architecture,
                                                                              shared):
    """A moelab build written with per-expert tensor names (mergekit-moe's layout), stripped of moelab's own files
    as a checkpoint from elsewhere would be: the trace agrees with transformers' `output_router_logits`."""
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import parse_recipe

    dense = [tiny_dense(f"d{seed}", seed=seed) for seed in range(3)]
    recipe = {"base_model": str(dense[0]), "gate_mode": "random", "experts_per_token": 2,
              "architecture": architecture, "experts": [{"source_model": str(d)} for d in dense]}
    if shared:
        recipe["shared_experts"] = [{"source_model": str(dense[0])}]
    text = yaml.safe_dump(recipe)
    out = tmp_path / "moe"
    build_moe(parse_recipe(text), text, out, BuildOptions(show_progress=False))
    (out / "moelab.json").unlink()
    (out / "moelab_recipe.yaml").rename(out / "mergekit_moe_config.yml")

    moe = load_moe(str(out), device="cpu", dtype="float32")
    token_ids = [1, 5, 17, 42, 99, 7, 3]
    trace = route_tokens(moe, token_ids)

    with torch.no_grad():
        router_logits = moe.model(torch.tensor([token_ids]), output_router_logits=True).router_logits
    expected = torch.stack([logits.softmax(-1).topk(2, dim=-1).indices for logits in router_logits], dim=1)
    assert moe.expert_names == ["E0", "E1", "E2"] and trace.layers == [0, 1]
    np.testing.assert_array_equal(trace.expert_ids, expected.numpy())

def test_a_dense_model_is_refused(tiny_dense):
    with pytest.raises(MoelabError, match="not a Mixture-of-Experts model: the config.json of .* has no experts"):
        load_moe(str(tiny_dense("dense")), device="cpu")


def test_probe_confusion_accuracy_and_balance(tmp_path, tiny_tokenizer_dir):
    # Every layer sends token t to expert t % 3, so the expected counts follow from the token ids alone.
    folder = make_tiny_moe(tmp_path / "moe", tiny_tokenizer_dir, "mixtral", num_experts=3, top_k=1, layer_shift=0)
    (folder / "moelab.json").write_text(json.dumps({"experts": [{"name": n} for n in ("chat", "math", "code")]}))
    moe = load_moe(str(folder), device="cpu")
    prompts = load_labelled_prompts(FIXTURES / "tiny.yaml", moe.expert_names)

    result = probe_routing(moe, prompts)

    confusion = np.zeros((3, 3), dtype=int)
    prompt_confusion = np.zeros((3, 3), dtype=int)
    for prompt, ids in zip(prompts, encode_prompts(moe.tokenizer, [p.text for p in prompts])):
        counts = np.bincount(np.asarray(ids[1:]) % 3, minlength=3) * 3  # BOS left out; 3 layers
        confusion[moe.expert_names.index(prompt.expert)] += counts
        prompt_confusion[moe.expert_names.index(prompt.expert), counts.argmax()] += 1
    np.testing.assert_array_equal(result.confusion, confusion)
    np.testing.assert_array_equal(result.prompt_confusion, prompt_confusion)
    assert result.accuracy() == pytest.approx(np.trace(confusion) / confusion.sum())
    usage = confusion.sum(axis=0) / confusion.sum()
    assert result.load_balance_cv() == pytest.approx(usage.std() / usage.mean())
    assert result.num_tokens == confusion.sum() // 3 and result.num_prompts == len(prompts) == 6
    report = result.to_json()
    assert report["accuracy_per_expert"]["math"] == pytest.approx(confusion[1, 1] / confusion[1].sum(), abs=1e-6)
    np.testing.assert_allclose(np.asarray(report["confusion_shares"]).sum(axis=1), 1.0, atol=1e-5)


def test_jsonl_probe_files_and_their_errors(tmp_path):
    names = ["chat", "math"]
    good = tmp_path / "good.jsonl"
    good.write_text('{"expert": "math", "text": "2 + 2"}\n\n{"expert": "chat", "text": "hi"}\n')
    assert [(p.expert, p.text) for p in load_labelled_prompts(good, names)] == [("math", "2 + 2"), ("chat", "hi")]
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"expert": "math", "text": "1"}\n{"expert": "poetry", "text": "roses"}\n')
    with pytest.raises(MoelabError, match="line 2: unknown expert 'poetry'; this model's experts are chat, math"):
        load_labelled_prompts(unknown, names)
    missing = tmp_path / "missing.yaml"
    missing.write_text("- expert: math\n  text: one\n- expert: chat\n")
    with pytest.raises(MoelabError, match="item 2: expected"):
        load_labelled_prompts(missing, names)
    with pytest.raises(MoelabError, match="cannot read probe file"):
        load_labelled_prompts(tmp_path / "nope.yaml", names)


def test_heatmap_for_30_layers_and_200_tokens(tmp_path, tiny_tokenizer_dir):
    folder = make_tiny_moe(tmp_path / "moe", tiny_tokenizer_dir, "qwen2_moe", num_experts=3, num_layers=30)
    moe = load_moe(str(folder), device="cpu")
    trace = route_tokens(moe, list(range(1, 201)))
    trace.num_prompt_tokens = 120
    png = save_heatmap(trace, tmp_path / "plots" / "routing.png")
    from PIL import Image

    width, height = Image.open(png).size
    assert width >= 1500 and height >= 1000
    assert [p.name for p in png.parent.iterdir()] == ["routing.png"]


@pytest.mark.slow
def test_demo_moe_probe_trace_and_heatmap(tmp_path, demo_moe_dir):
    """The real SmolLM2 demo MoE: routing of a labelled file of held-out prompts, a traced answer, its heatmap."""
    from rich.console import Console

    from moelab.chat import ChatSession, GenerationSettings, probe_view

    moe = load_moe(str(demo_moe_dir), device="cpu")
    assert moe.expert_names == ["chat", "math", "code"] and moe.layers == list(range(30))

    result = probe_routing(moe, load_labelled_prompts(FIXTURES / "smollm2.yaml", moe.expert_names))
    Console(width=100).print(probe_view(result))  # what `moelab chat --probe` prints; shown with pytest -s
    # Measured when written: 90.6% of token-layer choices, all 24 prompts by majority, CV 0.125.
    assert result.accuracy() > 0.75 and result.prompt_accuracy() > 0.9 and result.load_balance_cv() < 0.5

    _, trace = ChatSession(moe, GenerationSettings(max_new_tokens=20, temperature=0)).ask("What is 12 times 7?")
    assert trace.expert_ids.shape == (len(trace), 30, 1) and len(trace) > trace.num_prompt_tokens > 10
    np.testing.assert_allclose(trace.expert_weights, 1.0)  # one expert per token: its weight is 1
    png = save_heatmap(trace, tmp_path / "demo.png")
    assert png.stat().st_size > 20_000
