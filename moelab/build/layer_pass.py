"""The base model's decoder run one layer at a time over every batch of prompts, each layer's weights loaded on demand.

Gate modes that read hidden states need, at layer l, only what layers 0..l do to the prompts. So the pass keeps the
prompts' hidden states (small) and never the model: layer l's weights arrive (from the build's single streaming
read of the sources), run over every batch, and are dropped before layer l + 1's arrive. Each layer computes
exactly what a whole-model forward of transformers computes for the same batch (the same decoder-layer code, or for
the Llama family moelab.build.decoder's, which computes the same operations; the same masks and position
embeddings), so the router rows do not depend on which way they were computed.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from moelab.build.decoder import decoder_model, decoder_spec

PROMPT_BATCH = 32
# Batches of this many rows (prompts x tokens) in all, at most GANG_BATCHES of them, multiply by each weight matrix
# together. A matmul of few rows costs about the read of the weights (1B MLP, one thread: 4 x 8 rows apart 70 ms,
# together 28 ms; 2 x 128 rows 137 against 96 ms); from about 256 rows it costs the multiplications, together or not.
GANG_ROWS = 256
GANG_BATCHES = 16
# Only layers whose float32 weights outgrow the CPU's caches: smaller ones stay cached from batch to batch, and gangs
# only add their threads' meetings (4x135M, 14 MB a layer: builds 1 s slower with gangs, 4 alternating runs each).
GANG_LAYER_BYTES = 64 * 2**20
EMBEDDING = "model.embed_tokens.weight"


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def layer_of(name: str) -> Optional[int]:
    """The decoder layer a tensor name is in (None outside the layers)."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None


@dataclass
class PromptBatch:
    ids: object   # (B, T) token ids, right-padded
    mask: object  # (B, T), 1 on real tokens
    group: int    # which list of prompts the batch came from


