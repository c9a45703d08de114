"""The modules of moelab.build.decoder's Llama-family decoder (in a module of their own: they import torch)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from moelab.build.decoder import GQA_HEAD_LIMIT, DecoderSpec


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
    def __init__(self, spec: DecoderSpec, inv_freq):
        super().__init__()
        # Given its weight, nn.Embedding skips its random init, which on the meta device imports torch._dynamo
        # (2 s).
        self.embed_tokens = nn.Embedding(spec.vocab, spec.hidden, _weight=torch.empty(spec.vocab, spec.hidden))
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.layers))
        self.sliding_window = spec.sliding_window
        self.inv_freq = inv_freq  # a plain attribute: made outside the meta device, left out of the state dict

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
    def __init__(self, spec: DecoderSpec, inv_freq):
        super().__init__()
        self.model = Decoder(spec, inv_freq)
