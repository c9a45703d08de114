"""The heal step after the merge: a few parameters of the MoE trained so that, on each expert's data, it reproduces that expert.

Domains. Every routed expert whose model differs from the base is a domain, distilled on its `heal_data` (else its
`router_data`) with that expert as teacher. The general term is distilled on `heal.general_data` (default: the data of
the experts whose model is the base, else moelab/data/router/chat.jsonl) with the base as teacher, so that general
skill does not drop. A JSONL row with `question` and `solution` is rendered with the base's chat template (user:
question, assistant: solution) and only the solution's tokens are distilled: they are what the domain eval scores.
A row with `text` (or a line of a text file) is distilled on all its tokens after the first. Each domain's first
`examples` rows are cut to `tokens` tokens, shuffled by the seed and split into training and held-out examples.

Teachers. One model at a time: each distinct teacher is loaded, run over its examples and freed, keeping per distilled
token the top_k log-probabilities of its full softmax and their token ids. The MoE is loaded after the last teacher.

Loss. At a token, with T the teacher's top-k tokens, p their teacher probabilities and r = 1 - sum_T p the teacher's
mass outside T, the student's distribution q is collapsed onto the same k + 1 buckets (each token of T, and the rest):

    KL = sum_{t in T} p_t log(p_t / q_t) + r log(r / (1 - sum_{t in T} q_t))

the exact KL divergence of the two distributions seen through those buckets: a lower bound of the full KL, equal to
it when the teacher's tail is empty. Unlike renormalizing q over T, it penalizes mass the student puts outside T.
loss = mean over domains of the token-mean KL  +  general_weight x the token-mean KL on general data.

Trained (heal.parts):
- shared: LoRA on q/k/v/o of every attention layer, a low-rank branch added to the projection's output
  (scale 2, i.e. alpha = 2 x rank; A uniform, B zero), so it also runs over bitsandbytes 4-bit layers;
- router: the router rows themselves. With one expert per token the renormalized top-1 weight is always 1 and has
  no gradient, so during heal the chosen expert's softmax probability p enters as 1 + p - stop_gradient(p):
  the forward value is unchanged and the router learns which choices help (Switch Transformer's gradient);
- experts: LoRA on every expert's MLP (on transformers' fused gate_up and down expert tensors).
Adam, linear warm-up over the first 10% of steps, then cosine decay to zero.

Merge. Each trained tensor is read from the checkpoint, the update added in float32 (W + 2 B A; router rows as
trained) and cast to the checkpoint's dtype, and written over the old data in its shard: same shape and dtype, so the
shards, index and tied embeddings stay as they were.

When the merged MoE already matches every teacher (held-out KL under NOTHING_TO_HEAL_KL), nothing is trained.

Report. For each domain and the general term, on held-out tokens: the KL to its teacher and the NLL of the data's
tokens, before (the merged MoE) and after (the written checkpoint, reloaded), and the teacher's own NLL.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from moelab.build.layouts import MoeLayout
from moelab.errors import MoelabError
from moelab.recipe import Heal, Recipe

HEALED_LAYOUTS = ("mixtral", "qwen2_moe", "qwen3_moe")  # transformers' own classes, whose module names heal reads
GENERAL = "general"
DEFAULT_GENERAL_DATA = "pkg:moelab/data/router/chat.jsonl"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_SCALE = 2.0
WARMUP_SHARE = 0.1
TIMED_STEPS = 3  # steps measured before the time estimate is printed
EVAL_BATCH = 8
# Below this held-out KL (nats per token) on every domain there is nothing to heal, and Adam, which scales every
# gradient to a step of about lr, would only follow rounding noise away from the teachers.
NOTHING_TO_HEAL_KL = 1e-3


@dataclass
class HealSettings:
    """How heal runs; what it trains is the recipe's `heal:` block."""
    device: str = "auto"
    seed: int = 0
    show_progress: bool = True


@dataclass
class DomainHeal:
    """Held-out figures of one domain (or the general term), per distilled token."""
    teacher: str
    heldout_tokens: int
    kl_before: float
    kl_after: float
    nll_before: float
    nll_after: float
    nll_teacher: float


