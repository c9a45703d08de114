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
TORCH_DTYPES = {code: name for name, code in SAFETENSORS_DTYPES.items()}


class SafetensorsFolder:
    """The tensors of one model folder, each read on demand with a plain file read.

    Plain reads rather than memory maps: mapped pages of every source would stay resident and count towards the
    build's memory, while a read tensor is freed as soon as it is written.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            weight_map = {name: single.name for name in _read_header(single)[1]}
        self.weight_map: dict[str, str] = weight_map
        self._headers: dict[str, tuple[int, dict]] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype) from the file header, without reading the data."""
        entry = self._entry(name)[1]
        return tuple(entry["shape"]), entry["dtype"]

    def _entry(self, name: str) -> tuple[int, dict]:
        if name not in self.weight_map:
            raise MoelabError(f"tensor {name} is missing from {self.folder}; the checkpoint is incomplete")
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = _read_header(self.folder / file)
        data_start, entries = self._headers[file]
        return data_start, entries[name]

    def get(self, name: str):
        import torch

        data_start, entry = self._entry(name)
        shape, dtype = tuple(entry["shape"]), getattr(torch, TORCH_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(end - begin)
        path = self.folder / self.weight_map[name]
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            if f.readinto(buffer) != len(buffer):
                raise MoelabError(f"{path} ends inside tensor {name}; the file is truncated, download it again")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def overwrite(self, name: str, tensor) -> None:
        """Write new data over a tensor in its file, in place; the shape and dtype must be the stored ones."""
        import torch

        data_start, entry = self._entry(name)
        code = SAFETENSORS_DTYPES[str(tensor.dtype).removeprefix("torch.")]
        if list(tensor.shape) != entry["shape"] or code != entry["dtype"]:
            raise RuntimeError(f"{name}: new data is {tuple(tensor.shape)} {code}, stored {entry['shape']} "
                               f"{entry['dtype']}")
        with open(self.folder / self.weight_map[name], "r+b") as f:
            f.seek(data_start + entry["data_offsets"][0])
            f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {tensor name: entry}) of a safetensors file."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as err:
        raise MoelabError(f"cannot read safetensors file {path}: {err}; the file is missing or corrupt") from None
    header.pop("__metadata__", None)
    return 8 + length, header


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
