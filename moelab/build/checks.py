"""Checks of a build's inputs before anything is written: option numbers, model configs, source tensor shapes."""

from __future__ import annotations

import re
from typing import Iterable

from moelab.errors import MoelabError
from moelab.recipe import MAX_SEED

# Config keys the planned shapes are computed from; each must be a positive integer, at most MAX_SIZE (a count of
# layers or heads at most MAX_COUNT), so that a damaged config cannot make the build plan forever.
SHAPE_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads")
OPTIONAL_SHAPE_KEYS = ("num_key_value_heads", "head_dim")
COUNT_KEYS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads")
MAX_SIZE, MAX_COUNT = 2**31 - 1, 4096
FLOAT_CODES = ("BF16", "F16", "F32", "F64")
# The dense tensors of the supported families (layouts.DENSE_FAMILIES) and their shapes, in terms of the config:
# H hidden, I intermediate, V vocabulary, Q = heads x head_dim, K = key-value heads x head_dim, D head_dim
# (QKV = Q + 2K, 2I = 2 x I for fused tensors).
DENSE_SHAPES = {
    "model.embed_tokens.weight": ("V", "H"),
    "lm_head.weight": ("V", "H"),
    "model.norm.weight": ("H",),
    "model.layers.N.input_layernorm.weight": ("H",),
    "model.layers.N.post_attention_layernorm.weight": ("H",),
    "model.layers.N.self_attn.q_proj.weight": ("Q", "H"),
    "model.layers.N.self_attn.k_proj.weight": ("K", "H"),
    "model.layers.N.self_attn.v_proj.weight": ("K", "H"),
    "model.layers.N.self_attn.o_proj.weight": ("H", "Q"),
    "model.layers.N.self_attn.q_proj.bias": ("Q",),
    "model.layers.N.self_attn.k_proj.bias": ("K",),
    "model.layers.N.self_attn.v_proj.bias": ("K",),
    "model.layers.N.self_attn.q_norm.weight": ("D",),
    "model.layers.N.self_attn.k_norm.weight": ("D",),
    "model.layers.N.mlp.gate_proj.weight": ("I", "H"),
    "model.layers.N.mlp.up_proj.weight": ("I", "H"),
    "model.layers.N.mlp.down_proj.weight": ("H", "I"),
    "model.layers.N.self_attn.qkv_proj.weight": ("QKV", "H"),  # phi3's fused q, k and v
    "model.layers.N.mlp.gate_up_proj.weight": ("2I", "H"),  # phi3's fused gate and up
}
LAYER_INDEX = re.compile(r"^model\.layers\.\d+\.")


def check_build_numbers(shard_bytes, seed) -> None:
    """--shard-size and --seed (from the CLI or Python): whole numbers in range."""
    if isinstance(shard_bytes, bool) or not isinstance(shard_bytes, int) or shard_bytes <= 0:
        raise MoelabError(f"shard size {shard_bytes!r} is not a positive number of bytes; write it like 5GB or 500MB")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise MoelabError(f"seed {seed!r} is out of range; give a whole number from 0 to {MAX_SEED}")


def check_model_config(config, ref: str) -> None:
    """A config.json moelab can plan from: a JSON object whose size keys are positive integers."""
    if not isinstance(config, dict):
        raise MoelabError(f"config.json of model '{ref}' is a JSON {type(config).__name__}, not an object; the "
                          "model folder is damaged, download or save it again")
    for key in SHAPE_KEYS + OPTIONAL_SHAPE_KEYS:
        value = config.get(key)
        if value is None and key in OPTIONAL_SHAPE_KEYS:
            continue
        largest = MAX_COUNT if key in COUNT_KEYS else MAX_SIZE
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= largest:
            raise MoelabError(f"config.json of model '{ref}' has {key}={value!r}; it must be a whole number from 1 "
                              f"to {largest} (the model folder is damaged or not a transformer LM)")
    if not isinstance(config.get("model_type"), str):
        raise MoelabError(f"config.json of model '{ref}' has no model_type; it is not a transformers model config")


def planned_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """DENSE_SHAPES in numbers for one config (one checked by check_model_config)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    sizes = {"H": config["hidden_size"], "I": config["intermediate_size"], "V": config["vocab_size"], "D": head_dim,
             "Q": heads * head_dim, "K": config.get("num_key_value_heads", heads) * head_dim}
    sizes.update({"QKV": sizes["Q"] + 2 * sizes["K"], "2I": 2 * sizes["I"]})
    return {name: tuple(sizes[d] for d in dims) for name, dims in DENSE_SHAPES.items()}


def check_source_tensors(tensors, names: Iterable[str], config: dict, role: str) -> None:
    """Every tensor the build will read from `tensors` (a SafetensorsFolder) has the shape the config plans and a
    float dtype, read from the file headers alone; a mismatch would be written out and fail to load."""
    shapes = planned_shapes(config)
    for name in names:
        shape, dtype = tensors.info(name)
        planned = shapes.get(LAYER_INDEX.sub("model.layers.N.", name))
        if planned is not None and shape != planned:
            raise MoelabError(f"{role}: tensor {name} has shape {list(shape)} but its config plans {list(planned)}; "
                              "the checkpoint does not match its config.json")
        if planned is not None and dtype not in FLOAT_CODES:
            raise MoelabError(f"{role}: tensor {name} is {dtype}, not a float type; quantized or damaged checkpoints "
                              "cannot be merged (dequantize it first)")
