"""moelab's own Llama-family decoder computes exactly what transformers' model computes (moelab/build/decoder.py),
and its plain tokenizer gives transformers' token ids."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moelab.build.decoder import decoder_model, decoder_spec, plain_tokenizer
from moelab.build.gates import encode_prompts
from moelab.build.layer_pass import LayerPass, prompt_batches, transformers_skeleton
from test_build_identical import PROMPTS

FAMILY_CASES = {
    "llama": ("llama", {}),
    "llama-biases-mha": ("llama", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral-window": ("mistral", dict(sliding_window=3)),
    "mistral-no-window": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}


def _prompt_tokens(tokenizer) -> list[list[list[int]]]:
    """Groups of token lists of mixed lengths (padded batches), a batch without padding and a 1-token prompt."""
    groups = [encode_prompts(tokenizer, prompts) for prompts in PROMPTS.values()]
    return groups + [[[tokenizer.bos_token_id, 5, 6, 7]] * 2, [[tokenizer.bos_token_id]]]


def _states(model, batches, weights: dict) -> list:
    """Every batch's router input at every layer, from LayerPass over `model` (a skeleton)."""
    layer_pass = LayerPass(model, batches, "cpu", streamed=True)
    layer_pass.embed(weights["model.embed_tokens.weight"])
    states = []
    for layer in range(layer_pass.num_layers):
        prefix = f"model.layers.{layer}."
        states.append(layer_pass.run_layer([(n, t) for n, t in weights.items() if n.startswith(prefix)]))
    return states


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_the_decoder_computes_what_transformers_computes(case, tiny_dense):
    family, overrides = FAMILY_CASES[case]
    folder = tiny_dense(f"dense-{case}", family, 3, **overrides)
    config = json.loads((folder / "config.json").read_text())
    spec = decoder_spec(config)
    assert spec is not None and spec.family == family
    tokens = _prompt_tokens(transformers.AutoTokenizer.from_pretrained(folder))
    weights = load_file(folder / "model.safetensors")
    reference = transformers_skeleton(folder, "cpu")
    assert reference.config._attn_implementation == "sdpa"

    ours = _states(decoder_model(spec, "cpu"), prompt_batches(tokens), weights)
    theirs = _states(reference, prompt_batches(tokens), weights)

    assert len(ours) == config["num_hidden_layers"]
    for layer_ours, layer_theirs in zip(ours, theirs):
        for a, b in zip(layer_ours, layer_theirs):
            assert torch.equal(a, b)
    assert not torch.equal(ours[0][0], ours[1][0])  # the layers did something


@pytest.mark.parametrize("config_change", [
    dict(model_type="phi3"), dict(hidden_act="gelu"), dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5,
                                                                            "factor": 8.0}),
    dict(rope_parameters=None, rope_theta=None), dict(rms_norm_eps=None), dict(use_sliding_window=True),
    dict(layer_types=["sliding_attention", "full_attention"]),
])
def test_configs_it_does_not_compute_exactly_go_to_transformers(config_change, tiny_dense):
    config = json.loads((tiny_dense("dense", "qwen2", 0) / "config.json").read_text())
    assert decoder_spec(config) is not None
    config.update(config_change)
    assert decoder_spec({k: v for k, v in config.items() if v is not None}) is None


def test_a_mistral_config_without_its_window_goes_to_transformers(tiny_dense):
    config = json.loads((tiny_dense("dense", "mistral", 0) / "config.json").read_text())
    del config["sliding_window"]  # its default has been 4096 and None in different releases
    assert decoder_spec(config) is None


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2", "mistral"])
def test_the_plain_tokenizer_gives_transformers_ids_or_leaves_it_to_transformers(family, tiny_dense):
    folder = tiny_dense("dense", family, 0)
    ours, theirs = plain_tokenizer(folder, family), transformers.AutoTokenizer.from_pretrained(folder)
    if family in ("qwen2", "mistral"):  # Qwen2Tokenizer, its own pre-tokenizer; mistral-common's where installed
        assert ours is None
        return
    assert type(theirs).__name__ == "TokenizersBackend"
    assert ours is not None and ours.bos_token_id == theirs.bos_token_id is not None
    texts = [t for prompts in PROMPTS.values() for t in prompts] + ["  spaces  and\ttabs\n", "<s> inside", "é😀"]
    assert encode_prompts(ours, texts) == encode_prompts(theirs, texts)


def test_the_plain_tokenizer_reads_smollm2s(smollm2_dir):
    ours, theirs = plain_tokenizer(smollm2_dir, "llama"), transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert ours.bos_token_id == theirs.bos_token_id is not None
    texts = [t for prompts in PROMPTS.values() for t in prompts] + ["<|im_start|>user\nHi<|im_end|>", "  x  "]
    assert encode_prompts(ours, texts) == encode_prompts(theirs, texts)


def test_a_tokenizer_with_settings_beyond_tokenizer_json_uses_transformers(tiny_dense):
    folder = tiny_dense("dense", "llama", 0)
    assert plain_tokenizer(folder, "llama") is not None
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "LlamaTokenizer"}))
    assert plain_tokenizer(folder, "llama") is None
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "bos_token": "<not-in-vocab>"}))
    assert plain_tokenizer(folder, "llama") is None
