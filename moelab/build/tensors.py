"""Lazy tensor reading from safetensors folders, and streamed writing of sharded safetensors with an index."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from moelab.errors import MoelabError

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class SafetensorsFolder:
    """The tensors of one model folder, read one at a time (memory-mapped) on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            weight_map = {name: single.name for name in _header(single)}
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, dict] = {}
        self._handles: dict = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype) from the file header, without reading the data."""
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = _header(self.folder / file)
        entry = self._headers[file][name]
        return tuple(entry["shape"]), entry["dtype"]

    def get(self, name: str):
        from safetensors import safe_open

        if name not in self.weight_map:
            raise MoelabError(f"tensor {name} is missing from {self.folder}; the checkpoint is incomplete")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(self.folder / file, framework="pt")
        return self._handles[file].get_tensor(name)


def _header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise MoelabError(f"cannot read safetensors file {path}: {err}; the file is missing or corrupt") from None
    header.pop("__metadata__", None)
    return header


@dataclass
class PlannedTensor:
    """One output tensor: its name, shape and dtype are known before `produce` computes its data."""
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16"
    produce: Callable[[], object]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPE_BYTES[self.dtype]


def plan_shards(tensors: list[PlannedTensor], shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def write_sharded(tensors: list[PlannedTensor], folder: Path, shard_bytes: int,
                  on_tensor: Callable[[PlannedTensor], None] = lambda t: None) -> list[str]:
    """Write tensors as `model-0000k-of-0000n.safetensors` plus the index; returns the shard file names.

    Each header is computed from the plan, so every tensor is produced, written and dropped one at a time.
    """
    shards = plan_shards(tensors, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        _write_shard(folder / file_name, shard, on_tensor)
        weight_map.update({t.name: file_name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_shard(path: Path, shard: Iterable[PlannedTensor], on_tensor) -> None:
    import torch

    header, offset = {}, 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for t in shard:
            data = t.produce()
            if tuple(data.shape) != t.shape or SAFETENSORS_DTYPES[str(data.dtype).removeprefix("torch.")] != t.dtype:
                raise RuntimeError(f"{t.name}: produced {tuple(data.shape)} {data.dtype}, planned {t.shape} {t.dtype}")
            if data.numel():
                f.write(data.contiguous().view(-1).view(torch.uint8).numpy().data)
            on_tensor(t)
