"""Router weights from prompts (hidden, cheap_embed) or seeds (random, uniform_random).

Notation: L layers, E experts (routed, then the shared expert when it has a gate), H hidden size. Every mode returns
G of shape (L, E, H); row G[l, e] becomes expert e's row of layer l's router (for the shared expert: its sigmoid gate).
For an expert with positive prompts P and negative prompts N, and a per-prompt vector v_l(p):

    u_l = mean_{p in P} v_l(p) - mean_{p in N} v_l(p)     (the second term only when N is given)
    G[l, e] = u_l / max(||u_l||, 1e-8)

Prompts are tokenized as BOS + text, without a chat template. v_l(p) depends on the mode:
- hidden (moelab's default): the mean, over the prompt's tokens after BOS, of x_l = post_attention_layernorm(h_l + attn_l),
  which is exactly the input that layer l's router multiplies at inference. (mergekit-moe's `hidden` uses the residual
  stream *entering* layer l at the last token, a different point from where the router reads.)
- hidden_last: mergekit-moe's `hidden`: h_l, the residual stream entering layer l (hidden_states[l]), at the last token.
- hidden_avg: h_l averaged over all real tokens, BOS included and padding excluded (mergekit-moe also averages padding).
- cheap_embed: the same vector for every layer: s = sum over prompts and tokens (BOS included) of the input embedding,
  normalized; with negatives, G = normalize(normalize(s+) - normalize(s-)). This is mergekit-moe's formula.
- random: N(0, 1) entries; uniform_random: U(-1/sqrt(H), 1/sqrt(H)), the default nn.Linear init. Both from `seed`.
A shared expert without prompts gets a zero gate row in every mode: sigmoid(0) = 0.5 scales its output at every
token (set its residual_scale to 2 for the full output).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from moelab.errors import MoelabError
from moelab.recipe import FITTED_GATE_MODES, Expert, Recipe

PROMPT_BATCH = 32
EPS = 1e-8


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def _normalize(u):
    import torch

    return u / torch.clamp(u.norm(dim=-1, keepdim=True), min=EPS)


def random_gates(num_layers: int, num_experts: int, hidden: int, seed: int, uniform: bool):
    import torch

    generator = torch.Generator().manual_seed(seed)
    if uniform:
        bound = hidden ** -0.5
        return (torch.rand(num_layers, num_experts, hidden, generator=generator) * 2 - 1) * bound
    return torch.randn(num_layers, num_experts, hidden, generator=generator)


def cheap_embed_gates(embedding, tokenizer, experts: Sequence[Expert], num_layers: int):
    import torch

    def direction(prompts):
        ids = [i for seq in encode_prompts(tokenizer, prompts) for i in seq]
        return _normalize(embedding[torch.tensor(ids)].float().sum(dim=0))

    rows = []
    for expert in experts:
        if not expert.positive_prompts:
            rows.append(torch.zeros(embedding.shape[1]))
            continue
        row = direction(expert.positive_prompts)
        if expert.negative_prompts:
            row = _normalize(row - direction(expert.negative_prompts))
        rows.append(row)
    return torch.stack(rows).unsqueeze(0).expand(num_layers, -1, -1).clone()


def load_gate_model(base_dir: Path, device: str, load_in_4bit: bool, load_in_8bit: bool):
    """The base model for the hidden-state pass, in bf16 (or bitsandbytes 4/8-bit on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    kwargs = {}
    if load_in_4bit or load_in_8bit:
        if device != "cuda":
            raise MoelabError("--load-in-4bit/--load-in-8bit need a CUDA GPU (bitsandbytes); drop the flag on CPU")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MoelabError("4/8-bit loading needs bitsandbytes: pip install 'moelab[quant]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16, device_map=device, **kwargs)
    model.eval()
    if device == "cpu":
        _compute_layers_in_float32(model)
    return model


def _compute_layers_in_float32(model) -> None:
    """Keep bf16 weights but run each decoder layer in float32, cast up for its forward and back after.

    CPUs without bf16 matrix units run bf16 matmuls several times slower than float32, and a whole float32 copy
    would double the memory of the pass; one float32 layer at a time costs neither.
    """
    import torch

    def cast(value, dtype):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(dtype)
        if isinstance(value, tuple):
            return tuple(cast(v, dtype) for v in value)
        return value

    def before(layer, args, kwargs):
        layer.float()
        return cast(args, torch.float32), {k: cast(v, torch.float32) for k, v in kwargs.items()}

    def after(layer, _args, output):
        layer.to(torch.bfloat16)
        return cast(output, torch.bfloat16)

    for layer in model.model.layers:
        layer.register_forward_pre_hook(before, with_kwargs=True)
        layer.register_forward_hook(after)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MoelabError(f"unknown device '{device}'; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoelabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def layer_states(model, token_lists: list[list[int]], mode: str):
    """Per batch of prompts: (states, mask), with states[l] of shape (B, T, H) on the CPU in float32.

    mode "hidden": the router's input at layer l (post-attention norm output); else the residual stream entering
    layer l. Prompts are right-padded and `mask` marks real tokens.
    """
    import torch

    layers = model.model.layers
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    if mode == "hidden":
        for index, layer in enumerate(layers):
            def keep(_module, _inputs, output, index=index):
                captured[index] = output
            hooks.append(layer.post_attention_layernorm.register_forward_hook(keep))
    device = next(model.parameters()).device
    try:
        for start in range(0, len(token_lists), PROMPT_BATCH):
            batch = token_lists[start:start + PROMPT_BATCH]
            width = max(len(seq) for seq in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.no_grad():  # the decoder alone: the LM head's logits are not needed
                out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  output_hidden_states=mode != "hidden")
            states = ([captured[i] for i in range(len(layers))] if mode == "hidden"
                      else list(out.hidden_states[:len(layers)]))
            yield [s.float().cpu() for s in states], mask
    finally:
        for hook in hooks:
            hook.remove()


def prompt_vectors(model, token_lists: list[list[int]], mode: str, skip_first: bool):
    """Mean over prompts of v_l(p) (see the module docstring): a float32 tensor (L, H)."""
    import torch

    total = None
    for states, mask in layer_states(model, token_lists, mode):
        batch_sum = torch.stack([_pool(s, mask, mode, skip_first) for s in states]).sum(dim=1)  # (L, H)
        total = batch_sum if total is None else total + batch_sum
    return total / len(token_lists)


def _pool(states, mask, mode: str, skip_first: bool):
    """(B, T, H) states of one layer -> (B, H) per-prompt vectors."""
    import torch

    if mode == "hidden_last":
        last = mask.sum(dim=1) - 1
        return states[torch.arange(states.shape[0]), last]
    weights = mask.clone().float()
    if mode == "hidden" and skip_first:
        keep_bos = mask.sum(dim=1) == 1  # a prompt of BOS alone keeps it, rather than averaging nothing
        weights[~keep_bos, 0] = 0
    return (states * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)


def hidden_gates(model, tokenizer, experts: Sequence[Expert], mode: str):
    import torch

    skip_first = tokenizer.bos_token_id is not None
    num_layers, hidden = len(model.model.layers), model.config.hidden_size
    rows = []
    for expert in experts:
        if not expert.positive_prompts:
            rows.append(torch.zeros(num_layers, hidden))
            continue
        u = prompt_vectors(model, encode_prompts(tokenizer, expert.positive_prompts), mode, skip_first)
        if expert.negative_prompts:
            u = u - prompt_vectors(model, encode_prompts(tokenizer, expert.negative_prompts), mode, skip_first)
        rows.append(_normalize(u))
    return torch.stack(rows, dim=1)


def compute_gates(recipe: Recipe, experts: Sequence[Expert], base_dir: Path, shared_weights, num_layers: int,
                  hidden: int, seed: int, device: str = "auto", load_in_4bit: bool = False,
                  load_in_8bit: bool = False, recipe_dir: Optional[Path] = None, show_progress: bool = True):
    """(G (L, E, H) float32, RouterReport or None) for `experts` (routed, then a gated shared expert).

    Prompts run through the base model with the MoE's own shared weights (`shared_weights`, a SharedWeights),
    since those are what the router's inputs will come from. gate_modes trained and ridge fit the routed experts'
    rows (moelab/build/router_training.py); hidden rows are trained's starting point and the report's baseline.
    """
    gate_mode = recipe.gate_mode
    import gc

    from transformers import AutoTokenizer

    if gate_mode in ("random", "uniform_random"):
        return random_gates(num_layers, len(experts), hidden, seed, uniform=gate_mode == "uniform_random"), None
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if gate_mode == "cheap_embed":
        embedding = shared_weights.get("model.embed_tokens.weight")
        return cheap_embed_gates(embedding, tokenizer, experts, num_layers), None
    model = load_gate_model(base_dir, device, load_in_4bit, load_in_8bit)
    if shared_weights.merged:
        _load_shared_weights(model, shared_weights)
    try:
        gates = hidden_gates(model, tokenizer, experts, "hidden" if gate_mode in FITTED_GATE_MODES else gate_mode)
        if gate_mode not in FITTED_GATE_MODES:
            return gates, None
        from moelab.build.router_training import fitted_gates

        routed = len(recipe.experts)
        fitted, report = fitted_gates(model, tokenizer, recipe.experts, recipe.expert_names(), gates[:, :routed],
                                      gate_mode, recipe.router_training, seed, recipe_dir, show_progress)
        gates[:, :routed] = fitted
        return gates, report
    finally:
        del model
        gc.collect()


def _load_shared_weights(model, shared_weights) -> None:
    import torch

    names = set(shared_weights.names)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                param.copy_(shared_weights.get(name).to(param.dtype))


def similar_expert_pairs(gates, names: Sequence[str], threshold: float = 0.995) -> list[tuple[str, str, float]]:
    """Pairs of experts whose router rows point the same way in most layers (routing between them is arbitrary)."""
    import torch

    unit = _normalize(gates.float())
    cos = torch.einsum("leh,lfh->lef", unit, unit).median(dim=0).values
    return [(names[i], names[j], float(cos[i, j]))
            for i in range(len(names)) for j in range(i + 1, len(names)) if cos[i, j] > threshold]
