"""Eval on several devices: one model replica per GPU when the model fits one (data-parallel), else one model
sharded across them; the choice, the split of scheduled batches between replicas, and gathering them in order."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from moelab.errors import MoelabError

STRATEGIES = ("auto", "single", "replicas", "shard")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# Of a GPU's memory, the share the weights may take: the rest holds activations, the 4D masks and CUDA's own use.
WEIGHTS_SHARE = 0.8


@dataclass(frozen=True)
class ParallelPlan:
    strategy: str  # single, replicas (one model per device) or shard (one model across the devices)
    devices: list[str]
    reason: str


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes the model's weights take in `dtype`: the safetensors sizes, scaled from the dtype they are stored in."""
    model_dir = Path(model_dir)
    stored = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    stored_dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return int(stored * DTYPE_BYTES[dtype] / DTYPE_BYTES.get(stored_dtype, 4))


def choose_plan(weights: int, gpu_bytes: list[int], strategy: str = "auto", gpus: int | None = None) -> ParallelPlan:
    """Replicas when the weights fit one GPU's share, shard when they fit only all GPUs together; `strategy` and
    `gpus` (how many of the visible GPUs to use) override. No GPU: one process on the CPU."""
    if strategy not in STRATEGIES:
        raise MoelabError(f"--parallel {strategy} is not one of {', '.join(STRATEGIES)}")
    if gpus is not None and not 1 <= gpus <= max(1, len(gpu_bytes)):
        raise MoelabError(f"--gpus {gpus}: this machine has {len(gpu_bytes)} visible GPUs")
    gpu_bytes = gpu_bytes[:gpus] if gpus else gpu_bytes
    if not gpu_bytes:
        return ParallelPlan("single", ["cpu"], "no GPU")
    devices = [f"cuda:{i}" for i in range(len(gpu_bytes))]
    fits_one = weights <= WEIGHTS_SHARE * min(gpu_bytes)
    fits_all = weights <= WEIGHTS_SHARE * sum(gpu_bytes)
    gib = f"{weights / 2**30:.1f} GiB of weights"
    if strategy == "auto":
        strategy = "single" if len(devices) == 1 else "replicas" if fits_one else "shard"
    if strategy == "single":
        if not fits_one:
            raise MoelabError(f"{gib} do not fit one GPU ({min(gpu_bytes) / 2**30:.0f} GiB); use --parallel shard "
                              "on several GPUs")
        return ParallelPlan("single", devices[:1], f"{gib} on one GPU")
    if strategy == "replicas":
        if not fits_one:
            raise MoelabError(f"{gib} do not fit one GPU ({min(gpu_bytes) / 2**30:.0f} GiB) for a replica each; "
                              "use --parallel shard")
        return ParallelPlan("replicas", devices, f"{gib} fit one GPU: one replica on each of {len(devices)}")
    if not fits_all:
        raise MoelabError(f"{gib} do not fit the {len(devices)} GPUs together "
                          f"({sum(gpu_bytes) / 2**30:.0f} GiB); use more GPUs or a smaller --dtype")
    return ParallelPlan("shard", devices, f"{gib} need {len(devices)} GPUs: one model sharded across them")


def split_batches(batches: list, workers: int) -> list[list[int]]:
    """Batch indices per worker, balanced by padded tokens (the largest batch to the least loaded worker first)."""
    loads, shares = [0] * workers, [[] for _ in range(workers)]
    cost = [len(batch) * len(batch[0].tokens) for batch in batches]
    for index in sorted(range(len(batches)), key=lambda i: (-cost[i], i)):
        worker = min(range(workers), key=lambda w: (loads[w], w))
        shares[worker].append(index)
        loads[worker] += cost[index]
    return [sorted(share) for share in shares]


def visible_gpu_bytes() -> list[int]:
    import torch

    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def plan_for(model: str, dtype: str, device: str, strategy: str, gpus: int | None) -> ParallelPlan:
    """The plan for MODEL on this machine: its weights (a Hub id counts as fitting one GPU) against visible GPUs."""
    if not device.startswith("cuda"):
        if strategy in ("replicas", "shard"):
            raise MoelabError(f"--parallel {strategy} needs CUDA GPUs; this run uses --device {device}")
        return ParallelPlan("single", [device], f"--device {device}")
    if device != "cuda":  # a GPU named by the user: that one only
        return ParallelPlan("single", [device], f"--device {device}")
    path = Path(model).expanduser()
    weights = weight_bytes(path, dtype) if path.is_dir() else 0
    return choose_plan(weights, visible_gpu_bytes(), strategy, gpus)


def score_on_device(model_dir: str, dtype: str, device: str, batches: list, prefetch: int):
    """In a worker process: load the model on `device` and score `batches`; (request indices, answers)."""
    import torch
    import transformers

    from moelab.eval.scheduler import ScheduleOptions, ScheduleStats, score_batches

    if device == "cpu":
        torch.set_num_threads(1)  # CPU workers share the cores
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype),
                                                              device_map=device).eval()
    requests, answers = [], []

    def record(batch_requests, batch_answers):
        requests.extend(batch_requests)
        answers.extend(batch_answers)

    score_batches(model, batches, ScheduleOptions(batch_tokens=0, prefetch_batches=prefetch), ScheduleStats(), record)
    return requests, answers


def score_replicated(model, replica: tuple[str, str], devices: list[str], batches: list, options, stats,
                     on_batch) -> None:
    """Score the batches on len(devices) replicas: `model` (already on devices[0]) in this process, one spawned
    worker process per other device loading replica = (model folder or Hub id, dtype). on_batch(requests, answers)
    as this process's batches finish, then once per worker with its whole share."""
    import multiprocessing

    from moelab.eval.scheduler import score_batches

    shares = split_batches(batches, len(devices))
    with ProcessPoolExecutor(len(devices) - 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(score_on_device, *replica, device, [batches[i] for i in share], options.prefetch_batches)
                for device, share in zip(devices[1:], shares[1:])]
        score_batches(model, [batches[i] for i in shares[0]], options, stats, on_batch)
        for job, share in zip(jobs, shares[1:]):
            on_batch(*job.result())
            stats.tokens += sum(len(row.tokens) for i in share for row in batches[i])
            stats.padded_tokens += sum(len(batches[i]) * len(batches[i][0].tokens) for i in share)
