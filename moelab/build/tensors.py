"""Lazy tensor reading from safetensors folders, and streamed writing of sharded safetensors with an index."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from moelab.errors import MoelabError

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64", "int64": "I64",
                      "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_DTYPES = {code: name for name, code in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 10**6  # the safetensors format's own limit


class SafetensorsFolder:
    """The tensors of one model folder, each read on demand with a plain file read.

    Plain reads rather than memory maps: mapped pages of every source would stay resident and count towards the
    build's memory, while a read tensor is freed as soon as it is written.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_weight_map(index)
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
        if name not in entries:
            raise MoelabError(f"the index of {self.folder} puts {name} in {file}, which does not hold it; the index is "
                              "damaged, download or save the model again")
        return data_start, entries[name]

    def get(self, name: str):
        import torch

        path, offset, nbytes = self.span(name)
        entry = self._entry(name)[1]
        shape, dtype = tuple(entry["shape"]), getattr(torch, TORCH_DTYPES[entry["dtype"]])
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buffer = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled first, as a bytearray would be
        fd = os.open(path, os.O_RDONLY)
        try:
            # One large read per tensor; the kernel reads ahead further on a file said to be read in order.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if _read_into(fd, memoryview(buffer.numpy()), offset) != nbytes:
                raise MoelabError(f"{path} ends inside tensor {name}; the file is truncated, download it again")
        finally:
            os.close(fd)
        return buffer.view(dtype).reshape(shape)

    def span(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset in it, byte count) of the stored tensor `name`."""
        data_start, entry = self._entry(name)
        begin, end = entry["data_offsets"]
        return self.folder / self.weight_map[name], data_start + begin, end - begin

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

    def nbytes(self, name: str) -> int:
        return self.span(name)[2]


def _read_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `fd` at `offset`; the byte count read (less only at the end of the file). Linux reads at
    most about 2 GB per call, and embeddings of large vocabularies are larger."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def _read_weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, each shard a file of the folder itself."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise MoelabError(f"cannot read {index} ({type(err).__name__}: {err}); the index is damaged, download or "
                          "save the model again") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(file, str) and Path(file).name == file and file not in ("", ".", "..")
            for file in weight_map.values()):
        raise MoelabError(f"{index}: weight_map must map tensor names to shard file names in the same folder; the "
                          "index is damaged, download or save the model again")
    return weight_map


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data section, {tensor name: entry}) of a safetensors file, each entry checked against the
    file, so that a damaged header is an error here rather than a wrong tensor later."""
    try:
        with open(path, "rb") as f:
            file_bytes = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(MAX_HEADER_BYTES, file_bytes - 8):
                raise ValueError(f"header length {length} is larger than the file or the format's limit")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        for name, entry in header.items():
            _check_entry(name, entry, file_bytes - 8 - length)
    except (OSError, struct.error, ValueError, RecursionError) as err:
        raise MoelabError(f"cannot read safetensors file {path}: {err}; the file is missing or corrupt") from None
    return 8 + length, header


def _check_entry(name: str, entry, data_bytes: int) -> None:
    if not (isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES and _whole_numbers(entry.get("shape"))
            and _whole_numbers(entry.get("data_offsets")) and len(entry["data_offsets"]) == 2):
        raise ValueError(f"tensor {name!r} has a malformed or unsupported entry {str(entry)[:200]}")
    begin, end = entry["data_offsets"]
    count = 1
    for dim in entry["shape"]:
        count *= dim
    if not begin <= end <= data_bytes or end - begin != count * DTYPE_BYTES[entry["dtype"]]:
        raise ValueError(f"tensor {name} ({entry['dtype']} {entry['shape']}) does not fit its data_offsets "
                         f"{entry['data_offsets']} in {data_bytes} bytes of data")


def _whole_numbers(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)

@dataclass(frozen=True)
class SourceTensor:
    """One tensor of one source folder, as a plan names it."""
    source: SafetensorsFolder
    name: str

    @property
    def key(self) -> tuple[Path, str]:
        return self.source.folder.resolve(), self.name