def prompt_batches(groups: Sequence[list[list[int]]]) -> list[PromptBatch]:
    """Each group's token lists in batches of PROMPT_BATCH, right-padded."""
    import torch

    batches = []
    for group, token_lists in enumerate(groups):
        for start in range(0, len(token_lists), PROMPT_BATCH):
            batch = token_lists[start:start + PROMPT_BATCH]
            width = max(len(seq) for seq in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            batches.append(PromptBatch(ids, mask, group))
    return batches


def gangs(batches: list[PromptBatch]) -> list[list[int]]:
    """Consecutive batches grouped into gangs of at most GANG_ROWS rows and GANG_BATCHES batches (a larger batch
    alone)."""
    result: list[list[int]] = []
    rows = 0
    for index, batch in enumerate(batches):
        size = batch.ids.numel()
        if not result or rows + size > GANG_ROWS or len(result[-1]) == GANG_BATCHES:
            result.append([])
            rows = 0
        result[-1].append(index)
        rows += size
    return result


class _GangBroken(Exception):
    """A batch of the gang failed; the others stop at their next linear layer (the failure itself is raised)."""


class _Gang:
    """The batches of one gang running one layer side by side, a thread each, whose linear layers meet: once every
    batch still running waits at a linear layer, each meeting with batches at it multiplies all their rows in one
    matmul, and each batch takes its own rows. A batch that takes another path through the layer (calls a linear
    layer the others do not, or finishes first) only makes a meeting smaller: it never waits for one that cannot come.

    MKL computes each row of a matmul of 5 rows or more alike whatever the other rows (measured at every shape of
    the 1B benchmark and of SmolLM2), so a batch's states are those of a forward of that batch alone; a batch of
    fewer rows (a prompt of 1-3 tokens alone) may differ from that in the last bits, the same on every run.
    """

    def __init__(self, size: int):
        self.size = size
        self._cond = threading.Condition()
        # The meetings not yet held, by (module, its call count): inputs by slot, then the outputs. A batch that comes
        # to a meeting already held (the others went on without it) opens a new one.
        self._open: dict[tuple, dict] = {}
        self._waiting = 0   # batches waiting at a meeting not yet held
        self._finished = 0  # batches done with the layer
        self._broken = False

    def linear(self, module, x, slot: int, call: int):
        with self._cond:
            meeting = self._open.setdefault((module, call), {"inputs": {}, "outputs": None})
            meeting["inputs"][slot] = x
            self._waiting += 1
            self._meet_if_all_wait()
            self._cond.wait_for(lambda: meeting["outputs"] is not None or self._broken)
            if meeting["outputs"] is None:
                raise _GangBroken
            return meeting["outputs"][slot]

    def finish(self) -> None:
        """The calling batch is done with the layer; meetings no longer wait for it."""
        with self._cond:
            self._finished += 1
            self._meet_if_all_wait()

    def _meet_if_all_wait(self) -> None:
        """With the lock held: once every running batch waits, every meeting that has batches multiplies."""
        if self._broken or not self._waiting or self._waiting + self._finished < self.size:
            return
        import torch

        for (module, _call), meeting in self._open.items():
            slots, inputs = zip(*sorted(meeting["inputs"].items()))
            rows = torch.nn.functional.linear(torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs]), module.weight,
                                              module.bias)
            parts = rows.split([i.numel() // i.shape[-1] for i in inputs])
            meeting["outputs"] = {slot: part.reshape(*i.shape[:-1], part.shape[-1])
                                  for slot, part, i in zip(slots, parts, inputs)}
        self._open.clear()
        self._waiting = 0
        self._cond.notify_all()

    def break_up(self) -> None:
        with self._cond:
            self._broken = True
            self._cond.notify_all()


_running = threading.local()  # on a thread that runs a batch of a gang: .gang, .slot and .calls


def _gang_linear_forward(module):
    """The forward of `module` (an nn.Linear of the pass's model): F.linear, or on a gang's thread the gang's."""
    import torch

    def forward(x):
        gang = getattr(_running, "gang", None)
        if gang is None:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        call = _running.calls[module] = _running.calls.get(module, -1) + 1
        return gang.linear(module, x, _running.slot, call)
    return forward


class _Captured(Exception):
    pass


def _capture_layers(num_layers: int, calls: dict):
    """Stand-ins for the decoder layers that record the arguments the model's forward passes to each."""
    import torch

    class Capture(torch.nn.Module):
        def __init__(self, index: int):
            super().__init__()
            self.index = index

        def forward(self, hidden_states, **kwargs):
            calls[self.index] = kwargs
            if self.index == 0:
                calls["embedded"] = hidden_states
            if self.index == num_layers - 1:
                raise _Captured
            return hidden_states

    return torch.nn.ModuleList(Capture(i) for i in range(num_layers))


class LayerPass:
    """Hidden states of prompt batches, advanced one decoder layer at a time (see the module docstring).

    `model` is either a skeleton on the meta device whose layers get their weights from run_layer, or (4/8-bit
    loading) a whole loaded model, whose layers are used as they are.

    Weights are bf16, as in a bf16 model. On the CPU each layer computes in float32 (its bf16 weights cast up
    once, the residual stream cast back to bf16 between layers): CPUs without bf16 matrix units run bf16 matmuls
    several times slower, and only the running layer is ever in float32.

    On the CPU every batch computes with one torch thread: MKL sums a matmul of 5 to 11 rows in another order on
    2 threads than on 1, so states computed with a thread count that varies (with the cores free, with the
    machine) would vary too. Batches of few rows run in gangs whose linear layers multiply all their rows at once
    (_Gang), and `workers` threads run gangs side by side.
    """

    def __init__(self, model, batches: list[PromptBatch], device: str, streamed: bool):
        import torch

        self.model, self.batches, self.device, self.streamed = model, batches, device, streamed
        self.compute_dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.num_layers = len(model.model.layers)
        self.layer_args: list[dict] = []   # per batch: layer index -> keyword arguments of that layer
        self.hidden: list = []             # per batch: the residual stream entering the next layer to run
        self.next_layer = 0
        self.workers = 1  # gangs of batches run side by side (CPU); the caller raises it as cores free up
        self._router_input = threading.local()  # each thread's batch's router input, kept by the hook below
        self._staged: dict[str, object] = {}  # the running layer's weights in compute_dtype, by name in the layer
        layer_bytes = 4 * sum(p.numel() for p in model.model.layers[0].parameters()) if self.num_layers else 0
        self.gangs = gangs(batches) if layer_bytes > GANG_LAYER_BYTES else [[b] for b in range(len(batches))]
        ganged = device == "cpu" and any(len(members) > 1 for members in self.gangs)
        for layer in model.model.layers:
            layer.post_attention_layernorm.register_forward_hook(self._keep_router_input)
            if ganged:
                for module in layer.modules():
                    if type(module) is torch.nn.Linear:
                        module.forward = _gang_linear_forward(module)
        self._torch = torch

    def _keep_router_input(self, _module, _inputs, output):
        self._router_input.value = output

    def embed(self, embedding=None) -> None:
        """Embed every batch (with `embedding` as the input embedding when streamed)."""
        torch = self._torch
        inner = self.model.model
        if self.streamed:
            inner.embed_tokens.load_state_dict({"weight": embedding.to(torch.bfloat16).to(self.device)}, assign=True)
        layers = inner.layers
        for batch in self.batches:
            calls: dict = {}
            inner.layers = _capture_layers(self.num_layers, calls)
            try:
                with torch.no_grad():
                    inner(input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device),
                          use_cache=False)
            except _Captured:
                pass
            finally:
                inner.layers = layers
            self.hidden.append(calls.pop("embedded"))
            self.layer_args.append({index: {k: _cast(v, self.compute_dtype) for k, v in kwargs.items()}
                                    for index, kwargs in calls.items()})
        if self.streamed:
            inner.embed_tokens.to("meta")

    def run_layer(self, weights: Optional[Iterable[tuple[str, object]]] = None, router_input: bool = True) -> list:
        """Run the next layer over every batch; returns per batch the float32 CPU states at that layer:
        the router's input (post-attention norm output) if `router_input`, else the residual stream entering it.

        `weights` (streamed): the layer's tensors, (full name in the dense checkpoint, tensor) pairs, each staged
        before the next is taken, so that the layer's bf16 tensors are not all held beside its staged float32 copy
        (7B: 405 MB less at the peak).
        """
        torch = self._torch
        index = self.next_layer
        layer = self.model.model.layers[index]
        if self.streamed:
            prefix = layer_prefix(index)
            staged = {}
            for name, tensor in weights:
                staged[name[len(prefix):]] = self._stage(name[len(prefix):], tensor)
                del tensor  # before the next pair is read
            layer.load_state_dict(staged, assign=True)

        def run(b: int):
            with torch.no_grad():  # grad mode is per thread
                entering = self.hidden[b]
                self.hidden[b] = layer(entering.to(self.compute_dtype), **self.layer_args[b][index]).to(torch.bfloat16)
                return (self._router_input.value if router_input else entering).float().cpu()

        states = self._run_batches(run)
        if self.streamed:
            layer.to("meta")
        self.next_layer += 1
        return states

    def _run_batches(self, run) -> list:
        """[run(b) for every batch b]: on the CPU each batch on a thread of its own with one torch thread, a gang's
        batches side by side, up to `workers` gangs at a time."""
        torch = self._torch
        count = len(self.batches)
        if self.device != "cpu":
            return [run(b) for b in range(count)]
        workers = max(1, min(self.workers, len(self.gangs)))
        results: list = [None] * count
        errors: list[BaseException] = []

        def run_one(gang: _Gang, slot: int, batch: int) -> None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # this thread's own setting
            # A batch alone multiplies by itself (no meeting, no copy of its rows).
            _running.gang, _running.slot, _running.calls = (gang if gang.size > 1 else None), slot, {}
            try:
                results[batch] = run(batch)
                gang.finish()  # a failed batch breaks the gang up instead
            except BaseException as err:  # raised below, on the calling thread
                errors.append(err)
                gang.break_up()
            finally:
                _running.gang = None
                torch.set_num_threads(threads)

        def run_gangs(first: int) -> None:
            for members in self.gangs[first::workers]:
                gang = _Gang(len(members))
                helpers = [threading.Thread(target=run_one, args=(gang, slot, batch), name="moelab-pass", daemon=True)
                           for slot, batch in enumerate(members) if slot]
                for helper in helpers:
                    helper.start()
                run_one(gang, 0, members[0])
                for helper in helpers:
                    helper.join()
                if errors:
                    return

        runners = [threading.Thread(target=run_gangs, args=(first,), name="moelab-pass", daemon=True)
                   for first in range(1, workers)]
        for runner in runners:
            runner.start()
        run_gangs(0)
        for runner in runners:
            runner.join()
        if errors:
            raise next((e for e in errors if not isinstance(e, _GangBroken)), errors[0])
        return results

    def _stage(self, name: str, tensor):
        """`tensor` as bf16, in compute_dtype on the device, in the buffer that holds `name` for every layer: fresh
        memory for each layer's float32 weights costs more in page faults than the cast itself (1B: 3 GB)."""
        torch = self._torch
        tensor = tensor.to(torch.bfloat16)
        buffer = self._staged.get(name)
        if buffer is None or buffer.shape != tensor.shape:
            buffer = self._staged[name] = torch.empty(tensor.shape, dtype=self.compute_dtype, device=self.device)
        return buffer.copy_(tensor)


def _cast(value, dtype):
    import torch

    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def skeleton_model(base_dir: Path, base_config: dict, device: str):
    """The base model's modules on the meta device (no weights), with real rotary position embeddings: moelab's
    own for the Llama family (moelab.build.decoder, which imports no transformers code), else transformers'."""
    spec = decoder_spec(base_config)
    return decoder_model(spec, device) if spec is not None else transformers_skeleton(base_dir, device)


def transformers_skeleton(base_dir: Path, device: str):
    """transformers' model of the base on the meta device, with real rotary position embeddings."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    inner = model.model
    inner.rotary_emb = type(inner.rotary_emb)(inner.config).to(device)
    model.eval()
    return model
