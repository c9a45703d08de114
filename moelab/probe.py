"""Routing capture for MoE models: which experts each token is sent to, per layer; labelled-prompt probes; heatmaps."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from moelab.errors import MoelabError
from moelab.files import read_user_text

# One colour per expert, shared by the terminal view and the heatmap (matplotlib's tab10, then tab20's light shades).
EXPERT_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
LAYER_BANDS = 4
HEATMAP_TOKENS_PER_ROW = 100


def expert_color(expert: int) -> str:
    return EXPERT_COLORS[expert % len(EXPERT_COLORS)]


@dataclass
class RoutingTrace:
    """The experts each token was sent to in every MoE layer: top-k ids (best first) and the weights applied."""

    tokens: list[str]
    token_ids: list[int]
    expert_names: list[str]
    layers: list[int]            # decoder layer index of each MoE block
    expert_ids: np.ndarray       # (tokens, MoE layers, k) int
    expert_weights: np.ndarray   # (tokens, MoE layers, k) float
    num_prompt_tokens: int       # the first ones are the prompt, the rest the answer

    def __len__(self) -> int:
        return len(self.tokens)

    def top_expert_per_token(self) -> tuple[np.ndarray, np.ndarray]:
        """Per token: the expert most layers ranked first, and the share of layers that did."""
        counts = self.top1_counts_per_token()
        return counts.argmax(axis=1), counts.max(axis=1) / max(len(self.layers), 1)

    def top1_counts_per_token(self) -> np.ndarray:
        """(tokens, experts): how many layers ranked each expert first for each token."""
        top1 = self.expert_ids[:, :, 0]
        return np.stack([(top1 == e).sum(axis=1) for e in range(len(self.expert_names))], axis=1)

    def choice_counts(self, layer_positions: Optional[Sequence[int]] = None) -> np.ndarray:
        """How many token-layer top-k choices went to each expert, over the given MoE layer positions (default all)."""
        chosen = self.expert_ids if layer_positions is None else self.expert_ids[:, list(layer_positions)]
        return np.bincount(chosen.reshape(-1), minlength=len(self.expert_names))

    def usage(self, layer_positions: Optional[Sequence[int]] = None) -> np.ndarray:
        """Each expert's share of the token-layer top-k choices, over the given MoE layer positions."""
        counts = self.choice_counts(layer_positions)
        return counts / max(counts.sum(), 1)

    def usage_per_layer(self) -> np.ndarray:
        """(MoE layers, experts) share of each layer's top-k choices."""
        return np.stack([self.usage([i]) for i in range(len(self.layers))])

    def layer_bands(self) -> list[tuple[str, list[int]]]:
        """Up to LAYER_BANDS contiguous groups of MoE layer positions, labelled by decoder layer (e.g. 'L0-7')."""
        bands = np.array_split(np.arange(len(self.layers)), min(LAYER_BANDS, len(self.layers)))
        return [(f"L{self.layers[b[0]]}-{self.layers[b[-1]]}" if len(b) > 1 else f"L{self.layers[b[0]]}", list(b))
                for b in bands]

    def tail(self, start: int) -> "RoutingTrace":
        """The trace of tokens from `start` on (e.g. the new part of a conversation)."""
        return RoutingTrace(self.tokens[start:], self.token_ids[start:], self.expert_names, self.layers,
                            self.expert_ids[start:], self.expert_weights[start:],
                            max(self.num_prompt_tokens - start, 0))

    def to_json(self) -> dict:
        return {
            "expert_names": self.expert_names,
            "layers": self.layers,
            "num_prompt_tokens": self.num_prompt_tokens,
            "tokens": [{"token": text, "id": token_id, "part": "prompt" if i < self.num_prompt_tokens else "answer",
                        "experts": self.expert_ids[i].tolist(),
                        "weights": np.round(self.expert_weights[i], 6).tolist()}
                       for i, (text, token_id) in enumerate(zip(self.tokens, self.token_ids))],
        }


@dataclass
class Router:
    layer: int     # decoder layer index
    module: object  # the MoE block's router: forward returns (logits, top-k weights, top-k ids)


def find_routers(model) -> list[Router]:
    """The router of every sparse-MoE block (a module holding `experts` and a `gate`), in layer order."""
    routers = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if not hasattr(module, "experts") or gate is None or not hasattr(gate, "top_k"):
            continue
        match = re.search(r"layers\.(\d+)\.", name)
        routers.append(Router(int(match.group(1)) if match else len(routers), gate))
    if not routers:
        model_type = getattr(model.config, "model_type", "?")
        raise MoelabError(f"not a Mixture-of-Experts model: no router found in this {model_type} model; "
                          "chat shows routing for mixtral, qwen2_moe and qwen3_moe models (e.g. from moelab build)")
    return sorted(routers, key=lambda r: r.layer)


