"""The Llama family's decoder (Llama, Mistral, Qwen2, Qwen3) in plain torch, for the hidden-state pass.

Importing transformers' modelling code costs 1.5-3 s on a 2-core machine, its config and tokenizer classes
another 1-2 s, while the rest of a 4x135M build takes about 4 s. Its modules (moelab.build.decoder_layers)
compute, operation for operation, what transformers 5's decoder layers compute with SDPA attention (same RMSNorm,
RoPE, masks, SDPA arguments and order of operations), so the pass's states, and the router rows, are bit-identical
either way: tests/test_decoder.py compares every family with transformers' own model, with and without padding.

A config this module does not cover exactly (another family, RoPE type or activation, a value whose default
differs between transformers releases and that the config.json leaves out, sliding-window layers) gets None from
decoder_spec, and the pass uses transformers' model instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
SILU = ("silu", "swish")
# SDPA runs grouped-query attention itself (enable_gqa) without a mask for head sizes up to this; transformers
# repeats the key/value heads otherwise.
GQA_HEAD_LIMIT = 256


@dataclass(frozen=True)
class DecoderSpec:
    family: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    attention_bias: bool   # on q, k, v and o (Qwen2: on q, k and v only, always)
    mlp_bias: bool
    sliding_window: Optional[int]  # Mistral's, on every layer


def decoder_spec(config: dict) -> Optional[DecoderSpec]:
    """The decoder a base model's config.json describes, or None where this module does not compute it exactly."""
    family = config.get("model_type")
    if family not in FAMILIES or config.get("hidden_act", "silu") not in SILU:
        return None
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return None
    rope_theta = rope.get("rope_theta", config.get("rope_theta"))
    eps = config.get("rms_norm_eps")
    # Their defaults have changed between families and releases: only explicit values are taken.
    if not _is_number(rope_theta) or not _is_number(eps):
        return None
    if config.get("use_sliding_window") or any(t != "full_attention" for t in config.get("layer_types") or []):
        return None
    if family == "mistral" and "sliding_window" not in config:
        return None
    window = config.get("sliding_window") if family == "mistral" else None
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window <= 0):
        return None
    heads = config["num_attention_heads"]
    return DecoderSpec(
        family=family, hidden=config["hidden_size"], intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"], vocab=config["vocab_size"], heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, eps=eps, rope_theta=rope_theta,
        attention_bias=family == "qwen2" or (family in ("llama", "qwen3") and bool(config.get("attention_bias"))),
        mlp_bias=family == "llama" and bool(config.get("mlp_bias")), sliding_window=window)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def decoder_model(spec: DecoderSpec, device: str):
    """A causal LM's decoder of `spec` on the meta device (no weights; the pass assigns each layer's), with its
    rotary inverse frequencies on `device`. It has transformers' module and parameter names (model.layers.N...)."""
    import torch

    from moelab.build.decoder_layers import CausalLM

    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
    with torch.device("meta"):
        model = CausalLM(spec, inv_freq.to(device))
    model.eval()
    return model


class PlainTokenizer:
    """A tokenizer.json read with the tokenizers library, for the prompts' token ids: what transformers' tokenizer
    gives where it loads tokenizer.json as it is (see plain_tokenizer), without importing transformers (1-2 s)."""

    def __init__(self, tokenizer, bos_token_id: Optional[int]):
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids}


# tokenizer_config.json classes that load tokenizer.json as it is, and the model types for which transformers'
# AutoTokenizer keeps that class (for Qwen2 it picks Qwen2Tokenizer, which has its own pre-tokenizer; for Mistral
# mistral-common's tokenizer where that is installed).
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
PLAIN_TOKENIZER_MODEL_TYPES = ("llama", "qwen3")


def plain_tokenizer(folder: Path, model_type: str) -> Optional[PlainTokenizer]:
    """The folder's tokenizer as a PlainTokenizer, or None where transformers' own is needed: a class or model type
    not named above, special tokens that only tokenizer_config.json or special_tokens_map.json adds, or a BOS token
    that is not in the vocabulary."""
    if model_type not in PLAIN_TOKENIZER_MODEL_TYPES:
        return None
    try:
        settings = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(settings, dict) or settings.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES:
        return None
    if (folder / "special_tokens_map.json").exists() or not (folder / "tokenizer.json").is_file():
        return None
    if any(key in settings for key in ("added_tokens_decoder", "extra_special_tokens", "additional_special_tokens",
                                       "auto_map")):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    except Exception:  # noqa: BLE001 - the tokenizers library fails on a damaged file with any exception type
        return None
    bos = settings.get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    if bos is None:
        return PlainTokenizer(tokenizer, None)
    bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
    return PlainTokenizer(tokenizer, bos_id) if bos_id is not None else None