@dataclass
class PlannedTensor:
    """One output tensor: a function of source tensors, whose name, shape and dtype are known before it is computed.

    `produce` gets the tensors of `reads`, in order, read once each however many planned tensors use them.
    A `verbatim` tensor is its one read's stored bytes unchanged, so the writer copies them file to file instead;
    a `late` one is produced after all the others (it waits on work that runs meanwhile).
    """
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "BF16"
    produce: Callable[..., object]
    reads: list[SourceTensor] = field(default_factory=list)
    verbatim: bool = False
    late: bool = False

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


class ReadAhead:
    """Every source tensor a plan reads, read once, in plan order, on a thread that stays ahead of its use.

    At most `budget_bytes` are read and not yet used (one tensor more when a single one is larger). A tensor that
    several planned tensors read stays until the last of them has it. File reads release the GIL, so reading
    overlaps the main thread's conversion, merging and writing.
    """

    def __init__(self, plan: list[PlannedTensor], budget_bytes: int):
        self._uses = Counter(read.key for t in plan for read in t.reads)
        first = {}
        for read in (read for t in plan for read in t.reads):
            first.setdefault(read.key, read)
        self._order = list(first.values())
        self._budget = budget_bytes
        self._ready: dict[tuple, object] = {}
        self._ahead_bytes = 0  # read, and not yet taken for the first time
        self._untaken: set[tuple] = set()
        self._error: Optional[BaseException] = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read_all, name="moelab-read-ahead", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        for read in self._order:
            size = read.source.nbytes(read.name)
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._ahead_bytes == 0
                                    or self._ahead_bytes + size <= self._budget)
                if self._stop:
                    return
            try:
                tensor = read.source.get(read.name)
            except BaseException as err:  # handed to the main thread, which raises it where the tensor is used
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._ready[read.key] = tensor
                self._untaken.add(read.key)
                self._ahead_bytes += size
                self._cond.notify_all()

    def take(self, read: SourceTensor):
        key = read.key
        with self._cond:
            self._cond.wait_for(lambda: key in self._ready or self._error is not None)
            if key not in self._ready:
                raise self._error
            tensor = self._ready[key]
            if key in self._untaken:
                self._untaken.discard(key)
                self._ahead_bytes -= read.source.nbytes(read.name)
                self._cond.notify_all()
            self._uses[key] -= 1
            if self._uses[key] == 0:
                del self._ready[key]
        return tensor

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._ready.clear()
            self._cond.notify_all()
        self._thread.join()