@dataclass
class HealReport:
    domains: dict[str, DomainHeal]  # domain (expert name, or "general") -> its held-out figures
    steps: int
    parts: list[str]
    trainable_params: int
    train_tokens: int
    seconds: float
    rewritten_tensors: int
    first_loss: float
    last_loss: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Example:
    """Token ids; the tokens from `start` on are distilled, each predicted from the ones before it."""
    ids: list[int]
    start: int

    @property
    def targets(self) -> int:
        return len(self.ids) - self.start


@dataclass
class Domain:
    name: str
    teacher_ref: str
    teacher_dir: Path
    train: list[Example]
    heldout: list[Example]
    weight: float
    # Filled by the teacher pass, one entry per example: top-k log-probs (n, k), their ids (n, k); the NLL sum.
    train_topk: list = field(default_factory=list)
    heldout_topk: list = field(default_factory=list)
    heldout_teacher_nll: float = 0.0

    @property
    def heldout_tokens(self) -> int:
        return sum(e.targets for e in self.heldout)


# ---------------------------------------------------------------- the stage


def heal_checkpoint(folder: Path, layout: MoeLayout, recipe: Recipe, base_dir: Path, expert_dirs: Sequence[Path],
                    settings: HealSettings = HealSettings(), recipe_dir: Optional[Path] = None) -> HealReport:
    """Heal the MoE checkpoint in `folder` in place (see the module docstring) and return what it did."""
    import torch
    from transformers import AutoTokenizer

    from moelab.build.gates import resolve_device
    from moelab.eval.remote import exit_on_sigterm

    heal = recipe.heal
    if layout.arch_id not in HEALED_LAYOUTS:
        raise MoelabError(f"heal does not support the {layout.arch_id} output yet; use architecture "
                          f"{' or '.join(HEALED_LAYOUTS)}, or remove heal")
    device = resolve_device(settings.device)
    if heal.load_in_4bit and not device.startswith("cuda"):
        raise MoelabError("heal.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on CPU")
    started = time.perf_counter()
    with exit_on_sigterm():
        torch.manual_seed(settings.seed)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        domains = heal_domains(recipe, tokenizer, base_dir, expert_dirs, settings.seed, recipe_dir)
        _cache_teachers(domains, heal, device, settings.show_progress)
        moe = _load_model(folder, heal, device)
        before = {d.name: _heldout_loss(moe, d, device) for d in domains}
        training, after = None, before
        if max(kl for kl, _ in before.values()) >= NOTHING_TO_HEAL_KL:
            trainable = _attach_trainables(moe, heal, settings.seed)
            training = _train(moe, trainable, domains, heal, device, settings.show_progress)
            training["rewritten"] = _merge_into_checkpoint(folder, layout, trainable)
            del moe, trainable
            gc.collect()
            moe = _load_model(folder, heal, device)  # the written checkpoint is what gets measured
            after = {d.name: _heldout_loss(moe, d, device) for d in domains}
        del moe
        gc.collect()
    notes = []
    if training is None:
        notes.append(f"nothing trained: the MoE already matches every teacher (held-out KL under "
                     f"{NOTHING_TO_HEAL_KL} per token)")
        training = {"steps": 0, "params": 0, "tokens": 0, "first": 0.0, "last": 0.0, "rewritten": 0}
    elif "router" in heal.parts and recipe.experts_per_token == 1:
        notes.append("router trained through the straight-through top-1 gradient (one expert per token)")
    return HealReport(
        domains={d.name: DomainHeal(d.teacher_ref, d.heldout_tokens, before[d.name][0], after[d.name][0],
                                    before[d.name][1], after[d.name][1], d.heldout_teacher_nll / d.heldout_tokens)
                 for d in domains},
        steps=training["steps"], parts=list(heal.parts), trainable_params=training["params"],
        train_tokens=training["tokens"], seconds=time.perf_counter() - started,
        rewritten_tensors=training["rewritten"], first_loss=training["first"], last_loss=training["last"],
        notes=notes)


