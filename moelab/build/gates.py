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

import threading
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from moelab.build.decoder import plain_tokenizer
from moelab.build.layouts import is_dense_mlp
from moelab.build.layer_pass import EMBEDDING, LayerPass, layer_of, layer_prefix, prompt_batches

from moelab.errors import MoelabError
from moelab.recipe import FITTED_GATE_MODES, HIDDEN_GATE_MODES, RANDOM_GATE_MODES, Expert, Recipe

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


def gate_pass_model(base_dir: Path, base_config: dict, device: str, load_in_4bit: bool, load_in_8bit: bool):
    """(model, streamed) for the hidden-state pass: the base's modules without weights, which the pass loads layer
    by layer; or, for bitsandbytes 4/8-bit on CUDA, the whole quantized base model."""
    from moelab.build.layer_pass import skeleton_model

    device = resolve_device(device)
    if load_in_4bit or load_in_8bit:
        import torch
        from transformers import AutoModelForCausalLM

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
    return skeleton_model(base_dir, base_config, device), True


def prompt_tokenizer(folder: Path, model_type: Optional[str]):
    """The base's tokenizer for the prompts: a PlainTokenizer where it gives transformers' ids, else transformers'."""
    plain = plain_tokenizer(folder, model_type)
    if plain is not None:
        return plain
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


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


class _Stopped(Exception):
    pass


