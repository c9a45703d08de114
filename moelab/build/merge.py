"""Shared (non-expert) weights: taken from the base, or merged from the base and the experts' deltas.

With base tensor b and the experts' tensors e_i (each distinct expert model once, weights w_i, default 1):
- base:            b (mergekit-moe's behaviour: what the experts changed outside their MLPs is dropped)
- average:         mean of b and the e_i
- task_arithmetic: b + sum_i w_i * (e_i - b)
- ties:            b + sum_i w_i * d_i over the agreeing entries / their count, where d_i = e_i - b trimmed to its
                   `density` share of largest magnitudes, and the sign of each entry is elected as the sign of
                   sum_i w_i * d_i (Yadav et al. 2023, "TIES-Merging").
"""

from __future__ import annotations

from typing import Sequence

from moelab.errors import MoelabError
from moelab.recipe import SHARED_WEIGHT_MODES

# Above this relative norm, what `base` drops from an expert is worth a warning (a LoRA on attention is ~1e-2).
DROPPED_DELTA_WARNING = 1e-3


def merge_shared(mode: str, base, experts: Sequence, weights: Sequence[float], density: float = 0.5):
    """The merged float32 tensor for one shared weight (see the module docstring)."""
    import torch

    b = base.float()
    if mode == "base" or not experts:
        return b
    if mode == "average":
        return torch.stack([b] + [e.float() for e in experts]).mean(dim=0)
    deltas = [w * (e.float() - b) for e, w in zip(experts, weights)]
    if mode == "task_arithmetic":
        return b + torch.stack(deltas).sum(dim=0)
    if mode == "ties":
        trimmed = torch.stack([_trim(d, density) for d in deltas])
        sign = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(dim=0).clamp(min=1)
        return b + (trimmed * agree).sum(dim=0) / count
    raise MoelabError(f"unknown shared_weights '{mode}'; use one of {', '.join(SHARED_WEIGHT_MODES)}")


def _trim(delta, density: float):
    """Keep the `density` share of entries with the largest magnitude, zero the rest."""
    import torch

    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return delta
    threshold = torch.topk(delta.abs().flatten(), keep, sorted=False).values.min()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


class SharedWeights:
    """The MoE's non-expert tensors under a shared_weights mode, read and merged one tensor at a time."""

    def __init__(self, mode: str, base, contributors: Sequence[tuple[str, object, float]], density: float,
                 names: Sequence[str]):
        self.mode = mode
        self.base = base                  # SafetensorsFolder
        self.contributors = contributors  # (expert name, SafetensorsFolder, weight), each distinct model once
        self.density = density
        self.names = list(names)

    @property
    def merged(self) -> bool:
        return self.mode != "base" and bool(self.contributors)

    def get(self, name: str):
        if not self.merged:
            return self.base.get(name)
        return merge_shared(self.mode, self.base.get(name), [c.get(name) for _, c, _ in self.contributors],
                            [w for _, _, w in self.contributors], self.density)

    def check_shapes(self) -> None:
        for expert, tensors, _ in self.contributors:
            for name in self.names:
                if name not in tensors:
                    raise MoelabError(f"expert {expert} has no tensor {name}, which shared_weights: {self.mode} "
                                      "merges; use shared_weights: base")
                if tensors.info(name)[0] != self.base.info(name)[0]:
                    raise MoelabError(
                        f"expert {expert}'s {name} has shape {list(tensors.info(name)[0])} but the base's is "
                        f"{list(self.base.info(name)[0])}; shared_weights: {self.mode} needs equal shapes "
                        "(use shared_weights: base)")

    def relative_deltas(self) -> dict[str, float]:
        """Per expert: ||expert - base|| / ||base|| over the shared tensors they both have with equal shapes."""
        import torch

        delta_sq = {expert: 0.0 for expert, _, _ in self.contributors}
        base_sq = dict(delta_sq)
        for name in self.names:
            base = self.base.get(name)
            base_norm_sq = float(torch.linalg.vector_norm(base, dtype=torch.float32)) ** 2
            for expert, tensors, _ in self.contributors:
                if name in tensors and tensors.info(name)[0] == tuple(base.shape):
                    # Differences of nearby floats are exact in their own dtype; the norm accumulates in float32.
                    delta = tensors.get(name).to(base.dtype) - base
                    delta_sq[expert] += float(torch.linalg.vector_norm(delta, dtype=torch.float32)) ** 2
                    base_sq[expert] += base_norm_sq
        return {e: (delta_sq[e] / base_sq[e]) ** 0.5 if base_sq[e] else 0.0 for e in delta_sq}