# ---------------------------------------------------------------- data


def read_heal_rows(path: Path) -> list[tuple[Optional[str], str]]:
    """(question or None, text) per row: JSONL rows with question+solution, or text; other files one per line."""
    import json

    from moelab.build.router_training import read_router_data

    if path.suffix != ".jsonl":
        return [(None, line) for line in read_router_data(path)]
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise MoelabError(f"{path} line {number} is not JSON; heal data .jsonl needs one object per line") from None
        if isinstance(row, dict) and "question" in row and "solution" in row:
            rows.append((str(row["question"]), str(row["solution"])))
        elif isinstance(row, dict) and "text" in row:
            rows.append((None, str(row["text"])))
        else:
            raise MoelabError(f"{path} line {number} has neither question+solution nor text, which heal reads; "
                              "add the fields or point heal_data at another file")
    if not rows:
        raise MoelabError(f"{path} has no examples; heal data needs at least two")
    return rows


def encode_example(tokenizer, question: Optional[str], text: str, tokens: int) -> Example:
    """A chat turn (question -> text, only the answer distilled) or plain text (BOS, then every token distilled)."""
    from moelab.eval.domain import chat_prompt

    encode = lambda piece: tokenizer(piece, add_special_tokens=False)["input_ids"]  # noqa: E731
    if question is not None:
        prompt = chat_prompt(question, tokenizer)
        full = (tokenizer.apply_chat_template([{"role": "user", "content": question},
                                               {"role": "assistant", "content": text}], tokenize=False)
                if getattr(tokenizer, "chat_template", None) else prompt + text)
        answer = full[len(prompt):] if full.startswith(prompt) else text
        prompt_ids = encode(prompt)
        return Example(prompt_ids + encode(answer)[:tokens], len(prompt_ids))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + encode(text)[:tokens]
    return Example(ids, 1)


def heal_domains(recipe: Recipe, tokenizer, base_dir: Path, expert_dirs: Sequence[Path], seed: int,
                 recipe_dir: Optional[Path]) -> list[Domain]:
    """The distilled domains: one per expert whose model is not the base, then the general term."""
    import torch

    from moelab.build.sources import resolve_data_path

    heal = recipe.heal
    generator = torch.Generator().manual_seed(seed)
    base_dir = Path(base_dir).resolve()

    def make(name: str, teacher_ref: str, teacher_dir: Path, data_refs: list[str], weight: float) -> Domain:
        rows = [row for ref in data_refs for row in read_heal_rows(resolve_data_path(ref, recipe_dir))]
        examples = [encode_example(tokenizer, q, t, heal.tokens) for q, t in rows[:heal.examples]]
        examples = [e for e in examples if e.targets >= 1]
        if len(examples) < 2:
            raise MoelabError(f"heal: the data of {name} ({', '.join(data_refs)}) has {len(examples)} usable "
                              "example(s); it needs at least 2")
        order = torch.randperm(len(examples), generator=generator).tolist()
        held = min(len(examples) - 1, max(1, round(heal.holdout * len(examples))))
        return Domain(name, teacher_ref, teacher_dir, [examples[i] for i in order[held:]],
                      [examples[i] for i in order[:held]], weight)

    specs, base_data = [], []
    for name, expert, folder in zip(recipe.expert_names(), recipe.experts, expert_dirs):
        data_ref = expert.heal_data or expert.router_data
        if Path(folder).resolve() == base_dir:
            base_data += [data_ref] if data_ref else []
        elif data_ref is None:
            raise MoelabError(f"heal: expert {name} has no heal_data or router_data; heal needs examples of its "
                              "domain (JSONL with question+solution, or text): add heal_data to the expert")
        else:
            specs.append((name, expert.source_model, Path(folder), data_ref))
    domains = [make(name, ref, folder, [data], 1.0 / len(specs)) for name, ref, folder, data in specs]
    if heal.general_weight > 0:
        general_data = [heal.general_data] if heal.general_data else base_data or [DEFAULT_GENERAL_DATA]
        domains.append(make(GENERAL, recipe.base_model, base_dir, general_data, heal.general_weight))
    if not domains:
        raise MoelabError("heal: no expert differs from the base and heal.general_weight is 0, so there is nothing "
                          "to distill; raise heal.general_weight or remove heal")
    return domains


