"""moelab build on the real SmolLM2-135M-Instruct: the dense invariant, routing of held-out prompts, generation."""

from __future__ import annotations

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from moelab.build import BuildOptions, build_moe
from moelab.recipe import parse_recipe

pytestmark = pytest.mark.slow


def test_identical_smollm2_experts_give_the_dense_logits(tmp_path, smollm2_dir):
    text = yaml.safe_dump(dict(
        base_model=str(smollm2_dir), gate_mode="random", experts_per_token=2, allow_identical_experts=True,
        experts=[{"source_model": str(smollm2_dir)}] * 4))
    out = tmp_path / "moe"
    build_moe(parse_recipe(text), text, out, BuildOptions(show_progress=False))
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    results = []
    for folder in (smollm2_dir, out):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            results.append(model(ids).logits[0])
    torch.testing.assert_close(results[1], results[0], atol=2e-3, rtol=1e-3)


def routing_shares(model, tokenizer, prompts: list[str], num_experts: int) -> torch.Tensor:
    """Share of (token, layer) top-1 router choices that go to each expert."""
    counts = torch.zeros(num_experts)
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            router_logits = model(ids, output_router_logits=True).router_logits
        for layer_logits in router_logits:
            counts += torch.bincount(layer_logits.argmax(-1), minlength=num_experts).float()
    return counts / counts.sum()


def test_held_out_prompts_route_to_their_domain_expert(demo_moe_dir, heldout_prompts):
    model = AutoModelForCausalLM.from_pretrained(demo_moe_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_moe_dir)
    names = ["chat", "math", "code"]
    for expert, domain in enumerate(names):
        share = routing_shares(model, tokenizer, heldout_prompts[domain], len(names))
        print(f"{domain}: {share[expert]:.2f} of token-layer choices go to the {domain} expert")
        # Measured when written: chat 0.91, math 0.90, code 0.86.
        assert share[expert] > 0.75, (domain, share.tolist())


def test_demo_moe_generates_text(demo_moe_dir):
    model = AutoModelForCausalLM.from_pretrained(demo_moe_dir, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(demo_moe_dir)
    messages = [{"role": "user", "content": "What is 12, then plus 5, then times 2?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(answer)
    assert len(answer.split()) >= 3