class RouterRows:
    """Every layer's router rows (E x H: routed experts, then a gated shared expert), computed on a thread of their
    own (start) while the build writes everything else; rows(l) waits for layer l's.

    random and uniform_random rows come from the seed; trained and ridge ones from a pass over every layer and a
    fit; cheap_embed ones from the input embedding. The hidden modes run the LayerPass layer by layer: layer l
    takes the base's dense MLP of layer l and the shared tensors the build writes for it, which are the base's own
    under shared_weights: base (read here), and otherwise the merged ones, which the writer offers as it merges
    them (at most LOOKAHEAD_LAYERS layers ahead of the pass, so that memory stays at about a layer). `gates`
    (L, E, H) fills layer by layer.
    """

    LOOKAHEAD_LAYERS = 1

    def __init__(self, recipe: Recipe, experts: Sequence[Expert], base, shared_weights, num_layers: int,
                 hidden: int, seed: int, device: str = "auto", load_in_4bit: bool = False, load_in_8bit: bool = False,
                 recipe_dir: Optional[Path] = None, zero_shared_gate: bool = False):
        import torch

        self.mode = recipe.gate_mode
        self.recipe, self.experts, self.base, self.num_layers = recipe, list(experts), base, num_layers
        self.shared_weights, self.seed, self.device, self.recipe_dir = shared_weights, seed, device, recipe_dir
        self.quantized = (load_in_4bit, load_in_8bit)
        self.zero_shared_gate = zero_shared_gate  # documented above: an unprompted shared expert gets sigmoid(0)
        self.routed = len(recipe.experts)
        self.gates = torch.zeros(num_layers, len(experts), hidden)
        self.report = None
        self._pass: Optional[LayerPass] = None
        self.streams_layers = self.mode in HIDDEN_GATE_MODES and not any(self.quantized)
        self.wanted: set[str] = set()  # the merged shared tensors that the writer offers
        if shared_weights.merged and self.mode == "cheap_embed":
            self.wanted = {EMBEDDING}
        elif shared_weights.merged and self.streams_layers:
            self.wanted = {EMBEDDING} | {n for n in shared_weights.names if layer_of(n) is not None}
        self._offered: dict[str, object] = {}
        self._cond = threading.Condition()
        self._layers_done = 0
        self._error: Optional[BaseException] = None
        self._stop = False
        self._writer_waits = False  # the writer has nothing left but router rows
        self._cores = (1, 1)  # the cores the pass uses while the writer works, and once it waits
        self._thread: Optional[threading.Thread] = None
        self._note: Callable[[str], None] = lambda text: None
        if self.mode in RANDOM_GATE_MODES:
            self.gates = random_gates(num_layers, len(experts), hidden, seed, uniform=self.mode == "uniform_random")
            self._layers_done = num_layers

    def start(self, note: Callable[[str], None] = lambda text: None, threads: Optional[int] = None) -> bool:
        """Compute the rows on a thread, with `threads` cores while the writer works and all of them once it waits
        in rows() (default all throughout); `note` gets a line on how far it is ("" when done). False when there is
        nothing to compute.

        The pass's model is made here, on the calling thread: transformers sets torch's default dtype (global
        state) while it makes a model, which must not happen while another thread makes one or computes."""
        import torch

        if self._thread is not None or self._layers_done == self.num_layers:
            return False
        if self.mode != "cheap_embed":
            self._model, self._streamed = gate_pass_model(self.base.folder, self.base.config, self.device,
                                                          *self.quantized)
        self._note = note
        self._thread = threading.Thread(target=self._compute, args=(threads, torch.get_num_threads()),
                                        name="moelab-routers", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """Stop the thread at its next layer (a build that failed). Not joined: it may be inside an import, and it
        writes nothing."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def rows(self, layer: int):
        """Layer `layer`'s rows (E, H) float32, once the thread has them."""
        self.start()
        with self._cond:
            self._writer_waits = True
            self._cond.wait_for(lambda: self._layers_done > layer or self._error is not None)
            if self._error is not None:
                raise self._error
        if self.zero_shared_gate:
            self.gates[layer, self.routed:] = 0
        return self.gates[layer]

    def offer(self, name: str, merged) -> None:
        """A merged shared tensor, as the writer makes it; waits while the pass is more than LOOKAHEAD_LAYERS
        layers behind."""
        if name not in self.wanted:
            return
        layer = layer_of(name)
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or layer is None
                                or layer <= self._layers_done + self.LOOKAHEAD_LAYERS)
            if self._error is not None:
                raise self._error
            self._offered[name] = merged
            self._cond.notify_all()

    def _shared(self, name: str):
        """The shared tensor `name` as the build writes it (router thread)."""
        if name not in self.wanted:
            return self.base.tensors.get(name)
        with self._cond:
            self._cond.wait_for(lambda: name in self._offered or self._stop)
            if self._stop:
                raise _Stopped
            return self._offered.pop(name)

    def _layers_computed(self, count: int) -> None:
        with self._cond:
            if self._stop:
                raise _Stopped
            self._layers_done = count
            self._cond.notify_all()

    def _compute(self, threads: Optional[int], all_threads: int) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)  # this thread's own setting
        self._cores = (threads or all_threads, all_threads)
        try:
            self._note("routers: loading the tokenizer and the model's layers")
            self._prepare()
            if self.mode == "cheap_embed":
                self.gates = cheap_embed_gates(self._shared(EMBEDDING), self.tokenizer, self.experts, self.num_layers)
            elif self.mode in FITTED_GATE_MODES:
                self._fit()
            else:
                self._pass.embed(self._shared(EMBEDDING) if self.streams_layers else None)
                for layer in range(self.num_layers):
                    self._note(f"routers: layer {layer + 1}/{self.num_layers}")
                    weights = self._layer_weights(layer, self._shared) if self.streams_layers else None
                    self._advance(layer, weights)
                    self._layers_computed(layer + 1)
            self._pass = None
            self._layers_computed(self.num_layers)
            self._note("")
        except _Stopped:
            pass
        except BaseException as err:  # raised on the writer's thread, in rows() or offer()
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def _prepare(self) -> None:
        """The tokenizer, and for the modes with a pass its model and prompt batches."""
        self.tokenizer = prompt_tokenizer(self.base.folder, self.base.config.get("model_type"))
        if self.mode == "cheap_embed":
            return
        self._groups = []  # per expert: (positive group, negative group or None), None without prompts
        self._token_groups = []
        for expert in self.experts:
            if not expert.positive_prompts:
                self._groups.append(None)
                continue
            self._token_groups.append(encode_prompts(self.tokenizer, expert.positive_prompts))
            positive = len(self._token_groups) - 1
            if expert.negative_prompts:
                self._token_groups.append(encode_prompts(self.tokenizer, expert.negative_prompts))
            self._groups.append((positive, len(self._token_groups) - 1 if expert.negative_prompts else None))
        self._group_sizes = [len(g) for g in self._token_groups]
        self._hidden_groups = len(self._token_groups)
        if self.mode not in FITTED_GATE_MODES:
            self._pass = LayerPass(self._model, prompt_batches(self._token_groups), resolve_device(self.device),
                                   self._streamed)

    def _fit(self) -> None:
        """trained and ridge: the pass over every layer with the router_data's tokens too, then the fit."""
        from moelab.build.router_training import fitted_gates, training_tokens

        recipe, shared_weights, streamed = self.recipe, self.shared_weights, self._streamed
        training = training_tokens(self.tokenizer, recipe.experts, recipe.router_training, self.seed, self.recipe_dir)
        self._pass = LayerPass(self._model, prompt_batches(self._token_groups + training.groups),
                               resolve_device(self.device), streamed)
        per_layer = []
        self._pass.embed(shared_weights.get(EMBEDDING) if streamed else None)
        for layer in range(self.num_layers):
            self._note(f"routers: layer {layer + 1}/{self.num_layers} of the pass for {self.mode}")
            weights = self._layer_weights(layer, shared_weights.get) if streamed else None
            states = self._advance(layer, weights)
            first = sum(1 for b in self._pass.batches if b.group < self._hidden_groups)
            per_layer.append(training.features(states[first:]))
            if self._stop:
                raise _Stopped
        self._note(f"routers: fitting {self.num_layers} layers of router rows ({self.mode})")
        fitted, self.report = fitted_gates(training, per_layer, recipe.expert_names(), self.gates[:, :self.routed],
                                           self.mode, recipe.router_training)
        self.gates[:, :self.routed] = fitted

    def _layer_weights(self, layer: int, shared: Callable) -> Iterator[tuple[str, object]]:
        """Decoder layer `layer`'s weights for the pass, (name, tensor) one at a time: its shared tensors as `shared`
        gives them, and the base's dense MLP."""
        for name in self.shared_weights.names:
            if layer_of(name) == layer:
                yield name, shared(name)
        for name in self.dense_mlp(layer):
            yield name, self.base.tensors.get(name)

    def dense_mlp(self, layer: int) -> list[str]:
        """The base's own MLP tensors of `layer` (fused ones, like Phi-3's gate_up_proj, as they are stored)."""
        return [n for n in self.base.tensors.names() if n.startswith(layer_prefix(layer)) and is_dense_mlp(n)]

    def _advance(self, layer: int, weights):
        """Run the pass through `layer` and set its hidden-mode rows; returns the per-batch states."""
        writing, waiting = self._cores
        self._pass.workers = waiting if self._writer_waits else writing
        states = self._pass.run_layer(weights, router_input=self.mode in ("hidden", *FITTED_GATE_MODES))
        pool_mode = "hidden" if self.mode in FITTED_GATE_MODES else self.mode
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