class RoutingRecorder:
    """Forward hooks that keep each router's top-k choice; the model's outputs are untouched.

    `recording()` starts a fresh record; every forward pass inside it adds its tokens (batch 1); `take()` returns them.
    """

    def __init__(self, model):
        self.routers = find_routers(model)
        self._chunks: list[list] = [[] for _ in self.routers]

    @contextmanager
    def recording(self) -> Iterator["RoutingRecorder"]:
        self._chunks = [[] for _ in self.routers]
        hooks = [router.module.register_forward_hook(self._keeper(position))
                 for position, router in enumerate(self.routers)]
        try:
            yield self
        finally:
            for hook in hooks:
                hook.remove()

    def _keeper(self, position: int):
        def keep(_module, _inputs, output):
            _, weights, ids = output
            self._chunks[position].append((ids.detach(), weights.detach()))
        return keep

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, MoE layers, k) expert ids and weights recorded in the last `recording()`."""
        import torch

        ids = torch.stack([torch.cat([c[0] for c in chunks]) for chunks in self._chunks], dim=1)
        weights = torch.stack([torch.cat([c[1] for c in chunks]) for chunks in self._chunks], dim=1)
        return ids.cpu().numpy().astype(np.int64), weights.float().cpu().numpy()


def build_trace(tokenizer, token_ids: Sequence[int], expert_names: list[str], layers: list[int],
                recorded: tuple[np.ndarray, np.ndarray], num_prompt_tokens: int) -> RoutingTrace:
    ids, weights = recorded
    if ids.shape[0] != len(token_ids):
        raise AssertionError(f"recorded {ids.shape[0]} routed tokens for {len(token_ids)} tokens")
    return RoutingTrace([tokenizer.decode([t]) for t in token_ids], list(token_ids), expert_names, layers,
                        ids, weights, num_prompt_tokens)


def expert_names_for(folder: Path, num_experts: int) -> list[str]:
    """Expert names from the model folder's moelab.json, else its moelab_recipe.yaml, else E0..En."""
    from moelab.recipe import parse_recipe

    names: list[str] = []
    meta, recipe = folder / "moelab.json", folder / "moelab_recipe.yaml"
    if meta.is_file():
        names = [e.get("name") or f"E{i}" for i, e in enumerate(json.loads(meta.read_text()).get("experts", []))]
    elif recipe.is_file():
        names = parse_recipe(recipe.read_text(), str(recipe), allow_identical_experts=True).expert_names()
    return names if len(names) == num_experts else [f"E{i}" for i in range(num_experts)]


@dataclass
class MoeModel:
    model: object
    tokenizer: object
    folder: Path
    expert_names: list[str]
    recorder: RoutingRecorder

    @property
    def layers(self) -> list[int]:
        return [r.layer for r in self.recorder.routers]

    @property
    def device(self):
        return next(self.model.parameters()).device


# config.json keys of the expert count: mixtral's, then qwen2_moe's and qwen3_moe's.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")


def moe_folder(model_ref: str) -> tuple[Path, list[str]]:
    """The local folder of a MoE model and its expert names, checked from config.json before any weight is read."""
    from moelab.build.sources import resolve_model

    folder = resolve_model(model_ref)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MoelabError(f"cannot read {folder / 'config.json'} ({err}); point to a model folder") from None
    count = next((config[key] for key in EXPERT_COUNT_KEYS if isinstance(config.get(key), int)), 0)
    if count < 1:
        raise MoelabError(f"not a Mixture-of-Experts model: the config.json of {model_ref} ({config.get('model_type')}) "
                          "has no experts; chat shows routing for mixtral, qwen2_moe and qwen3_moe models (e.g. from "
                          "moelab build)")
    return folder, expert_names_for(folder, count)


