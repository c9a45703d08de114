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

from moelab.build.layouts import is_dense_mlp
from moelab.build.layer_pass import EMBEDDING, LayerPass, layer_prefix, prompt_batches

from moelab.errors import MoelabError
from moelab.recipe import Expert, Recipe

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


def gate_pass_model(base_dir: Path, device: str, load_in_4bit: bool, load_in_8bit: bool):
    """(model, streamed) for the hidden-state pass: the base's modules without weights, which the pass loads layer
    by layer; or, for bitsandbytes 4/8-bit on CUDA, the whole quantized base model."""
    import torch
    from transformers import AutoModelForCausalLM

    from moelab.build.layer_pass import skeleton_model

    device = resolve_device(device)
    if load_in_4bit or load_in_8bit:
        if device != "cuda":
            raise MoelabError("--load-in-4bit/--load-in-8bit need a CUDA GPU (bitsandbytes); drop the flag on CPU")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise MoelabError("4/8-bit loading needs bitsandbytes: pip install 'moelab[quant]'") from None
        model = AutoModelForCausalLM.from_pretrained(
            base_dir, dtype=torch.bfloat16, device_map=device,
            quantization_config=BitsAndBytesConfig(load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit))
        model.eval()
        return model, False
    return skeleton_model(base_dir, device), True


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise MoelabError(f"unknown device '{device}'; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoelabError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


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


def similar_expert_pairs(gates, names: Sequence[str], threshold: float = 0.995) -> list[tuple[str, str, float]]:
    """Pairs of experts whose router rows point the same way in most layers (routing between them is arbitrary)."""
    import torch

    unit = _normalize(gates.float())
    cos = torch.einsum("leh,lfh->lef", unit, unit).median(dim=0).values
    return [(names[i], names[j], float(cos[i, j]))
            for i in range(len(names)) for j in range(i + 1, len(names)) if cos[i, j] > threshold]


class RouterRows:
    """Every layer's router rows (E x H: routed experts, then a gated shared expert), as the build streams.

    random and uniform_random rows come from the seed, trained ones from a pass before writing (its fit needs
    every layer). cheap_embed takes the merged input embedding when the writer offers it. The hidden modes run
    the LayerPass: the writer offers each layer's merged shared tensors, rows(l) gets the base's dense MLP of
    layer l, and both feed layer l of the pass, which then gives layer l's rows. `gates` (L, E, H) fills as rows
    are asked for.
    """

    def __init__(self, recipe: Recipe, experts: Sequence[Expert], base, shared_weights, num_layers: int,
                 hidden: int, seed: int, device: str = "auto", load_in_4bit: bool = False, load_in_8bit: bool = False,
                 recipe_dir: Optional[Path] = None, show_progress: bool = True, zero_shared_gate: bool = False):
        import torch

        self.mode = recipe.gate_mode
        self.experts, self.base, self.num_layers = list(experts), base, num_layers
        self.zero_shared_gate = zero_shared_gate  # documented above: an unprompted shared expert gets sigmoid(0)
        self.routed = len(recipe.experts)
        self.gates = torch.zeros(num_layers, len(experts), hidden)
        self.report = None
        self.wanted: set[str] = set()    # shared tensors the writer offers
        self._offered: dict[str, object] = {}
        self._pass: Optional[LayerPass] = None
        self._known = False              # every row is known before writing
        if self.mode in ("random", "uniform_random"):
            self.gates = random_gates(num_layers, len(experts), hidden, seed, uniform=self.mode == "uniform_random")
            self._known = True
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(base.folder)
        if self.mode == "cheap_embed":
            self.wanted = {EMBEDDING}
            return
        model, streamed = gate_pass_model(base.folder, device, load_in_4bit, load_in_8bit)
        self._groups = []  # per expert: (positive group, negative group or None), None without prompts
        token_groups = []
        for expert in self.experts:
            if not expert.positive_prompts:
                self._groups.append(None)
                continue
            token_groups.append(encode_prompts(self.tokenizer, expert.positive_prompts))
            positive = len(token_groups) - 1
            if expert.negative_prompts:
                token_groups.append(encode_prompts(self.tokenizer, expert.negative_prompts))
            self._groups.append((positive, len(token_groups) - 1 if expert.negative_prompts else None))
        self._group_sizes = [len(g) for g in token_groups]
        self._hidden_groups = len(token_groups)
        training = None
        if self.mode == "trained":
            from moelab.build.router_training import training_tokens

            training = training_tokens(self.tokenizer, recipe.experts, recipe.router_training, seed, recipe_dir)
            token_groups += training.groups
        self._pass = LayerPass(model, prompt_batches(token_groups), resolve_device(device), streamed)
        self._streamed = streamed
        if training is None:
            if streamed:
                self.wanted = {EMBEDDING} | {n for n in shared_weights.names if n.startswith("model.layers.")}
            return
        per_layer = []
        self._pass.embed(shared_weights.get(EMBEDDING) if streamed else None)
        for layer in range(num_layers):
            weights = None
            if streamed:
                names = [n for n in shared_weights.names if n.startswith(layer_prefix(layer))]
                weights = {n: shared_weights.get(n) for n in names}
                weights.update({n: base.tensors.get(n) for n in self.dense_mlp(layer)})
            states = self._advance(layer, weights)
            first = sum(1 for b in self._pass.batches if b.group < self._hidden_groups)
            per_layer.append(training.features(states[first:]))
        self._pass = None
        from moelab.build.router_training import trained_gates

        fitted, self.report = trained_gates(training, per_layer, recipe.expert_names(), self.gates[:, :self.routed],
                                            recipe.router_training, show_progress)
        self.gates[:, :self.routed] = fitted
        self._known = True

    def dense_mlp(self, layer: int) -> list[str]:
        """The base's own MLP tensors of `layer` (fused ones, like Phi-3's gate_up_proj, as they are stored)."""
        return [n for n in self.base.tensors.names() if n.startswith(layer_prefix(layer)) and is_dense_mlp(n)]

    def layer_reads(self, layer: int) -> list:
        """The base tensors that rows(layer) reads: its dense MLP when the pass streams."""
        from moelab.build.tensors import SourceTensor

        if self._pass is None or not self._streamed:
            return []
        return [SourceTensor(self.base.tensors, name) for name in self.dense_mlp(layer)]

    def offer(self, name: str, merged) -> None:
        if name in self.wanted:
            self._offered[name] = merged

    def rows(self, layer: int, *mlp):
        """Layer `layer`'s rows (E, H) float32; layers are asked for in order. `mlp`: the tensors of layer_reads."""
        if self.mode == "cheap_embed" and not self._known:
            embedding = self._offered.pop(EMBEDDING)
            self.gates = cheap_embed_gates(embedding, self.tokenizer, self.experts, self.num_layers)
            self._known = True
        if not self._known:
            if layer == 0:
                self._pass.embed(self._offered.pop(EMBEDDING, None))
            weights = None
            if self._streamed:
                weights = {n: self._offered.pop(n) for n in list(self._offered) if n.startswith(layer_prefix(layer))}
                weights.update(zip(self.dense_mlp(layer), mlp))
            self._advance(layer, weights)
        if self.zero_shared_gate:
            self.gates[layer, self.routed:] = 0
        return self.gates[layer]

    def _advance(self, layer: int, weights):
        """Run the pass through `layer` and set its hidden-mode rows; returns the per-batch states."""
        states = self._pass.run_layer(weights, router_input=self.mode in ("hidden", "trained"))
        pool_mode = "hidden" if self.mode == "trained" else self.mode
        skip_first = self.tokenizer.bos_token_id is not None
        totals: list = [None] * self._hidden_groups
        for batch, s in zip(self._pass.batches, states):
            if batch.group >= self._hidden_groups:
                continue
            pooled = _pool(s, batch.mask, pool_mode, skip_first).sum(dim=0)
            totals[batch.group] = pooled if totals[batch.group] is None else totals[batch.group] + pooled
        for e, groups in enumerate(self._groups):
            if groups is None:
                continue
            positive, negative = groups
            u = totals[positive] / self._group_sizes[positive]
            if negative is not None:
                u = u - totals[negative] / self._group_sizes[negative]
            self.gates[layer, e] = _normalize(u)
        return states
