"""Recipes as mergekit-moe reads them: architecture spellings, unknown keys, DeepSeek-MoE output, Phi-3 experts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, PretrainedConfig

from conftest import read_json
from moelab.build import BuildOptions, build_moe
from moelab.build.tensors import SafetensorsFolder
from moelab.errors import MoelabError
from moelab.recipe import parse_recipe
from test_build import assert_one_line_error, logits, run_cli

FIXTURES = Path(__file__).parent / "fixtures"
# mergekit-moe 0.1.5's output architectures, in its order (mergekit/moe/__init__.py), with moelab's ids.
MERGEKIT_NAMES = {"Mixtral": "mixtral", "DeepSeek MoE": "deepseek_moe", "Qwen MoE": "qwen2_moe",
                  "Qwen3 MoE": "qwen3_moe"}
PROMPTS = [["The answer is 42"], ["def add(a, b): return a + b"], ["Hello! How are you today?"]]


def recipe_with(architecture) -> str:
    return yaml.safe_dump({"base_model": "a", "architecture": architecture, "gate_mode": "random",
                           "experts": [{"source_model": "a"}]})


def mergekit_spellings() -> dict[str, tuple[str, ...]]:
    """Every value mergekit-moe accepts (a case-insensitive prefix of a name), with the ids it selects, in order."""
    spellings = {}
    for name in MERGEKIT_NAMES:
        for end in range(1, len(name) + 1):
            for spelling in {name[:end], name[:end].lower(), name[:end].upper()}:
                spellings[spelling] = tuple(i for n, i in MERGEKIT_NAMES.items()
                                            if n.lower().startswith(spelling.lower()))
    return spellings


def test_every_architecture_spelling_mergekit_accepts_means_the_same():
    spellings = mergekit_spellings()
    assert len(spellings) > 60 and spellings["qwen"] == ("qwen2_moe", "qwen3_moe")
    for spelling, meant in spellings.items():
        assert parse_recipe(recipe_with(spelling)).output_architectures() == meant, spelling
    for moelab_id in MERGEKIT_NAMES.values():
        assert parse_recipe(recipe_with(moelab_id)).output_architectures() == (moelab_id,)
    assert parse_recipe(recipe_with(None)).output_architectures() == tuple(MERGEKIT_NAMES.values())
    for refused in ("switch", "mixtral ", "qwen2", "deepseek-moe", "Qwen-MoE"):
        with pytest.raises(MoelabError, match=f"unknown architecture '{refused}'"):
            parse_recipe(recipe_with(refused))


SELECTION_CASES = {
    # case: (family, architecture, shared expert (None, "prompted", "unprompted"), layout built)
    "qwen-qwen3": ("qwen3", "qwen", None, "qwen3_moe"),
    "qwen-llama-prompted-shared": ("llama", "qwen", "prompted", "qwen2_moe"),
    "inferred-llama-unprompted-shared": ("llama", None, "unprompted", "deepseek_moe"),  # mergekit's choice too
    "inferred-llama-prompted-shared": ("llama", None, "prompted", "qwen2_moe"),
    "deep-llama": ("llama", "Deep", None, "deepseek_moe"),
    "M-mistral": ("mistral", "M", None, "mixtral"),
}


@pytest.mark.parametrize("case", SELECTION_CASES)
def test_a_spelling_builds_the_layout_mergekit_would(tmp_path, tiny_dense, case):
    family, architecture, shared, layout = SELECTION_CASES[case]
    a, b = tiny_dense("a", family, seed=0), tiny_dense("b", family, seed=1)
    fields = {"base_model": str(a), "gate_mode": "random", "experts": [{"source_model": str(m)} for m in (a, b)]}
    if architecture:
        fields["architecture"] = architecture
    if shared:
        fields["shared_experts"] = [{"source_model": str(a)} | ({"positive_prompts": ["x"]} if shared == "prompted"
                                                                else {})]
    text = yaml.safe_dump(fields)
    result = build_moe(parse_recipe(text), text, tmp_path / "moe", BuildOptions(show_progress=False))
    assert result.architecture == layout
    assert read_json(tmp_path / "moe" / "config.json")["model_type"] == {"deepseek_moe": "deepseek"}.get(layout, layout)
    needs_shared = layout in ("deepseek_moe", "qwen2_moe") and not shared
    assert any(w.startswith(f"llama.cpp loads {layout} only with a shared expert") for w in result.warnings) == (
        needs_shared)


def test_a_fine_spelling_of_an_impossible_combination_says_why(tmp_path, tiny_dense):
    qwen3, llama = tiny_dense("qwen3", "qwen3"), tiny_dense("llama")

    def build(base, architecture, shared_prompts=None):
        fields = {"base_model": str(base), "architecture": architecture, "gate_mode": "random",
                  "experts": [{"source_model": str(base)}]}
        if shared_prompts is not None:
            fields["shared_experts"] = [{"source_model": str(base), "positive_prompts": shared_prompts}]
        text = yaml.safe_dump(fields)
        with pytest.raises(MoelabError) as err:
            build_moe(parse_recipe(text), text, tmp_path / "out", BuildOptions(show_progress=False))
        assert not (tmp_path / "out").exists()
        return str(err.value)

    message = build(qwen3, "qwen", [])
    assert "'qwen' means qwen2_moe or qwen3_moe" in message and "qwen3_moe has no shared expert" in message
    assert "no layout takes qwen3 models with a shared expert" in message
    assert "qwen3_moe cannot be built from llama models (for llama use mixtral or deepseek_moe or qwen2_moe)" in (
        build(llama, "Qwen3"))
    assert "deepseek_moe has an ungated shared expert" in build(llama, "DeepSeek", ["x"])


NEAR_MISSES = {
    "gateway_mode": ("base_model: a\ngateway_mode: random\nexperts:\n  - {source_model: a}\n",
                     ["line 2", "unknown field 'gateway_mode'; did you mean gate_mode?"]),
    "yamlbase_model": ("yamlbase_model: a\nexperts:\n  - {source_model: a, positive_prompts: [x]}\n",
                       ["line 1", "did you mean base_model?"]),
    "num_experts_per_tok": ("base_model: a\nnum_experts_per_tok: 1\nexperts:\n  - {source_model: a, "
                            "positive_prompts: [x]}\n", ["did you mean experts_per_token?"]),
    "expert positive_prompt": ("base_model: a\nexperts:\n  - source_model: a\n    positive_prompt: [x]\n",
                               ["line 4", "'experts.0.positive_prompt'; did you mean positive_prompts?"]),
    "prompts as one string": ("base_model: a\nexperts:\n  - source_model: a\n    positive_prompts: What is 2 + 2?\n",
                              ["line 4", "'experts.0.positive_prompts' is one string; write a list",
                               'positive_prompts: ["What is 2 + 2?", "another prompt"]']),
    "router_training stays strict": ("base_model: a\ngate_mode: random\nrouter_training: {stepz: 3}\n"
                                     "experts:\n  - {source_model: a}\n", ["unknown field 'router_training.stepz'"]),
}


@pytest.mark.parametrize("case", NEAR_MISSES)
def test_a_near_miss_key_is_an_error_naming_the_field_meant(tmp_path, case):
    text, fragments = NEAR_MISSES[case]
    (tmp_path / "r.yaml").write_text(text)
    assert_one_line_error(run_cli("build", tmp_path / "r.yaml", tmp_path / "out"), *fragments)
    assert not (tmp_path / "out").exists()


def test_keys_mergekit_ignores_warn_once_each_and_the_build_goes_on(tmp_path, tiny_dense):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(a), "gate_mode": "random", "tokenizer": {"source": "base"}, "merge_method": "moe",
        "parameters": {"weight": 1.0},
        "experts": [{"source_model": str(a), "parameters": {"density": 0.5}}, {"source_model": str(b)},
                    {"source_model": str(b), "description": "a second copy"}]}, sort_keys=False))
    result = run_cli("build", recipe, tmp_path / "moe", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: recipe key")]
    assert warned == [f"warning: recipe key '{key}' is not used by moelab (mergekit-moe ignores it too); it is ignored"
                      for key in ("tokenizer", "merge_method", "parameters", "experts.0.parameters",
                                  "experts.2.description")], result.stderr
    assert "3 experts is not a power of two" in result.stderr
    assert read_json(tmp_path / "moe" / "config.json")["num_local_experts"] == 3


# Keys every transformers config writes for itself (id2label, return_dict, ...): not the model's.
GENERIC_CONFIG_KEYS = set(PretrainedConfig().to_dict()) | {"_name_or_path"}


def test_deepseek_output_has_mergekit_moes_layout_and_config(tmp_path, tiny_tokenizer_dir):
    from conftest import make_tiny_dense

    fixture = read_json(FIXTURES / "mergekit_deepseek_layout.json")  # scripts/check_deepseek.py --fixture
    rope = {"rope_type": "default", "rope_theta": 1e6}
    for i in range(4):
        make_tiny_dense(tmp_path / f"llama{i}", "llama", i, tiny_tokenizer_dir, rope_parameters=rope)
    text = yaml.safe_dump(fixture["recipe"] | {"gate_mode": "random"}, sort_keys=False)
    result = build_moe(parse_recipe(text), text, tmp_path / "moe", BuildOptions(show_progress=False),
                       recipe_dir=tmp_path)
    assert result.architecture == "deepseek_moe"

    tensors = SafetensorsFolder(tmp_path / "moe")
    assert sorted(tensors.names()) == sorted(fixture["tensors"])
    for name, expected in fixture["tensors"].items():
        shape, dtype = tensors.info(name)
        assert (list(shape), dtype) == (expected["shape"], {"bfloat16": "BF16"}[expected["dtype"]]), name
    ours, theirs = read_json(tmp_path / "moe" / "config.json"), fixture["config"]
    model_keys = set(theirs) - GENERIC_CONFIG_KEYS - {"transformers_version"}
    assert {k: ours.get(k) for k in model_keys} == {k: theirs[k] for k in model_keys}
    # Read by DeepSeek's own modelling code, which predates transformers 5's rope_parameters.
    assert set(ours) - set(theirs) == {"rope_theta", "rope_scaling"}
    assert (ours["rope_theta"], ours["rope_scaling"]) == (1e6, None)

    card = (tmp_path / "moe" / "README.md").read_text()
    assert "trust_remote_code=True" in card and "deepseek-ai/deepseek-moe-16b-base" in card


@pytest.mark.parametrize("rope", ["default", "longrope+sliding_window"])
def test_phi3_identical_experts_give_the_dense_phi3s_logits_as_a_native_mixtral(tmp_path, tiny_dense, rope):
    overrides = {}
    if rope != "default":  # 9 test tokens: past the window (3) and original_max_position_embeddings (4)
        overrides = dict(sliding_window=3, original_max_position_embeddings=4, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1 + i / 8 for i in range(8)],
            "long_factor": [2.0 + i for i in range(8)]})
    dense = tiny_dense("phi3", "phi3", **overrides)
    fields = {"base_model": str(dense), "gate_mode": "random", "allow_identical_experts": True,
              "experts": [{"source_model": str(dense), "positive_prompts": p} for p in PROMPTS[:2]]}
    text = yaml.safe_dump(fields)
    result = build_moe(parse_recipe(text), text, tmp_path / "moe", BuildOptions(show_progress=False))

    assert result.architecture == "mixtral"
    names = SafetensorsFolder(tmp_path / "moe").names()
    assert "model.layers.1.self_attn.k_proj.weight" in names and not any("qkv_proj" in n for n in names)
    assert "model.layers.1.block_sparse_moe.experts.1.w3.weight" in names
    config = read_json(tmp_path / "moe" / "config.json")
    assert config["model_type"] == "mixtral" and "auto_map" not in config
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = (1, 5, 17, 42, 99, 7, 3, 8, 9)
    torch.testing.assert_close(logits(tmp_path / "moe", ids), logits(dense, ids), atol=2e-4, rtol=1e-4)
    assert any(w.startswith("longrope") for w in result.warnings) == (rope != "default")


def test_phi3_rope_mixtral_cannot_express_is_refused(tmp_path, tiny_dense):
    dense = tiny_dense("phi4mini", "phi3", rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                             "partial_rotary_factor": 0.75})
    text = yaml.safe_dump({"base_model": str(dense), "gate_mode": "random", "experts": [{"source_model": str(dense)}]})
    with pytest.raises(MoelabError, match="rotates 75% of each head.*Mixtral rotates whole heads"):
        build_moe(parse_recipe(text), text, tmp_path / "out", BuildOptions(show_progress=False))


@pytest.mark.parametrize("model_type, reason", [
    ("phi", "run attention and the MLP in parallel from one biased LayerNorm"),
    ("gemma", "multiplies the embeddings by sqrt(hidden_size) at run time"),
    ("gemma2", "soft-caps attention and final logits"),
    ("gemma3_text", "alternates local and global RoPE"),
])
def test_phi2_and_gemma_say_exactly_why_no_moe_class_holds_them(tmp_path, tiny_dense, model_type, reason):
    dense = tiny_dense("dense")
    other = tmp_path / model_type
    shutil.copytree(dense, other)  # the families are told apart by config.json alone
    config = read_json(other / "config.json")
    (other / "config.json").write_text(json.dumps(config | {"model_type": model_type}))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(other), "gate_mode": "random",
                                                     "experts": [{"source_model": str(other)}]}))
    assert_one_line_error(run_cli("build", tmp_path / "r.yaml", tmp_path / "out"),
                          f"{model_type} models cannot become a MoE", reason, "so none can hold it")