def load_moe(model_ref: str, device: str = "auto", dtype: str = "auto") -> MoeModel:
    """Load a MoE model folder (or Hub id) for generation with routing capture."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moelab.build.gates import resolve_device
    from moelab.recipe import DTYPES

    if dtype != "auto" and dtype.lower() not in DTYPES:
        raise MoelabError(f"unknown dtype '{dtype}'; use auto, bfloat16, float16 or float32")
    folder, expert_names = moe_folder(model_ref)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype="auto" if dtype == "auto" else getattr(torch, DTYPES[dtype.lower()]),
        device_map=resolve_device(device))
    model.eval()
    return MoeModel(model, AutoTokenizer.from_pretrained(folder), folder, expert_names, RoutingRecorder(model))


def route_tokens(moe: MoeModel, token_ids: Sequence[int]) -> RoutingTrace:
    """One forward pass over `token_ids` (no generation) with routing recorded."""
    import torch

    with torch.no_grad(), moe.recorder.recording():
        moe.model(torch.tensor([list(token_ids)], device=moe.device), use_cache=False, logits_to_keep=1)
    return build_trace(moe.tokenizer, token_ids, moe.expert_names, moe.layers, moe.recorder.take(),
                       len(token_ids))


@dataclass
class LabelledPrompt:
    expert: str
    text: str


def load_labelled_prompts(path: Path, expert_names: Sequence[str]) -> list[LabelledPrompt]:
    """A YAML list or JSONL file of {expert: NAME, text: PROMPT}; every NAME must be one of the model's experts."""
    import yaml

    path = Path(path)
    text = read_user_text(path, "probe file")
    expected = "write a YAML list or JSONL of {expert: NAME, text: PROMPT}"
    try:
        if path.suffix == ".jsonl":
            rows = [(n, json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        else:
            items = yaml.safe_load(text) or []
            if not isinstance(items, list):
                raise MoelabError(f"{path} holds a {type(items).__name__}, not a list; {expected}")
            rows = list(enumerate(items, 1))
    except (ValueError, yaml.YAMLError, RecursionError) as err:
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        raise MoelabError(f"{path}: cannot parse it ({first_line}); {expected}") from None
    where = "line" if path.suffix == ".jsonl" else "item"
    prompts = []
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("expert"), str) or not isinstance(row.get("text"), str):
            raise MoelabError(f"{path} {where} {n}: expected {{expert: NAME, text: PROMPT}}; got {row!r:.80}")
        if row["expert"] not in expert_names:
            raise MoelabError(f"{path} {where} {n}: unknown expert '{row['expert']}'; "
                              f"this model's experts are {', '.join(expert_names)}")
        prompts.append(LabelledPrompt(row["expert"], row["text"]))
    if not prompts:
        raise MoelabError(f"{path} has no prompts; add lines like {{\"expert\": \"{expert_names[0]}\", \"text\": ...}}")
    return prompts


@dataclass
class ProbeResult:
    """How labelled prompts were routed: unit = one token in one layer, counted by its top-1 expert."""

    expert_names: list[str]
    confusion: np.ndarray        # (expected expert, chosen expert) counts of token-layer top-1 choices
    prompt_confusion: np.ndarray  # (expected, chosen) counts of prompts, by majority over their token-layer choices
    usage: np.ndarray            # share of all top-k token-layer choices per expert
    num_prompts: int
    num_tokens: int

    def shares(self) -> np.ndarray:
        """The confusion matrix as shares of each expected expert's row."""
        return self.confusion / np.maximum(self.confusion.sum(axis=1, keepdims=True), 1)

    def accuracy_per_expert(self) -> dict[str, Optional[float]]:
        rows = self.confusion.sum(axis=1)
        return {name: (float(self.confusion[i, i] / rows[i]) if rows[i] else None)
                for i, name in enumerate(self.expert_names)}

    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.confusion.sum(), 1))

    def prompt_accuracy(self) -> float:
        return float(np.trace(self.prompt_confusion) / max(self.prompt_confusion.sum(), 1))

    def load_balance_cv(self) -> float:
        """Coefficient of variation (std / mean) of expert usage: 0 is perfectly even."""
        return float(self.usage.std() / self.usage.mean())

    def to_json(self) -> dict:
        return {
            "expert_names": self.expert_names,
            "num_prompts": self.num_prompts,
            "num_tokens": self.num_tokens,
            "accuracy": round(self.accuracy(), 6),
            "prompt_accuracy": round(self.prompt_accuracy(), 6),
            "accuracy_per_expert": {k: None if v is None else round(v, 6)
                                    for k, v in self.accuracy_per_expert().items()},
            "load_balance_cv": round(self.load_balance_cv(), 6),
            "usage": dict(zip(self.expert_names, np.round(self.usage, 6).tolist())),
            "confusion": self.confusion.tolist(),
            "confusion_shares": np.round(self.shares(), 6).tolist(),
            "prompt_confusion": self.prompt_confusion.tolist(),
        }


