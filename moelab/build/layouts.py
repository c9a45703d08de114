"""Per-architecture knowledge as data: which dense families go in, how MoE tensors and config keys come out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from moelab.errors import MoelabError


def _swiglu(prefix: str) -> dict[str, str]:
    """Role (gate/up/down) -> tensor name of the MLP at `prefix` (with {layer} and {expert} placeholders)."""
    return {role: f"{prefix}.{role}_proj.weight" for role in ("gate", "up", "down")}


DENSE_MLP = _swiglu("model.layers.{layer}.mlp")
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base"  # the Hub repo with DeepSeek-MoE's modelling code


@dataclass(frozen=True)
class DenseFamily:
    """A dense input family, read as the Llama layout (q/k/v/o_proj, gate/up/down_proj)."""
    model_type: str
    # Fused tensors split on the way in: suffix -> the Llama tensors it stacks by rows, in order, each with its row
    # count as a product of config sizes.
    fused: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = field(default_factory=dict)
    kept_config: tuple[str, ...] = ()  # base config keys kept over the output layout's own values
    check: Optional[Callable[[dict], list[str]]] = None  # raises MoelabError for configs no layout holds; warnings


def _phi3_check(config: dict) -> list[str]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise MoelabError(
            f"this Phi-3 model rotates {partial:.0%} of each head (partial_rotary_factor={partial}, as Phi-4-mini "
            "does); Mixtral rotates whole heads, so it cannot hold it; use Phi-3 experts with full rotary")
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su", "yarn"):
        return ["longrope: each forward pass of the Mixtral output equals Phi-3's, but transformers' Phi-3 "
                "recomputes its KV cache when generation crosses original_max_position_embeddings "
                f"({config.get('original_max_position_embeddings')} tokens) and Mixtral does not"]
    return []


DENSE_FAMILIES = {
    "llama": DenseFamily("llama"),
    "mistral": DenseFamily("mistral"),
    "qwen2": DenseFamily("qwen2"),
    "qwen3": DenseFamily("qwen3"),
    "phi3": DenseFamily(
        "phi3",
        fused={"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", ("num_attention_heads", "head_dim")),
                                             ("self_attn.k_proj.weight", ("num_key_value_heads", "head_dim")),
                                             ("self_attn.v_proj.weight", ("num_key_value_heads", "head_dim"))),
               "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", ("intermediate_size",)),
                                           ("mlp.up_proj.weight", ("intermediate_size",)))},
        kept_config=("sliding_window",), check=_phi3_check),
}
# Dense families that no MoE class of transformers can hold, and exactly why.
_SEQUENTIAL_MOE = ("every native MoE class (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek) runs attention, then a gated "
                   "SiLU/GELU MLP, each after a plain RMSNorm")
_GEMMA_NORM = "its RMSNorm multiplies by (1 + weight) and it multiplies the embeddings by sqrt(hidden_size) at run time"
UNREPRESENTABLE_FAMILIES = {
    "phi": ("Phi-1/Phi-2 layers run attention and the MLP in parallel from one biased LayerNorm, the MLP is "
            "fc1 -> GELU -> fc2 with biases and no gate, and only part of each head is rotated; "
            f"{_SEQUENTIAL_MOE}, so none can hold it"),
    "gemma": (f"{_GEMMA_NORM}, while tying them to lm_head; {_SEQUENTIAL_MOE} on unscaled embeddings, so none "
              "can hold it"),
    "gemma2": (f"{_GEMMA_NORM}, normalizes each sublayer's output too (4 norms per layer) and soft-caps attention "
               f"and final logits; {_SEQUENTIAL_MOE} and no soft-capping, so none can hold it"),
    "gemma3": (f"{_GEMMA_NORM}, normalizes each sublayer's output and q/k (6 norms per layer) and alternates local "
               f"and global RoPE; {_SEQUENTIAL_MOE}, so none can hold it"),
}
UNREPRESENTABLE_FAMILIES["gemma3_text"] = UNREPRESENTABLE_FAMILIES["gemma3"]
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
    config_class: Optional[str]  # None: config.json is written as a plain dict
    input_families: tuple[str, ...]
    expert: dict[str, str]            # role (gate/up/down) -> tensor name with {layer} and {expert}
    router: str
    shared_expert: Optional[dict[str, str]] = None
    shared_expert_gate: Optional[str] = None  # None: the shared expert is always on, with weight 1 (no prompts)
    empty_shared_slot: bool = False  # without a shared expert, one of size 0 is still written
    # llama.cpp's loader for this layout requires a shared expert of full size (src/models/<arch>.cpp).
    llama_cpp_needs_shared_expert: bool = False
    # Extra config keys: {E} experts, {k} experts per token, {I} intermediate size, {shared_I} shared size,
    # {shared_n} number of shared experts (None when there is none).
    config: dict = field(default_factory=dict)
    # Modelling code outside transformers (a Hub repo): config.json is written as a plain dict, with rope_theta and
    # rope_scaling as that code reads them, and the head size it derives (hidden_size / num_attention_heads).
    remote_code: Optional[str] = None


LAYOUTS = {
    "mixtral": MoeLayout(
        arch_id="mixtral", model_type="mixtral", hf_architecture="MixtralForCausalLM", config_class="MixtralConfig",
        input_families=("llama", "mistral", "phi3"),
        expert={"gate": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight",
                "up": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w3.weight",
                "down": "model.layers.{layer}.block_sparse_moe.experts.{expert}.w2.weight"},
        router="model.layers.{layer}.block_sparse_moe.gate.weight",
        config={"num_local_experts": "{E}", "num_experts_per_tok": "{k}", "sliding_window": None,
                "router_jitter_noise": 0.0},
    ),
    # DeepSeek-MoE (V1), as mergekit-moe writes it: every layer MoE, softmax top-k renormalized, and an optional
    # ungated shared expert added to every token's output.
    "deepseek_moe": MoeLayout(
        arch_id="deepseek_moe", model_type="deepseek", hf_architecture="DeepseekForCausalLM", config_class=None,
        input_families=("llama", "mistral"),
        expert=_swiglu("model.layers.{layer}.mlp.experts.{expert}"),
        router="model.layers.{layer}.mlp.gate.weight",
        shared_expert=_swiglu("model.layers.{layer}.mlp.shared_experts"),
        config={"n_routed_experts": "{E}", "n_shared_experts": "{shared_n}", "num_experts_per_tok": "{k}",
                "first_k_dense_replace": 0, "moe_layer_freq": 1, "scoring_func": "softmax", "norm_topk_prob": True,
                "moe_intermediate_size": "{I}",
                "auto_map": {"AutoConfig": f"{DEEPSEEK_CODE}--configuration_deepseek.DeepseekConfig",
                             "AutoModel": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekModel",
                             "AutoModelForCausalLM": f"{DEEPSEEK_CODE}--modeling_deepseek.DeepseekForCausalLM"}},
        remote_code=DEEPSEEK_CODE, llama_cpp_needs_shared_expert=True,
    ),
    "qwen2_moe": MoeLayout(
        arch_id="qwen2_moe", model_type="qwen2_moe", hf_architecture="Qwen2MoeForCausalLM",
        config_class="Qwen2MoeConfig", input_families=("llama", "mistral", "qwen2"),
        expert=_swiglu("model.layers.{layer}.mlp.experts.{expert}"),
        router="model.layers.{layer}.mlp.gate.weight",
        shared_expert=_swiglu("model.layers.{layer}.mlp.shared_expert"),
        shared_expert_gate="model.layers.{layer}.mlp.shared_expert_gate.weight", empty_shared_slot=True,
        llama_cpp_needs_shared_expert=True,
        config={"num_experts": "{E}", "num_experts_per_tok": "{k}", "moe_intermediate_size": "{I}",
                "shared_expert_intermediate_size": "{shared_I}", "decoder_sparse_step": 1, "mlp_only_layers": [],
                "norm_topk_prob": True, "use_sliding_window": False, "sliding_window": None},
    ),
    "qwen3_moe": MoeLayout(
        arch_id="qwen3_moe", model_type="qwen3_moe", hf_architecture="Qwen3MoeForCausalLM",
        config_class="Qwen3MoeConfig", input_families=("qwen3",),
        expert=_swiglu("model.layers.{layer}.mlp.experts.{expert}"),
        router="model.layers.{layer}.mlp.gate.weight",
        config={"num_experts": "{E}", "num_experts_per_tok": "{k}", "moe_intermediate_size": "{I}",
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True,
                "use_sliding_window": False, "sliding_window": None},
    ),
}


def input_family(config: dict) -> tuple[DenseFamily, list[str]]:
    """The dense family of a base config, and warnings about it; an error for families no layout holds."""
    model_type = config.get("model_type", "?")
    if model_type in UNREPRESENTABLE_FAMILIES:
        raise MoelabError(f"{model_type} models cannot become a MoE: {UNREPRESENTABLE_FAMILIES[model_type]}")
    if model_type not in DENSE_FAMILIES:
        raise MoelabError(
            f"base model type '{model_type}' is not supported; moelab merges {', '.join(DENSE_FAMILIES)} models")
    family = DENSE_FAMILIES[model_type]
    return family, family.check(config) if family.check else []


def choose_layout(candidates: tuple[str, ...], family: str, has_shared_expert: bool = False,
                  shared_expert_prompted: bool = False, asked: Optional[str] = None) -> MoeLayout:
    """The first of `candidates` (moelab ids, in mergekit-moe's order) that holds these models, as mergekit-moe
    chooses; `asked` is the recipe's `architecture`, for the error when none does."""
    reasons = {}
    for arch_id in candidates:
        reason = _why_not(LAYOUTS[arch_id], family, has_shared_expert, shared_expert_prompted)
        if reason is None:
            return LAYOUTS[arch_id]
        reasons[arch_id] = reason
    # Say why the layouts that take this family do not fit; the others only "cannot be built from" it.
    told = {a: r for a, r in reasons.items() if family in LAYOUTS[a].input_families} or reasons
    why = "; ".join(f"{a} {r}" for a, r in told.items())
    if asked and len(candidates) > 1:
        raise MoelabError(f"architecture '{asked}' means {' or '.join(candidates)}, and none fits: {why}")
    if asked:
        raise MoelabError(f"architecture {why}")
    raise MoelabError(f"no output layout fits these models: {why}")


def _why_not(layout: MoeLayout, family: str, has_shared_expert: bool, shared_expert_prompted: bool) -> Optional[str]:
    if family not in layout.input_families:
        fits = [a for a, lay in LAYOUTS.items() if family in lay.input_families]
        return f"cannot be built from {family} models (for {family} use {' or '.join(fits)})"
    if has_shared_expert and layout.shared_expert is None:
        takers = [a for a, lay in LAYOUTS.items() if lay.shared_expert and family in lay.input_families]
        return ("has no shared expert; remove shared_experts"
                + (f", or use architecture: {' or '.join(takers)}" if takers else f" (no layout takes {family} "
                                                                                   "models with a shared expert)"))
    if has_shared_expert and shared_expert_prompted and layout.shared_expert_gate is None:
        return ("has an ungated shared expert (always on, weight 1); remove the shared expert's prompts, or use "
                "architecture: qwen2_moe, which gates it")
    return None


def moe_config_dict(layout: MoeLayout, base_config: dict, num_experts: int, experts_per_token: int,
                    has_shared_expert: bool, dtype: str) -> dict:
    """Keyword arguments for the output config class, from the base model's config.json."""
    for flag in ("attention_bias", "mlp_bias"):
        if base_config.get(flag) and layout.arch_id != "qwen3_moe":
            raise MoelabError(f"the base model has {flag}=true, which {layout.arch_id} cannot represent; "
                              "use a base without biases")
    config = {k: v for k, v in base_config.items() if k not in DROPPED_CONFIG_KEYS}
    values = {"{E}": num_experts, "{k}": experts_per_token, "{I}": base_config["intermediate_size"],
              "{shared_I}": base_config["intermediate_size"] if has_shared_expert else 0,
              "{shared_n}": 1 if has_shared_expert else None}
    config.update({key: values.get(v, v) if isinstance(v, str) else v for key, v in layout.config.items()})
    config.update({k: base_config[k] for k in DENSE_FAMILIES[base_config["model_type"]].kept_config
                   if k in base_config})
    if layout.remote_code:
        config.update(_remote_code_rope(layout, base_config))
        # As mergekit-moe writes them (biases were refused above); that code reads them itself.
        config.update(model_type=layout.model_type, torch_dtype=dtype, attention_bias=False, mlp_bias=False,
                      pretraining_tp=base_config.get("pretraining_tp", 1))
    if layout.arch_id == "qwen2_moe":
        # Qwen2 attention has q/k/v biases; Llama and Mistral do not, and the config says which.
        config["qkv_bias"] = base_config.get("model_type") == "qwen2"
    if layout.arch_id == "qwen3_moe":
        config["attention_bias"] = bool(base_config.get("attention_bias", False))
    config["dtype"] = dtype
    config["architectures"] = [layout.hf_architecture]
    return config


def _remote_code_rope(layout: MoeLayout, base_config: dict) -> dict:
    """rope_theta and rope_scaling as modelling code written before transformers 5 reads them."""
    heads, hidden = base_config["num_attention_heads"], base_config["hidden_size"]
    if base_config.get("head_dim", hidden // heads) != hidden // heads:
        raise MoelabError(f"the base model has head_dim={base_config['head_dim']}, but {layout.arch_id} derives it "
                          f"as hidden_size / num_attention_heads = {hidden // heads}; use architecture: mixtral")
    rope = dict(base_config.get("rope_parameters") or base_config.get("rope_scaling") or {})
    theta = base_config.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if kind in ("linear", "dynamic"):
        return {"rope_theta": theta, "rope_scaling": {"type": kind, "factor": rope["factor"]}}
    raise MoelabError(f"the base model uses {kind} RoPE scaling, and {layout.arch_id}'s modelling code "
                      f"({layout.remote_code}) knows only linear and dynamic; use architecture: mixtral")


def split_tensor(family: DenseFamily, config: dict, name: str) -> list[tuple[str, Optional[tuple[int, int]]]]:
    """The Llama-layout tensors that source tensor `name` holds: (name, (first row, end row)), or (name, None) for
    the whole of an unfused tensor."""
    for suffix, parts in family.fused.items():
        if name.endswith("." + suffix):
            prefix, start, split = name[:-len(suffix)], 0, []
            for part, sizes in parts:
                rows = math.prod(_config_size(config, key) for key in sizes)
                split.append((prefix + part, (start, start + rows)))
                start += rows
            return split
    return [(name, None)]


def dense_mlp_sources(family: DenseFamily, config: dict, layer: int) -> dict[str, tuple[str, Optional[tuple]]]:
    """Per MLP role (gate/up/down) of a dense layer: the source tensor and rows that hold it."""
    fused = [f"model.layers.{layer}.{suffix}" for suffix in family.fused]
    parts = {part: (source, rows) for source in fused for part, rows in split_tensor(family, config, source)}
    return {role: parts.get(name, (name, None)) for role, name in dense_mlp_names(layer).items()}


def _config_size(config: dict, key: str) -> int:
    if key == "head_dim" and not config.get("head_dim"):
        return config["hidden_size"] // config["num_attention_heads"]
    return config[key]


def llama_cpp_warnings(layout: MoeLayout, num_experts: int, has_shared_expert: bool) -> list[str]:
    """What keeps the output from running in llama.cpp (read from the llama.cpp in llama-cpp-python 0.3.36)."""
    warnings = []
    if num_experts & (num_experts - 1):
        # ggml-cuda/topk-moe.cu: the fused routing kernel is instantiated for powers of two only.
        warnings.append(f"{num_experts} experts is not a power of two: llama.cpp's fused CUDA routing kernel takes "
                        "only powers of two (other counts run a slower path) and mergekit-moe calls such models "
                        "unusable in llama.cpp; 2, 4 or 8 experts avoid it")
    if layout.llama_cpp_needs_shared_expert and not has_shared_expert:
        warnings.append(f"llama.cpp loads {layout.arch_id} only with a shared expert, so this model will not load "
                        "there; add one (shared_experts, e.g. the base model) for a llama.cpp-ready model")
    return warnings


def expert_tensor_names(layout: MoeLayout, layer: int, expert: int) -> dict[str, str]:
    return {role: name.format(layer=layer, expert=expert) for role, name in layout.expert.items()}


def dense_mlp_names(layer: int) -> dict[str, str]:
    return {role: name.format(layer=layer) for role, name in DENSE_MLP.items()}


def is_dense_mlp(name: str) -> bool:
    return name.startswith("model.layers.") and ".mlp." in name