# ---------------------------------------------------------------- models and forward passes


def _load_model(folder: Path, heal: Heal, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if heal.load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise MoelabError("heal.load_in_4bit needs bitsandbytes: pip install 'moelab[quant]'") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    # CPUs run float32 matmuls faster than bf16 ones; on a GPU bf16 halves the memory.
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model


def _padded(examples: Sequence[Example], device):
    """(ids, mask, rows, positions, targets): the positions whose logits predict the distilled tokens."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    rows, positions, targets = [], [], []
    for row, example in enumerate(examples):
        ids[row, :len(example.ids)] = torch.tensor(example.ids)
        mask[row, :len(example.ids)] = 1
        span = range(example.start - 1, len(example.ids) - 1)
        rows += [row] * len(span)
        positions += list(span)
        targets += example.ids[example.start:]
    return (ids.to(device), mask.to(device), torch.tensor(rows), torch.tensor(positions), torch.tensor(targets))


def _target_log_probs(model, examples: Sequence[Example], device):
    """(log-softmax at the distilled positions (N, V) float32, their target ids (N,)); the LM head runs there only."""
    import torch

    ids, mask, rows, positions, targets = _padded(examples, device)
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    logits = model.lm_head(hidden[rows.to(device), positions.to(device)])
    return torch.log_softmax(logits.float(), dim=-1), targets.to(device)


def _cache_teachers(domains: list[Domain], heal: Heal, device: str, show_progress: bool) -> None:
    """Top-k log-probs of each domain's teacher on its examples; one teacher model in memory at a time."""
    import torch
    from rich.progress import Progress

    by_teacher: dict[Path, list[Domain]] = {}
    for domain in domains:
        by_teacher.setdefault(domain.teacher_dir.resolve(), []).append(domain)
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("heal: teacher outputs", total=sum(len(d.train) + len(d.heldout) for d in domains))
        for teacher_dir, group in by_teacher.items():
            model = _load_model(teacher_dir, heal, device)
            try:
                for domain in group:
                    for split, store in ((domain.train, domain.train_topk), (domain.heldout, domain.heldout_topk)):
                        for start in range(0, len(split), EVAL_BATCH):
                            batch = split[start:start + EVAL_BATCH]
                            with torch.no_grad():
                                log_probs, targets = _target_log_probs(model, batch, device)
                            values, indices = log_probs.topk(min(heal.top_k, log_probs.shape[-1]), dim=-1)
                            if split is domain.heldout:
                                domain.heldout_teacher_nll += float(-log_probs.gather(1, targets[:, None]).sum())
                            offset = 0
                            for example in batch:
                                n = example.targets
                                store.append((values[offset:offset + n].cpu(), indices[offset:offset + n].cpu()))
                                offset += n
                            progress.advance(task, len(batch))
            finally:
                del model
                gc.collect()


def bucket_kl(student_log_probs, teacher_values, teacher_indices):
    """Per-token KL(teacher || student) over the teacher's top-k tokens plus one bucket for the rest (see above)."""
    import torch

    teacher_p = teacher_values.exp()
    student_log_q = student_log_probs.gather(1, teacher_indices)
    rest_p = (1 - teacher_p.sum(dim=-1)).clamp(min=0)
    rest_log_q = torch.log1p(-student_log_q.exp().sum(dim=-1).clamp(max=1 - 1e-6))
    top = (teacher_p * (teacher_values - student_log_q)).sum(dim=-1)
    rest = rest_p * (torch.log(rest_p.clamp(min=1e-12)) - rest_log_q)
    return top + rest


def _batch_loss(model, domain: Domain, picks: Sequence[int], split: str, device):
    """(summed KL, summed NLL, tokens) of the student on some examples of a domain."""
    import torch

    examples = [getattr(domain, split)[i] for i in picks]
    topk = [getattr(domain, f"{split}_topk")[i] for i in picks]
    log_probs, targets = _target_log_probs(model, examples, device)
    values = torch.cat([v for v, _ in topk]).to(device)
    indices = torch.cat([i for _, i in topk]).to(device)
    kl = bucket_kl(log_probs, values, indices).sum()
    nll = -log_probs.gather(1, targets[:, None]).sum()
    return kl, nll, len(targets)


def _heldout_loss(model, domain: Domain, device) -> tuple[float, float]:
    """(mean KL to the teacher, mean NLL) per held-out distilled token."""
    import torch

    kl_sum, nll_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for start in range(0, len(domain.heldout), EVAL_BATCH):
            kl, nll, n = _batch_loss(model, domain, range(start, min(start + EVAL_BATCH, len(domain.heldout))),
                                     "heldout", device)
            kl_sum, nll_sum, count = kl_sum + float(kl), nll_sum + float(nll), count + n
    return kl_sum / count, nll_sum / count


# ---------------------------------------------------------------- trainable parts


@dataclass
class Trainable:
    """The heal's updates, by the in-memory name of the tensor each one changes, and the hooks that apply them."""
    deltas: dict
    hooks: list

    def parameters(self):
        for delta in self.deltas.values():
            yield from delta.parameters()


def _delta_module(shape: tuple[int, ...], rank: Optional[int], generator, device):
    """An update of a matrix (out, in) or a stack of them (E, out, in): LORA_SCALE * B @ A (B zero) with a rank,
    else the full update (zero). As a parametrization it adds itself to the frozen weight."""
    import torch

    class Delta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            *lead, out_features, in_features = shape
            if rank is None:
                self.full = torch.nn.Parameter(torch.zeros(shape, device=device))
                return
            bound = in_features ** -0.5
            a = (torch.rand(*lead, rank, in_features, generator=generator) * 2 - 1) * bound
            self.a = torch.nn.Parameter(a.to(device))
            self.b = torch.nn.Parameter(torch.zeros(*lead, out_features, rank, device=device))

        def delta(self):
            return self.full if rank is None else LORA_SCALE * (self.b @ self.a)

        def forward(self, weight):
            return weight + self.delta().to(weight.dtype)

    return Delta()


def _attach_trainables(model, heal: Heal, seed: int) -> Trainable:
    import torch
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(seed + 1)
    device = next(model.parameters()).device
    deltas, hooks = {}, []

    def parametrized(module, name: str, path: str, rank: Optional[int]):
        weight = getattr(module, name)
        if not weight.is_floating_point():
            raise MoelabError(f"heal cannot train the quantized tensor {path}; drop its part from heal.parts or set "
                              "heal.load_in_4bit: false")
        delta = _delta_module(tuple(weight.shape), rank, generator, device)
        parametrize.register_parametrization(module, name, delta, unsafe=True)
        deltas[path] = delta

    for index, layer in enumerate(model.model.layers):
        if "shared" in heal.parts:
            for name in ATTENTION_PROJECTIONS:
                projection = getattr(layer.self_attn, name)
                delta = _delta_module((projection.out_features, projection.in_features), heal.rank, generator,
                                      device)
                deltas[f"model.layers.{index}.self_attn.{name}.weight"] = delta

                def add_branch(_module, inputs, output, delta=delta):
                    x = inputs[0].to(delta.a.dtype)
                    return output + (LORA_SCALE * (x @ delta.a.T) @ delta.b.T).to(output.dtype)
                hooks.append(projection.register_forward_hook(add_branch))
        if "router" in heal.parts:
            parametrized(layer.mlp.gate, "weight", f"model.layers.{index}.mlp.gate.weight", None)
            hooks.append(layer.mlp.gate.register_forward_hook(_straight_through_top1))
        if "experts" in heal.parts:
            for name in ("gate_up_proj", "down_proj"):
                parametrized(layer.mlp.experts, name, f"model.layers.{index}.mlp.experts.{name}", heal.rank)
    return Trainable(deltas, hooks)


def _straight_through_top1(_module, _inputs, output):
    """With one expert per token, add p - stop_gradient(p) of the chosen expert to its weight (see the docstring)."""
    import torch

    logits, scores, indices = output
    if indices.shape[-1] != 1:
        return output
    chosen = torch.softmax(logits.float(), dim=-1).gather(-1, indices)
    return logits, scores + (chosen - chosen.detach()).to(scores.dtype), indices


def _train(model, trainable: Trainable, domains: list[Domain], heal: Heal, device: str, show_progress: bool) -> dict:
    """Adam on the summed domain losses; prints an estimate after the first steps. Returns loss and size figures."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    params = list(trainable.parameters())
    optimizer = torch.optim.Adam(params, lr=heal.lr, eps=1e-6)
    warmup = max(1, round(WARMUP_SHARE * heal.steps))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, heal.steps - warmup)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(heal.steps)
    orders = {d.name: [] for d in domains}

    def next_picks(domain):
        order = orders[domain.name]
        while len(order) < heal.batch:
            order += torch.randperm(len(domain.train), generator=generator).tolist()
        picks, orders[domain.name] = order[:heal.batch], order[heal.batch:]
        return picks

    losses, tokens = [], 0
    with Progress(TextColumn("heal: training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeRemainingColumn(), transient=True, disable=not show_progress) as progress:
        task = progress.add_task("heal", total=heal.steps, loss="?")
        timer = time.perf_counter()
        for step in range(heal.steps):
            optimizer.zero_grad()
            step_loss = 0.0
            for domain in domains:
                kl, _, n = _batch_loss(model, domain, next_picks(domain), "train", device)
                loss = domain.weight * kl / n
                loss.backward()
                step_loss += float(loss.detach())
                tokens += n
            optimizer.step()
            scheduler.step()
            losses.append(step_loss)
            progress.update(task, advance=1, loss=f"{step_loss:.4f}")
            if step + 1 == TIMED_STEPS and heal.steps > TIMED_STEPS and show_progress:
                per_step = (time.perf_counter() - timer) / TIMED_STEPS
                progress.console.print(f"heal: {heal.steps} steps, about {per_step * heal.steps:.0f} s "
                                       f"({per_step:.2f} s a step over the first {TIMED_STEPS})")
    for hook in trainable.hooks:
        hook.remove()
    return {"steps": heal.steps, "first": losses[0], "last": losses[-1], "tokens": tokens, "params": sum(p.numel() for p in params)}


# ---------------------------------------------------------------- merge back


def _merge_into_checkpoint(folder: Path, layout: MoeLayout, trainable: Trainable) -> int:
    """Add the trained updates to their tensors in the checkpoint's shards, in place; returns how many changed."""
    import torch

    from moelab.build.layouts import expert_tensor_names
    from moelab.build.tensors import SafetensorsFolder

    updates: dict[str, object] = {}  # checkpoint tensor name -> float32 update
    with torch.no_grad():
        for path, module in trainable.deltas.items():
            delta = module.delta().float().cpu()
            layer = int(path.split(".")[2])
            if ".self_attn." in path:
                updates[path] = delta
            elif path.endswith(".mlp.gate.weight"):
                updates[layout.router.format(layer=layer)] = delta
            else:
                for expert in range(delta.shape[0]):
                    names = expert_tensor_names(layout, layer, expert)
                    if path.endswith("gate_up_proj"):
                        # transformers fuses each expert's [gate; up] along the rows
                        updates[names["gate"]], updates[names["up"]] = delta[expert].chunk(2, dim=0)
                    else:
                        updates[names["down"]] = delta[expert]
    checkpoint = SafetensorsFolder(folder)
    for name, delta in updates.items():
        old = checkpoint.get(name)
        checkpoint.overwrite(name, (old.float() + delta).to(old.dtype))
    return len(updates)