def bound_malloc() -> None:
    """At most two glibc heaps for all threads (no-op without glibc).

    glibc gives each thread that allocates its own heap, up to 8 per core, and memory freed into one heap is not
    reused by the others: with the read-ahead thread allocating every tensor and the main thread freeing it,
    the build's footprint would otherwise grow by heaps that hold only freed tensors.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_arena_max = -8
    libc.mallopt(m_arena_max, 2)


def write_sharded(tensors: list[PlannedTensor], folder: Path, shard_bytes: int,
                  on_tensor: Callable[[PlannedTensor], None] = lambda t: None,
                  read_ahead_bytes: int = 160 * 2**20, meanwhile: Callable[[], None] = lambda: None) -> list[str]:
    """Write tensors as `model-0000k-of-0000n.safetensors` plus the index; returns the shard file names.

    Every header is computed from the plan, so each tensor goes straight to its place in its shard, in any order.
    The verbatim tensors (most of a build's bytes: the experts' MLP matrices as stored) are copied file to file on
    a thread (VerbatimCopies) that starts first. The calling thread meanwhile runs `meanwhile` (the build's set-up
    of its routers, mostly imports, which need no disk), then produces, writes and drops the other tensors one at
    a time in plan order, the late ones last, while the source tensors that come next are read ahead (ReadAhead).
    160 MB ahead keeps a 4x135M build under 1 GB peak (256 MB: 1.04 GB) at the same wall time
    (scripts/bench_build.py, 3 runs each).
    """
    shards = plan_shards(tensors, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    places: dict[str, tuple[int, int]] = {}  # tensor name -> (file descriptor, offset of its data)
    fds: list[int] = []
    try:
        for file_name, shard in zip(names, shards):
            fds.append(os.open(folder / file_name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))
            places.update(_start_shard(fds[-1], shard))
        copies = VerbatimCopies([(t, *places[t.name]) for t in tensors if t.verbatim], on_tensor)
        try:
            meanwhile()
            produced = [t for t in tensors if not t.verbatim]
            _write_produced([t for t in produced if not t.late] + [t for t in produced if t.late], places,
                            read_ahead_bytes, on_tensor, copies)
            copies.finish()
        finally:
            copies.stop()
    finally:
        for fd in fds:
            os.close(fd)
    weight_map = {t.name: file_name for file_name, shard in zip(names, shards) for t in shard}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _start_shard(fd: int, shard: Iterable[PlannedTensor]) -> dict[str, tuple[int, int]]:
    """Write the shard's header and give the file its full length; each tensor's (fd, offset)."""
    header, offset = {}, 0
    for t in shard:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    data_start = 8 + len(encoded)
    _write_at(fd, memoryview(struct.pack("<Q", len(encoded)) + encoded), 0)
    os.ftruncate(fd, data_start + offset)
    return {t.name: (fd, data_start + header[t.name]["data_offsets"][0]) for t in shard}


def _write_produced(tensors: list[PlannedTensor], places: dict[str, tuple[int, int]], read_ahead_bytes: int,
                    on_tensor, copies: VerbatimCopies) -> None:
    import torch

    reads = ReadAhead(tensors, read_ahead_bytes)
    try:
        for t in tensors:
            copies.check()  # a full disk stops the build at once, not after everything else is written
            data = t.produce(*[reads.take(read) for read in t.reads])
            if tuple(data.shape) != t.shape or SAFETENSORS_DTYPES[str(data.dtype).removeprefix("torch.")] != t.dtype:
                raise RuntimeError(f"{t.name}: produced {tuple(data.shape)} {data.dtype}, planned {t.shape} {t.dtype}")
            if data.numel():
                _write_at(places[t.name][0], memoryview(data.contiguous().view(-1).view(torch.uint8).numpy()),
                          places[t.name][1])
            on_tensor(t)
    finally:
        reads.close()


def _write_at(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):  # a single write stops short of about 2 GB
        done += os.pwrite(fd, view[done:], offset + done)


class VerbatimCopies:
    """Verbatim planned tensors copied from their source files to their places in the shards, in plan order, on a
    thread.

    os.copy_file_range moves the bytes inside the kernel: no buffer of ours, no memory growth, and the GIL is free
    for the calling thread. Where the kernel cannot (an older one across file systems, a system without the call),
    the bytes go through a buffer instead. A stop is noticed between chunks.
    """

    CHUNK_BYTES = 256 * 2**20

    def __init__(self, copies: list[tuple[PlannedTensor, int, int]], on_tensor):
        self._copies, self._on_tensor = copies, on_tensor
        self._in_kernel = hasattr(os, "copy_file_range")
        self._buffer: Optional[memoryview] = None  # for copies the kernel refused
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy_all, name="moelab-copies", daemon=True)
        self._thread.start()

    def _copy_all(self) -> None:
        try:
            for tensor, fd, offset in self._copies:
                path, source_offset, nbytes = tensor.reads[0].source.span(tensor.reads[0].name)
                with open(path, "rb") as source:
                    self._copy(source.fileno(), source_offset, fd, offset, nbytes, f"{path} ends inside tensor "
                               f"{tensor.reads[0].name}; the file is truncated, download it again")
                if self._stop.is_set():
                    return
                self._on_tensor(tensor)
        except BaseException as err:  # raised on the calling thread by finish()
            self._error = err

    def _copy(self, source: int, source_offset: int, fd: int, offset: int, nbytes: int, truncated: str) -> None:
        done = 0
        while done < nbytes and not self._stop.is_set():
            count = min(self.CHUNK_BYTES, nbytes - done)
            copied = self._copy_chunk(source, source_offset + done, fd, offset + done, count)
            if copied == 0:
                raise MoelabError(truncated)
            done += copied

    def _copy_chunk(self, source: int, source_offset: int, fd: int, offset: int, count: int) -> int:
        if self._in_kernel:
            try:
                return os.copy_file_range(source, fd, count, source_offset, offset)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._in_kernel = False
        if self._buffer is None:
            self._buffer = memoryview(bytearray(64 * 2**20))
        read = _read_into(source, self._buffer[:count], source_offset)
        _write_at(fd, self._buffer[:read], offset)
        return read

    def check(self) -> None:
        """Raise what stopped the copies, if anything did."""
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        """Wait for the copies; raise what stopped them."""
        self._thread.join()
        self.check()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
