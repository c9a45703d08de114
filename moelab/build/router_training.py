"""gate_mode trained and ridge: router rows fitted, layer by layer, to tell apart the experts' domains token by token.

For each expert, examples of its domain (its `router_data` file, else its positive prompts) run through the base
model (with the MoE's shared weights) once; at every layer l the router's input x_l is kept for a seeded sample of
tokens, labelled with the expert whose domain they came from. Part of the examples is held out. Per layer:

- trained: W_l (E x H) starts from the `hidden` solution and minimises, by full-batch Adam,

      cross_entropy(W_l x, label)  +  balance * E * sum_e mean_x(softmax(W_l x)_e)^2

  The second term is 1 when the router's average load is uniform and grows as it concentrates on few experts.
- ridge: the closed-form least-squares fit of the logits to margin * (onehot(label) - 1/E), every domain weighted
  the same, with penalty alpha * mean eigenvalue of the (weighted) Gram matrix of x, so that alpha does not depend
  on the scale of x. Routers have no bias, so x is not centered: its mean, large after the norm, serves as one.
  Softmax ignores a shift shared by all experts, hence the 1/E: the fit spends nothing on the constant. `margin` is
  the logit gap aimed for between a token's own expert and the others; it sets the mix of top-k>1 routing weights.

Only router rows change. Routing quality (top-1 accuracy per expert and load balance, the coefficient of variation
of top-1 usage over tokens and layers) is measured on held-out tokens, as many from each domain, for both `hidden`
and the fitted rows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from moelab.errors import MoelabError
from moelab.files import json_lines, read_user_text
from moelab.recipe import Expert, RouterTraining

MIN_EXAMPLES = 2  # one to fit, one held out


@dataclass
class RoutingQuality:
    accuracy: dict[str, float]   # expert -> share of its held-out (token, layer) pairs routed to it (top-1)
    overall: float               # mean of the per-expert accuracies
    balance_cv: float            # std / mean of top-1 usage shares over held-out tokens and layers (0 = even)


@dataclass
class RouterReport:
    mode: str                    # the gate_mode of the fitted rows: trained or ridge
    hidden: RoutingQuality
    fitted: RoutingQuality
    train_tokens: int
    heldout_tokens: int
    fit_s: float                 # seconds of the fit itself (not the hidden-state pass)

    def to_json(self) -> dict:
        """As kept in moelab.json: the fitted rows' quality under the mode's name ("trained" or "ridge")."""
        fields = asdict(self)
        fields[self.mode] = fields.pop("fitted")
        return fields


def fitted_mode(routing: dict) -> str:
    """The key of the fitted rows' quality in a RouterReport's JSON (moelab.json files older than ridge: trained)."""
    return routing.get("mode", "trained")


def read_router_data(path: Path) -> list[str]:
    """Examples from a JSONL file (each row's "text", else its string values joined) or a text file (one per line);
    at least two, since some are held out."""
    text = read_user_text(path, "router_data")
    if path.suffix == ".jsonl":
        examples = [_row_text(path, number, row) for number, row in json_lines(text, path, "router_data")]
    else:
        examples = [line for line in text.splitlines() if line.strip()]
    if len(examples) < MIN_EXAMPLES:
        raise MoelabError(f"router_data {path} has {len(examples)} example(s); give at least {MIN_EXAMPLES} (some are "
                          "held out to measure routing)")
    return examples


def _row_text(path: Path, number: int, row: dict) -> str:
    text = row["text"] if "text" in row else " ".join(v for v in row.values() if isinstance(v, str))
    if not isinstance(text, str) or not text.strip():
        raise MoelabError(f'{path} line {number} has no text (a non-empty string in "text", or string fields)')
    return text


def _split_examples(examples: list[str], options: RouterTraining, generator) -> tuple[list[str], list[str]]:
    import torch

    order = torch.randperm(len(examples), generator=generator).tolist()[:options.examples]
    chosen = [examples[i] for i in order]
    heldout = min(len(chosen) - 1, max(1, int(round(options.holdout * len(chosen)))))
    return chosen[heldout:], chosen[:heldout]


@dataclass
class TrainingTokens:
    """The tokens of every expert's fitting and held-out examples, and which of them are sampled as features.

    groups[2e] and groups[2e + 1] are expert e's fitting and held-out token lists; picks[g][b] lists the
    (row, positions) sampled in batch b of group g. The seeded generator continues in fitted_gates.
    """
    groups: list[list[list[int]]]
    picks: list[list[list[tuple[int, object]]]]
    generator: object

    def features(self, states: list) -> list:
        """Per group, the (N, H) router inputs at the picked tokens; `states`: one layer's, per batch of these groups."""
        import torch

        chunks = iter(states)
        return [torch.cat([torch.cat([s[row, pos] for row, pos in batch_picks])
                           for batch_picks, s in zip(group_picks, chunks)]) if group_picks else None
                for group_picks in self.picks]


def training_tokens(tokenizer, experts: Sequence[Expert], options: RouterTraining, seed: int,
                    recipe_dir: Optional[Path]) -> TrainingTokens:
    """Each expert's examples (its `router_data` file, else its positive prompts), split, cut and sampled."""
    import torch

    from moelab.build.gates import encode_prompts
    from moelab.build.layer_pass import PROMPT_BATCH
    from moelab.build.sources import resolve_data_path

    generator = torch.Generator().manual_seed(seed)
    skip = 1 if tokenizer.bos_token_id is not None else 0
    groups, picks = [], []
    for expert in experts:
        examples = (read_router_data(resolve_data_path(expert.router_data, recipe_dir)) if expert.router_data
                    else list(expert.positive_prompts))
        for part in _split_examples(examples, options, generator):
            ids = [seq[:options.tokens] for seq in encode_prompts(tokenizer, part)]
            group_picks = []
            for start in range(0, len(ids), PROMPT_BATCH):
                batch_picks = []
                for row, seq in enumerate(ids[start:start + PROMPT_BATCH]):
                    positions = torch.arange(skip, len(seq))
                    keep = torch.randperm(len(positions), generator=generator)[:options.tokens_per_example]
                    batch_picks.append((row, positions[keep]))
                group_picks.append(batch_picks)
            groups.append(ids)
            picks.append(group_picks)
    return TrainingTokens(groups, picks, generator)


def routing_quality(gates, features, labels, names: Sequence[str]) -> RoutingQuality:
    """Top-1 routing of held-out tokens: per-expert accuracy and load balance (see the module docstring)."""
    import torch

    choice = torch.einsum("lnh,leh->lne", features, gates.float()).argmax(dim=-1)  # (L, N)
    correct = choice == labels.unsqueeze(0)
    accuracy = {name: float(correct[:, labels == e].float().mean()) for e, name in enumerate(names)
                if bool((labels == e).any())}
    usage = torch.bincount(choice.flatten(), minlength=len(names)).float()
    usage = usage / usage.sum()
    return RoutingQuality(accuracy=accuracy, overall=sum(accuracy.values()) / len(accuracy),
                          balance_cv=float(usage.std(unbiased=False) / usage.mean()))


def fit_routers(features, labels, init, options: RouterTraining):
    """W (L, E, H) from `init` by full-batch Adam on cross-entropy plus the balance term, all layers at once.

    The layers' problems are independent; summing their losses fits them together in one loop of small steps.
    """
    import torch

    num_layers, num_experts = init.shape[0], init.shape[1]
    weight = init.clone().float().requires_grad_(True)
    counts = torch.bincount(labels, minlength=num_experts).float()
    class_weight = counts.sum() / (num_experts * counts.clamp(min=1))  # every domain counts the same
    targets = labels.repeat(num_layers)
    optimizer = torch.optim.Adam([weight], lr=options.lr)
    for _ in range(options.steps):
        optimizer.zero_grad()
        logits = torch.einsum("lnh,leh->lne", features, weight)
        load = torch.softmax(logits, dim=-1).mean(dim=1)  # (L, E)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, num_experts), targets, weight=class_weight) + \
            options.balance * num_experts * load.square().sum(dim=-1).mean()
        (loss * num_layers).backward()
        optimizer.step()
    return weight.detach()


def ridge_routers(features, labels, num_experts: int, options: RouterTraining):
    """W (L, E, H): per layer, the weighted ridge fit of W x to margin * (onehot(label) - 1/E) (module docstring)."""
    import torch

    counts = torch.bincount(labels, minlength=num_experts).float()
    sample_weight = (counts.sum() / (num_experts * counts.clamp(min=1)))[labels]  # every domain counts the same
    targets = options.margin * (torch.nn.functional.one_hot(labels, num_experts).float() - 1 / num_experts)
    weighted = features * sample_weight.sqrt()[None, :, None]
    gram = (weighted.transpose(1, 2) @ weighted).double()  # (L, H, H); float32 sums, a float64 solve
    hidden = gram.shape[-1]
    penalty = options.alpha * gram.diagonal(dim1=-2, dim2=-1).sum(dim=-1) / hidden  # alpha x mean eigenvalue
    gram = gram + penalty[:, None, None] * torch.eye(hidden, dtype=gram.dtype)
    moments = (weighted.transpose(1, 2) @ (targets * sample_weight.sqrt()[:, None])).double()
    return torch.linalg.solve(gram, moments).transpose(1, 2).float()


def fitted_gates(training: TrainingTokens, per_layer: list, names: Sequence[str], hidden_gates, mode: str,
                 options: RouterTraining):
    """(gates (L, E, H), RouterReport) for the routed experts, by gate_mode `mode` (trained or ridge);
    `hidden_gates` is trained's starting point and the baseline of the report.

    `per_layer[l]`: TrainingTokens.features of layer l's router inputs.
    """
    import torch

    generator = training.generator
    by_group = [torch.stack([layer[g] for layer in per_layer]) if per_layer[0][g] is not None else None
                for g in range(len(training.groups))]
    train, heldout = by_group[0::2], by_group[1::2]
    if all(f is None for f in heldout):
        raise MoelabError(f"gate_mode {mode}: no expert has the 2 or more examples needed to hold some out and "
                          "measure routing; give the experts router_data files (or more positive_prompts)")
    labels = torch.cat([torch.full((f.shape[1],), e) for e, f in enumerate(train)])
    features = torch.cat(train, dim=1)
    started = time.perf_counter()
    gates = (ridge_routers(features, labels, len(train), options) if mode == "ridge"
             else fit_routers(features, labels, hidden_gates, options))
    fit_s = time.perf_counter() - started
    held = [(e, f) for e, f in enumerate(heldout) if f is not None]
    # The same number of held-out tokens per domain, so that perfect routing has even usage (CV 0).
    per_domain = min(f.shape[1] for _, f in held)
    held = [(e, f[:, torch.randperm(f.shape[1], generator=generator)[:per_domain]]) for e, f in held]
    held_features = torch.cat([f for _, f in held], dim=1)
    held_labels = torch.cat([torch.full((f.shape[1],), e) for e, f in held])
    report = RouterReport(mode=mode, hidden=routing_quality(hidden_gates, held_features, held_labels, names),
                          fitted=routing_quality(gates, held_features, held_labels, names),
                          train_tokens=int(labels.numel()), heldout_tokens=int(held_labels.numel()),
                          fit_s=round(fit_s, 3))
    return gates, report
