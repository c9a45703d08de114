"""Per-architecture knowledge as data: which dense families go in, how MoE tensors and config keys come out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from moelab.errors import MoelabError

DENSE_MLP = {
    "gate": "model.layers.{layer}.mlp.gate_proj.weight",
    "up": "model.layers.{layer}.mlp.up_proj.weight",
    "down": "model.layers.{layer}.mlp.down_proj.weight",
}
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Config keys a dense model and every expert must agree on for their tensors to be stacked into one MoE.
MATCHING_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads",
                 "num_key_value_heads")
# Base-config keys that describe the base file, not the architecture; the output config gets its own.
DROPPED_CONFIG_KEYS = ("architectures", "model_type", "auto_map", "transformers_version", "_name_or_path",
                       "quantization_config", "torch_dtype", "dtype", "_commit_hash", "mlp_bias", "attention_bias",
                       "pretraining_tp")


@dataclass(frozen=True)
class MoeLayout:
    arch_id: str
    model_type: str
    hf_architecture: str
    config_class: str
    input_families: tuple[str, ...]
    expert: dict[str, str]            # role (gate/up/down) -> tensor name with {layer} and {expert}
    router: str
    shared_expert: Optional[dict[str, str]] = None
    shared_expert_gate: Optional[str] = None
    # Extra config keys: {E} experts, {k} experts per token, {I} intermediate size, {shared_I} shared size.
    config: dict = field(default_factory=dict)


LAYOUTS = {
    "mixtral": MoeLayout(
        arch_id="mixtral", model_type="mixtral", hf_architecture="MixtralForCausalLM", config_class="MixtralConfig",
        input_families=("llama", "mistral"),
        expert={"gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
                "up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
                "down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"},
        router="model.layers.{layer}.block_sparse_moe.gate.weight",
        config={"num_local_experts": "{E}", "num_experts_per_tok": "{k}", "sliding_window": None,
                "router_jitter_noise": 0.0},
    ),
    "qwen2_moe": MoeLayout(
        arch_id="qwen2_moe", model_type="qwen2_moe", hf_architecture="Qwen2MoeForCausalLM",
        config_class="Qwen2MoeConfig", input_families=("llama", "mistral", "qwen2"),
        expert={"gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
                "up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
                "down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"},
        router="model.layers.{layer}.mlp.gate.weight",
        shared_expert={"gate": "model.layers.{layer}.mlp.shared_expert.gate_proj.weight",
                       "up": "model.layers.{layer}.mlp.shared_expert.up_proj.weight",
                       "down": "model.layers.{layer}.mlp.shared_expert.down_proj.weight"},
        shared_expert_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
        config={"num_experts": "{E}", "num_experts_per_tok": "{k}", "moe_intermediate_size": "{I}",
                "shared_expert_intermediate_size": "{shared_I}", "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None},
    ),
    "qwen3_moe": MoeLayout(
        arch_id="qwen3_moe", model_type="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM",
        config_class="Qwen3MoeConfig", input_families=("qwen3",),
        expert={"gate": "model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
                "up": "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight",
                "down": "model.layers.{layer}.mlp.experts.{expert}.down_proj.weight"},
        router="model.layers.{layer}.mlp.gate.weight",
        config={"num_experts": "{E}", "num_experts_per_tok": "{k}", "moe_intermediate_size": "{I}",
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                "use_sliding_window": False, "sliding_window": None},
    ),
}


def choose_layout(asked: Optional[str], family: str, has_shared_expert: bool) -> MoeLayout:
    """The output layout for dense models of `family`: the one asked for, else the natural one."""
    if family not in DENSE_FAMILIES:
        raise MoelabError(
            f"base model type '{family}' is not supported; moelab merges {', '.join(DENSE_FAMILIES)} models")
    if asked == "deepseek_moe":
        raise MoelabError("the DeepSeek-MoE output layout is not supported yet; use architecture: mixtral "
                          "(or qwen2_moe for a shared expert)")
    if asked is None:
        if family == "qwen3":
            asked = "qwen3_moe"
        elif family == "qwen2" or has_shared_expert:
            asked = "qwen2_moe"
        else:
            asked = "mixtral"
    layout = LAYOUTS[asked]
    if family not in layout.input_families:
        fits = [a for a, lay in LAYOUTS.items() if family in lay.input_families]
        raise MoelabError(
            f"architecture {asked} cannot be built from {family} models; for {family} use {' or '.join(fits)}")
    if has_shared_expert and layout.shared_expert is None:
        raise MoelabError(
            f"architecture {asked} has no shared expert; remove shared_experts, or use architecture: qwen2_moe"
            + ("" if family in LAYOUTS["qwen2_moe"].input_families else f" (with {family}: not possible)"))
    return layout


def moe_config_dict(layout: MoeLayout, base_config: dict, num_experts: int, experts_per_token: int,
                    has_shared_expert: bool, dtype: str) -> dict:
    """Keyword arguments for the output config class, from the base model's config.json."""
    for flag in ("attention_bias", "mlp_bias"):
        if base_config.get(flag) and layout.arch_id != "qwen3_moe":
            raise MoelabError(f"the base model has {flag}=true, which {layout.arch_id} cannot represent; "
                              "use a base without biases")
    config = {k: v for k, v in base_config.items() if k not in DROPPED_CONFIG_KEYS}
    values = {"{E}": num_experts, "{k}": experts_per_token, "{I}": base_config["intermediate_size"],
              "{shared_I}": base_config["intermediate_size"] if has_shared_expert else 0}
    config.update({key: values.get(v, v) if isinstance(v, str) else v for key, v in layout.config.items()})
    if layout.arch_id == "qwen2_moe":
        # Qwen2 attention has q/k/v biases; Llama and Mistral do not, and the config says which.
        config["qkv_bias"] = base_config.get("model_type") == "qwen2"
    if layout.arch_id == "qwen3_moe":
        config["attention_bias"] = bool(base_config.get("attention_bias", False))
    config["dtype"] = dtype
    config["architectures"] = [layout.hf_architecture]
    return config


def expert_tensor_names(layout: MoeLayout, layer: int, expert: int) -> dict[str, str]:
    return {role: name.format(layer=layer, expert=expert) for role, name in layout.expert.items()}


def dense_mlp_names(layer: int) -> dict[str, str]:
    return {role: name.format(layer=layer) for role, name in DENSE_MLP.items()}


def is_dense_mlp(name: str) -> bool:
    return name.startswith("model.layers.") and ".mlp." in name
