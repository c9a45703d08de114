"""The Llama family's decoder (Llama, Mistral, Qwen2, Qwen3) in plain torch, for the hidden-state pass.

Importing transformers' modelling code costs 1.5-3 s on a 2-core machine, its config and tokenizer classes
another 1-2 s, while the rest of a 4x135M build takes about 4 s. These modules compute, operation for operation,
what transformers 5's decoder layers compute with SDPA attention (same RMSNorm, RoPE, masks, SDPA arguments and
order of operations), so the pass's states, and the router rows, are bit-identical either way:
tests/test_decoder.py compares every family with transformers' own model, with and without padding.

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

    modules = _modules()
    with torch.device("meta"):
        model = modules.CausalLM(spec)
    inner = model.model
    inner.inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
    inner.inv_freq = inner.inv_freq.to(device)
    model.eval()
    return model


_MODULES = None


def _modules():
    """The module classes, made on first use (torch is imported lazily)."""
    global _MODULES
    if _MODULES is None:
        _MODULES = _make_modules()
    return _MODULES


def _make_modules():
    import types

    import torch
    from torch import nn
    from torch.nn import functional as F

    class RMSNorm(nn.Module):
        def __init__(self, size: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(size))
            self.eps = eps

        def forward(self, x):
            dtype = x.dtype
            x = x.to(torch.float32)
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x.to(dtype)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def repeat_heads(x, groups: int):
        batch, heads, length, dim = x.shape
        return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)

    class Attention(nn.Module):
        def __init__(self, spec: DecoderSpec):
            super().__init__()
            q, kv, bias = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim, spec.attention_bias
            self.q_proj = nn.Linear(spec.hidden, q, bias=bias)
            self.k_proj = nn.Linear(spec.hidden, kv, bias=bias)
            self.v_proj = nn.Linear(spec.hidden, kv, bias=bias)
            self.o_proj = nn.Linear(q, spec.hidden, bias=bias and spec.family != "qwen2")
            if spec.family == "qwen3":
                self.q_norm = RMSNorm(spec.head_dim, spec.eps)
                self.k_norm = RMSNorm(spec.head_dim, spec.eps)
            self.head_dim = spec.head_dim
            self.groups = spec.heads // spec.kv_heads
            self.scaling = spec.head_dim ** -0.5

        def forward(self, x, position_embeddings, attention_mask):
            shape = (*x.shape[:-1], -1, self.head_dim)
            q, k, v = self.q_proj(x).view(shape), self.k_proj(x).view(shape), self.v_proj(x).view(shape)
            if hasattr(self, "q_norm"):
                q, k = self.q_norm(q), self.k_norm(k)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            cos, sin = (t.unsqueeze(1) for t in position_embeddings)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            length = q.shape[2]
            options = {}
            if self.groups > 1:
                if attention_mask is None and self.head_dim <= GQA_HEAD_LIMIT:
                    options["enable_gqa"] = True
                elif length == 1:  # one query: the key/value heads' groups side by side, as transformers does
                    q = q.reshape(q.shape[0], q.shape[1] // self.groups, self.groups, q.shape[-1])
                else:
                    k, v = repeat_heads(k, self.groups), repeat_heads(v, self.groups)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=0.0,
                                                 scale=self.scaling,
                                                 is_causal=length > 1 and attention_mask is None, **options)
            out = out.reshape(out.shape[0], -1, length, v.shape[-1]).transpose(1, 2).contiguous()
            return self.o_proj(out.reshape(*x.shape[:-1], -1).contiguous())

    class MLP(nn.Module):
        def __init__(self, spec: DecoderSpec):
            super().__init__()
            self.gate_proj = nn.Linear(spec.hidden, spec.intermediate, bias=spec.mlp_bias)
            self.up_proj = nn.Linear(spec.hidden, spec.intermediate, bias=spec.mlp_bias)
            self.down_proj = nn.Linear(spec.intermediate, spec.hidden, bias=spec.mlp_bias)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class DecoderLayer(nn.Module):
        def __init__(self, spec: DecoderSpec):
            super().__init__()
            self.self_attn = Attention(spec)
            self.mlp = MLP(spec)
            self.input_layernorm = RMSNorm(spec.hidden, spec.eps)
            self.post_attention_layernorm = RMSNorm(spec.hidden, spec.eps)

        def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **_):
            hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                                           attention_mask)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    class Decoder(nn.Module):
        def __init__(self, spec: DecoderSpec):
            super().__init__()
            # Given its weight, nn.Embedding skips its random init, which on the meta device imports torch._dynamo
            # (2 s).
            self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden, _weight=torch.empty(spec.vocab, spec.hidden))
            self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.layers))
            self.sliding_window = spec.sliding_window
            self.inv_freq = None

        def forward(self, input_ids, attention_mask, use_cache=False):
            hidden_states = self.embed_tokens(input_ids)
            length = input_ids.shape[1]
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
            freqs = position_ids[..., None].float() * self.inv_freq.to(device=input_ids.device, dtype=torch.float)
            angles = torch.cat((freqs, freqs), dim=-1)
            position_embeddings = angles.cos().to(hidden_states.dtype), angles.sin().to(hidden_states.dtype)
            mask = self.causal_mask(attention_mask.to(torch.bool), length)
            for layer in self.layers:
                hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                      position_ids=position_ids)
            return hidden_states

        def causal_mask(self, padding, length: int):
            """transformers' SDPA mask: None (SDPA's is_causal) when no token is padding and any sliding window is
            longer than the prompts, else (B, 1, T, T) booleans, True where a query may attend."""
            window = self.sliding_window
            if (window is None or length < window) and int(padding.sum()) == padding.numel():
                return None
            q = torch.arange(length, device=padding.device)[None, None, :, None]
            kv = torch.arange(length, device=padding.device)[None, None, None, :]
            allowed = kv <= q
            if window is not None:
                allowed = allowed & (kv > q - window)
            return allowed & padding[:, None, None, :]

    class CausalLM(nn.Module):
        def __init__(self, spec: DecoderSpec):
            super().__init__()
            self.model = Decoder(spec)

    return types.SimpleNamespace(CausalLM=CausalLM)


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
