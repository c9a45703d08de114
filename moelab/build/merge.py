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


def sum_of_squares(tensor, minus=None, chunk: int = 2**18) -> float:
    """sum((tensor - minus)^2), the difference taken in minus's dtype (exact for nearby floats), squared and summed
    in float32 over chunks of 262,144 entries, the chunks' sums added in float64. Chunks that fit the cache make it
    6x faster than one float32 reduction over a large tensor, which is also off by 1-2% over 65M entries (an
    embedding); this is within 1e-5. Chunks of 65,536 took 1.6x as long (the loop's own overhead: a 1B embedding
    and its delta, 0.18 s against 0.11 s on one core)."""
    import torch

    flat = tensor.reshape(-1)
    other = None if minus is None else minus.reshape(-1)
    total = 0.0
    for start in range(0, flat.numel(), chunk):
        part = flat[start:start + chunk]
        if other is not None:
            part = part.to(other.dtype) - other[start:start + chunk]
        part = part.float()
        total += float(torch.dot(part, part))
    return total


def _trim(delta, density: float):
    """Keep the `density` share of entries with the largest magnitude, zero the rest."""
    import torch

    keep = max(1, int(round(density * delta.numel())))
    if keep >= delta.numel():
        return delta
    threshold = torch.topk(delta.abs().flatten(), keep, sorted=False).values.min()
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


class SharedWeights:
    """The MoE's non-expert tensors under a shared_weights mode, merged one tensor at a time.

    Each merge also measures how far every expert moved that tensor from the base (relative_deltas), so both come
    from the same single read of the sources.
    """

    def __init__(self, mode: str, base, contributors: Sequence[tuple[str, object, float]], density: float,
                 names: Sequence[str]):
        self.mode = mode
        self.base = base                  # SafetensorsFolder
        self.contributors = contributors  # (expert name, SafetensorsFolder, weight), each distinct model once
        self.density = density
        self.names = list(names)
        self._delta_sq: dict[str, dict[str, tuple[float, float]]] = {}  # tensor -> expert -> (|e-b|^2, |b|^2)

    @property
    def merged(self) -> bool:
        return self.mode != "base" and bool(self.contributors)

    def _measured(self, name: str) -> list[tuple[str, object, float]]:
        """The contributors whose tensor `name` can be compared with the base's."""
        shape = self.base.info(name)[0]
        return [c for c in self.contributors if name in c[1] and c[1].info(name)[0] == shape]

    def reads(self, name: str) -> list:
        """The source tensors that merge() needs for `name`: the base's, then each measured contributor's."""
        from moelab.build.tensors import SourceTensor

        return [SourceTensor(self.base, name)] + [SourceTensor(c, name) for _, c, _ in self._measured(name)]

    def merge(self, name: str, base, *contributed):
        """The shared tensor `name` from the tensors of reads(name); records the experts' deltas of it."""
        measured = self._measured(name)
        base_norm_sq = sum_of_squares(base)
        self._delta_sq[name] = {expert: (sum_of_squares(tensor, base), base_norm_sq)
                                for (expert, _, _), tensor in zip(measured, contributed)}
        if not self.merged:
            return base
        return merge_shared(self.mode, base, list(contributed), [w for _, _, w in measured], self.density)

    def get(self, name: str):
        """merge() of `name`, reading its sources here."""
        return self.merge(name, *[read.source.get(read.name) for read in self.reads(name)])

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
        """Per expert: ||expert - base|| / ||base|| over the shared tensors merged so far that both have."""
        delta_sq = {expert: 0.0 for expert, _, _ in self.contributors}
        base_sq = dict(delta_sq)
        for name in self.names:  # in the same order whatever order the tensors were merged in
            for expert, (d_sq, b_sq) in self._delta_sq.get(name, {}).items():
                delta_sq[expert] += d_sq
                base_sq[expert] += b_sq
        return {e: (delta_sq[e] / base_sq[e]) ** 0.5 if base_sq[e] else 0.0 for e in delta_sq}