def probe_routing(moe: MoeModel, prompts: Sequence[LabelledPrompt], show_progress: bool = False) -> ProbeResult:
    """Route each prompt (BOS + text, no chat template, as build's gates see prompts) and score the routing.

    The BOS token is left out of the counts: it is the same for every prompt and says nothing about its domain.
    """
    from rich.progress import track

    from moelab.build.gates import encode_prompts

    names = moe.expert_names
    index = {name: i for i, name in enumerate(names)}
    skip = 1 if moe.tokenizer.bos_token_id is not None else 0
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    prompt_confusion = np.zeros_like(confusion)
    usage_counts = np.zeros(len(names), dtype=np.int64)
    num_tokens = 0
    token_lists = encode_prompts(moe.tokenizer, [p.text for p in prompts])
    for prompt, token_ids in track(list(zip(prompts, token_lists)), description="routing prompts",
                                   disable=not show_progress, transient=True):
        trace = route_tokens(moe, token_ids).tail(skip if len(token_ids) > skip else 0)
        chosen = trace.top1_counts_per_token().sum(axis=0)
        confusion[index[prompt.expert]] += chosen
        prompt_confusion[index[prompt.expert], chosen.argmax()] += 1
        usage_counts += trace.choice_counts()
        num_tokens += len(trace)
    return ProbeResult(names, confusion, prompt_confusion, usage_counts / usage_counts.sum(), len(prompts), num_tokens)


def save_heatmap(trace: RoutingTrace, path: Path) -> Path:
    """A PNG of tokens x layers coloured by top-1 expert (rows of HEATMAP_TOKENS_PER_ROW tokens), above a
    layers x experts usage map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from moelab.leaderboard import save_figure_atomic

    names, num_layers = trace.expert_names, len(trace.layers)
    chunks = [range(s, min(s + HEATMAP_TOKENS_PER_ROW, len(trace))) for s in range(0, len(trace),
                                                                                      HEATMAP_TOKENS_PER_ROW)]
    token_panel_h = 1.3 + 0.16 * num_layers
    usage_panel_h = 1.4 + 0.35 * len(names)
    width = max(10.0, 0.16 * min(len(trace), HEATMAP_TOKENS_PER_ROW) + 2.5)
    fig, axes = plt.subplots(len(chunks) + 1, 1, figsize=(width, token_panel_h * len(chunks) + usage_panel_h + 0.8),
                             height_ratios=[token_panel_h] * len(chunks) + [usage_panel_h], squeeze=False)
    colors = ListedColormap([expert_color(e) for e in range(len(names))])
    top1 = trace.expert_ids[:, :, 0]
    layer_ticks = range(0, num_layers, 1 if num_layers <= 40 else 5)
    for ax, chunk in zip(axes[:-1, 0], chunks):
        ax.imshow(top1[chunk.start:chunk.stop].T, cmap=colors, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto",
                  interpolation="nearest", extent=(chunk.start - 0.5, chunk.stop - 0.5, num_layers - 0.5, -0.5))
        ax.set_xticks(list(chunk), [_token_label(trace.tokens[i]) for i in chunk], rotation=90, fontsize=7,
                      fontfamily="monospace")
        ax.set_xlim(chunk.start - 0.5, chunk.start + HEATMAP_TOKENS_PER_ROW - 0.5 if len(chunks) > 1
                    else chunk.stop - 0.5)
        ax.set_yticks(list(layer_ticks), [str(trace.layers[i]) for i in layer_ticks], fontsize=7)
        ax.set_ylabel("layer")
        if chunk.start < trace.num_prompt_tokens < chunk.stop:
            ax.axvline(trace.num_prompt_tokens - 0.5, color="black", linewidth=2)
    axes[0, 0].set_title("top-1 expert per token and layer" +
                         (" (black line: prompt | answer)" if 0 < trace.num_prompt_tokens < len(trace) else ""),
                         fontsize=10, loc="left")
    axes[0, 0].legend(handles=[Patch(color=expert_color(e), label=n) for e, n in enumerate(names)],
                      loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(names), fontsize=8, frameon=False)

    ax = axes[-1, 0]
    usage = trace.usage_per_layer().T  # (experts, layers)
    image = ax.imshow(usage, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(list(layer_ticks), [str(trace.layers[i]) for i in layer_ticks], fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title("share of each layer's top-k choices per expert", fontsize=10, loc="left")
    if num_layers <= 40:
        for (e, layer), share in np.ndenumerate(usage):
            ax.text(layer, e, f"{share * 100:.0f}", ha="center", va="center", fontsize=6,
                    color="white" if share < 0.6 else "black")
    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    return save_figure_atomic(fig, Path(path))


def _token_label(token: str) -> str:
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    return shown if len(shown) <= 12 else shown[:11] + "…"
