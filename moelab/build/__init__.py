"""The build stage: recipe -> plan of output tensors -> streamed, sharded MoE checkpoint folder."""

from __future__ import annotations

import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from moelab.build.merge import DROPPED_DELTA_WARNING, SharedWeights
from moelab.build.layouts import (DENSE_FAMILIES, MATCHING_KEYS, DenseFamily, MoeLayout, choose_layout,
                                  dense_mlp_sources, expert_tensor_names, input_family, is_dense_mlp,
                                  llama_cpp_warnings, moe_config_dict, split_tensor)
from moelab.build.checks import check_build_numbers, check_model_config, check_source_tensors
from moelab.build.layer_pass import layer_of
from moelab.build.output import (check_apart_from_sources, check_replaceable, finish_build_folder, new_build_folder,
                                 output_lock, remove_stale_folders)
from moelab.build.router_training import read_router_data
from moelab.build.sources import local_inputs, resolve_data_path, resolve_model
from moelab.build.tensors import (SAFETENSORS_DTYPES, PlannedTensor, SafetensorsFolder, SourceTensor, bound_malloc,
                                  write_sharded)
from moelab.errors import MoelabError
from moelab.recipe import PROMPTED_GATE_MODES, Expert, Recipe, recipe_hash
from moelab.signals import stop_signals_deferred, stop_signals_unwind

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class BuildOptions:
    device: str = "auto"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    shard_bytes: int = DEFAULT_SHARD_BYTES
    seed: Optional[int] = None
    force: bool = False
    show_progress: bool = True
    # A marker file the build writes into OUT; with force, an existing OUT is replaced only when it holds one
    # (moelab run: it replaces only the model folders it made).
    owner: Optional[str] = None


@dataclass
class BuildResult:
    out: Path
    architecture: str
    num_experts: int
    num_shards: int
    total_bytes: int
    warnings: list[str] = field(default_factory=list)
    shared_deltas: dict[str, float] = field(default_factory=dict)  # expert -> relative change of shared weights
    routing: Optional[object] = None  # RouterReport of gate_mode trained/ridge: held-out routing, hidden vs fitted
    heal: Optional[object] = None  # HealReport of the recipe's heal step: held-out KL and NLL before/after


@dataclass
class ResolvedModel:
    ref: str
    folder: Path
    config: dict
    tensors: SafetensorsFolder


def build_moe(recipe: Recipe, recipe_text: str, out: Path, options: BuildOptions = BuildOptions(),
              recipe_dir: Optional[Path] = None) -> BuildResult:
    """Merge the recipe's experts into a MoE model folder at `out` (written beside it, then renamed).

    One build of `out` at a time (a lock beside it); what killed builds of `out` left is cleaned first; SIGTERM and
    SIGHUP unwind like Ctrl-C, removing the temporary folder (moelab/build/output.py)."""
    out = Path(os.path.abspath(out))  # "." and "x/.." have no name to put the lock and temporary folder beside
    if not out.name:
        raise MoelabError(f"{out} cannot be an output folder; give the path of a folder to create")
    check_build_numbers(options.shard_bytes, options.seed)
    with stop_signals_unwind(), output_lock(out):
        remove_stale_folders(out)
        check_replaceable(out, options.force, options.owner)
        try:
            return _build_moe(recipe, recipe_text, out, options, recipe_dir)
        except OSError as err:
            raise MoelabError(f"cannot write {err.filename or out}: {err.strerror}; free some space or choose "
                              "another output folder (nothing was written to it)") from None
        finally:
            with stop_signals_deferred():  # also a temporary folder that a signal left before its `try` began
                remove_stale_folders(out)


def _build_moe(recipe: Recipe, recipe_text: str, out: Path, options: BuildOptions,
               recipe_dir: Optional[Path]) -> BuildResult:
    if options.load_in_4bit and options.load_in_8bit:
        raise MoelabError("choose one of --load-in-4bit and --load-in-8bit")
    seed = recipe.seed if options.seed is None else options.seed
    base = _open_model(recipe.base_model, recipe_dir)
    experts = [_open_model(e.source_model, recipe_dir) for e in recipe.experts]
    shared = [_open_model(e.source_model, recipe_dir) for e in recipe.shared_experts or []]
    roles = [(f"expert {i} ({recipe.expert_names()[i]})", m) for i, m in enumerate(experts)] + \
        [("shared expert", m) for m in shared]
    for role, model in roles:
        _check_compatible(base, model, role)
    family, family_warnings = input_family(base.config)
    _check_sources(out, recipe, [("the base model", base)] + roles, family, recipe_dir)
    shared_spec = (recipe.shared_experts or [None])[0]
    layout = choose_layout(recipe.output_architectures(), family.model_type, bool(shared),
                           bool(shared_spec and (shared_spec.positive_prompts or shared_spec.negative_prompts)),
                           recipe.architecture)
    out_dtype = recipe.torch_dtype_name() or _config_dtype(base.config)
    config = moe_config_dict(layout, base.config, len(experts), recipe.experts_per_token, bool(shared), out_dtype)

    from moelab.build.gates import RouterRows, similar_expert_pairs

    shared_weights = _shared_weights(recipe, base, experts + shared)
    shared_weights.check_shapes()
    warnings = [f"recipe key '{key}' is not used by moelab (mergekit-moe ignores it too); it is ignored"
                for key in recipe.ignored_keys()]
    warnings += family_warnings + llama_cpp_warnings(layout, len(experts), bool(shared))
    if shared_weights.merged and (options.load_in_4bit or options.load_in_8bit):
        raise MoelabError(f"shared_weights: {recipe.shared_weights} cannot run the hidden-state pass in 4/8-bit "
                          "yet; drop --load-in-4bit/--load-in-8bit")

    gated_experts: list[Expert] = list(recipe.experts) + (list(recipe.shared_experts) if shared else [])
    num_layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    bound_malloc()
    routers = RouterRows(recipe, gated_experts, base, shared_weights, num_layers, hidden, seed, options.device,
                         options.load_in_4bit, options.load_in_8bit, recipe_dir,
                         zero_shared_gate=bool(shared) and not recipe.shared_experts[0].positive_prompts)

    plan = plan_tensors(layout, base, shared_weights, experts, shared, recipe, routers, out_dtype, seed)
    tmp = new_build_folder(out)
    try:
        shard_names = _write_with_progress(plan, tmp, options, routers,
                                           check=lambda: _check_config(layout, config, recipe.base_model))
        shared_deltas = shared_weights.relative_deltas()
        warnings += [
            f"expert {name} changed the shared (non-MLP) weights by {delta:.1%} of their norm, and shared_weights: "
            "base drops that; use shared_weights: task_arithmetic to keep it"
            for name, delta in shared_deltas.items()
            if recipe.shared_weights == "base" and delta > DROPPED_DELTA_WARNING]
        if recipe.gate_mode in PROMPTED_GATE_MODES:
            for a, b, cos in similar_expert_pairs(routers.gates[:, :len(experts)], recipe.expert_names()):
                warnings.append(f"experts {a} and {b} get nearly the same router rows (median cosine {cos:.3f}); "
                                "give them more distinct prompts, or routing between them is arbitrary")
        _write_config(layout, config, tmp)
        _copy_tokenizer(base.folder, tmp)
        heal = _heal(tmp, layout, recipe, base, experts, seed, options, recipe_dir) if recipe.heal else None
        routing = routers.report.to_json() if routers.report else None
        _write_metadata(tmp, out.name, recipe, recipe_text, layout, routing, heal and heal.to_json())
        if options.owner:
            (tmp / options.owner).write_text("this folder was written by moelab run, which may replace it\n")
        from moelab.card import model_card
        from moelab.redact import mask

        (tmp / "README.md").write_text(mask(model_card(recipe, recipe_text, layout.arch_id, warnings, shared_deltas,
                                                       routing=routing, heal=heal and heal.to_json())))
        _replace(tmp, out)
    except BaseException:
        routers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out=out, architecture=layout.arch_id, num_experts=len(experts), num_shards=len(shard_names),
                       total_bytes=sum(t.nbytes for t in plan), warnings=warnings, shared_deltas=shared_deltas,
                       routing=routers.report, heal=heal)


def _heal(folder: Path, layout: MoeLayout, recipe: Recipe, base: ResolvedModel, experts: list[ResolvedModel],
          seed: int, options: BuildOptions, recipe_dir: Optional[Path]):
    from moelab.build.heal import HealSettings, heal_checkpoint

    return heal_checkpoint(folder, layout, recipe, base.folder, [e.folder for e in experts],
                           HealSettings(options.device, seed, options.show_progress), recipe_dir)


def _shared_weights(recipe: Recipe, base: ResolvedModel, models: list[ResolvedModel]) -> SharedWeights:
    """Each distinct non-base expert model once, under the name and weight of the first expert that uses it."""
    specs = list(recipe.experts) + list(recipe.shared_experts or [])
    names = recipe.expert_names() + ["shared"] * len(recipe.shared_experts or [])
    contributors, seen = [], {base.folder.resolve()}
    for model, spec, name in zip(models, specs, names):
        if model.folder.resolve() not in seen:
            seen.add(model.folder.resolve())
            contributors.append((name, model.tensors, 1.0 if spec.weight is None else spec.weight))
    shared_names = [n for n in base.tensors.names() if not is_dense_mlp(n)]
    return SharedWeights(recipe.shared_weights, base.tensors, contributors, recipe.density, shared_names)


def is_up_to_date(out: Path, recipe_text: str) -> bool:
    """True when `out` is a finished moelab build of exactly this recipe text."""
    meta = Path(out) / "moelab.json"
    try:
        return json.loads(meta.read_text()).get("recipe_sha256") == recipe_hash(recipe_text)
    except (OSError, ValueError):
        return False


def _open_model(ref: str, recipe_dir: Optional[Path]) -> ResolvedModel:
    folder = resolve_model(ref, recipe_dir)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise MoelabError(f"cannot read config.json of model '{ref}': {err}") from None
    check_model_config(config, ref)
    return ResolvedModel(ref, folder, config, SafetensorsFolder(folder))


def _check_sources(out: Path, recipe: Recipe, models: list[tuple[str, ResolvedModel]], family: DenseFamily,
                   recipe_dir: Optional[Path]) -> None:
    """OUT apart from every source; every tensor the plan reads of the shape and dtype the config plans."""
    sources = []
    for role, model in models:
        sources += [(role, p) for p in local_inputs(model.ref, recipe_dir)]
        sources += [(role, model.folder)] + [(role, f) for f in model.folder.iterdir()]
    for name, expert in zip(recipe.expert_names(), recipe.experts):
        if expert.router_data and recipe.gate_mode == "trained":
            data = resolve_data_path(expert.router_data, recipe_dir)
            read_router_data(data)  # its errors now, not after the hidden-state pass
            sources.append((f"router_data of expert {name}", data))
    kept = [("the working folder", Path.cwd())] + ([("the recipe's folder", recipe_dir)] if recipe_dir else [])
    check_apart_from_sources(out, sources, kept)
    base = models[0][1]
    check_source_tensors(base.tensors, [n for n in base.tensors.names() if not is_dense_mlp(n)], base.config,
                         "the base model")
    mlp_names = [source for layer in range(base.config["num_hidden_layers"])
                 for source, _ in dense_mlp_sources(family, base.config, layer).values()]
    for role, model in models[1:]:
        check_source_tensors(model.tensors, mlp_names, base.config, role)


def _check_compatible(base: ResolvedModel, other: ResolvedModel, role: str) -> None:
    if other.config.get("model_type") != base.config.get("model_type"):
        raise MoelabError(
            f"{role} '{other.ref}' is a {other.config.get('model_type')} model but the base is "
            f"{base.config.get('model_type')}; all experts must share the base's architecture")
    for key in MATCHING_KEYS:
        if other.config.get(key) != base.config.get(key):
            raise MoelabError(
                f"{role} '{other.ref}' has {key}={other.config.get(key)} but the base has {base.config.get(key)}; "
                "experts must be fine-tunes of the same base model")


def _config_dtype(config: dict) -> str:
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16").removeprefix("torch.")
    return dtype if dtype in ("bfloat16", "float16", "float32") else "bfloat16"


def plan_tensors(layout: MoeLayout, base: ResolvedModel, shared_weights: SharedWeights, experts: list[ResolvedModel],
                 shared: list[ResolvedModel], recipe: Recipe, routers, out_dtype: str, seed: int) -> list[PlannedTensor]:
    """Every output tensor in file order: the shared tensors outside the layers, then layer by layer its shared
    tensors, experts and router. The writer copies the verbatim ones, produces the others in this order, and the
    late ones (router rows, which a thread computes meanwhile) last."""
    import torch

    dtype = getattr(torch, out_dtype)
    code = SAFETENSORS_DTYPES[out_dtype]
    num_layers, hidden = base.config["num_hidden_layers"], base.config["hidden_size"]
    num_experts = len(experts)
    family = DENSE_FAMILIES[base.config["model_type"]]
    plan: list[PlannedTensor] = []

    def from_source(source: SafetensorsFolder, name_rows: tuple[str, Optional[tuple[int, int]]], out_name: str,
                    spec: Expert, role: str, salt: int):
        name, rows = name_rows

        def produce(tensor):
            return _noise_and_scale(_take_rows(tensor, rows), spec, role, seed, salt).to(dtype)
        shape, stored_dtype = source.info(name)
        verbatim = (rows is None and not spec.noise_scale and stored_dtype == code
                    and not (role == "down" and spec.residual_scale is not None))
        plan.append(PlannedTensor(out_name, _rows_shape(shape, rows), code, produce, [SourceTensor(source, name)],
                                  verbatim))

    last_merged: dict[str, object] = {}  # a fused tensor (Phi-3's qkv_proj) is merged once for all its parts

    def merged_shared(name: str):
        def produce(rows, *tensors):
            if name not in last_merged:
                last_merged.clear()
                last_merged[name] = shared_weights.merge(name, *tensors)
                routers.offer(name, last_merged[name])
            return _take_rows(last_merged[name], rows).to(dtype)
        shape = base.tensors.info(name)[0]
        for out_name, rows in split_tensor(family, base.config, name):
            plan.append(PlannedTensor(out_name, _rows_shape(shape, rows), code, functools.partial(produce, rows),
                                      shared_weights.reads(name)))

    by_layer: dict[Optional[int], list[str]] = {}
    for name in shared_weights.names:
        by_layer.setdefault(layer_of(name), []).append(name)
    for name in by_layer.pop(None, []):
        merged_shared(name)
    for layer in range(num_layers):
        for name in by_layer.get(layer, []):
            merged_shared(name)
        dense = dense_mlp_sources(family, base.config, layer)
        for e, (model, spec) in enumerate(zip(experts, recipe.experts)):
            for role, out_name in expert_tensor_names(layout, layer, e).items():
                from_source(model.tensors, dense[role], out_name, spec, role, salt=layer * 1000 + e)
        plan.append(PlannedTensor(layout.router.format(layer=layer), (num_experts, hidden), code,
                                  lambda layer=layer: routers.rows(layer)[:num_experts].contiguous().to(dtype),
                                  late=True))
        if layout.shared_expert is None or not (shared or layout.empty_shared_slot):
            continue
        shared_names = {role: n.format(layer=layer) for role, n in layout.shared_expert.items()}
        gate_name = layout.shared_expert_gate and layout.shared_expert_gate.format(layer=layer)
        if shared:
            for role, out_name in shared_names.items():
                from_source(shared[0].tensors, dense[role], out_name, recipe.shared_experts[0], role,
                            salt=layer * 1000 + 999)
            if gate_name:
                plan.append(PlannedTensor(gate_name, (1, hidden), code,
                                          lambda layer=layer: routers.rows(layer)[num_experts:].contiguous()
                                          .to(dtype), late=True))
        else:
            # Qwen2-MoE always has a shared-expert slot: an empty one (size 0) adds nothing.
            for role, out_name in shared_names.items():
                shape = (hidden, 0) if role == "down" else (0, hidden)
                plan.append(PlannedTensor(out_name, shape, code, lambda shape=shape: torch.zeros(shape, dtype=dtype)))
            plan.append(PlannedTensor(gate_name, (1, hidden), code, lambda: torch.zeros(1, hidden, dtype=dtype)))
    return plan


def _rows_shape(shape: tuple[int, ...], rows: Optional[tuple[int, int]]) -> tuple[int, ...]:
    return shape if rows is None else (rows[1] - rows[0],) + tuple(shape[1:])


def _take_rows(tensor, rows: Optional[tuple[int, int]]):
    return tensor if rows is None else tensor[rows[0]:rows[1]].contiguous()


def _noise_and_scale(tensor, spec: Expert, role: str, seed: int, salt: int):
    """mergekit-moe's per-expert knobs: W + noise_scale * N(0, 1) on every MLP matrix; down_proj times residual_scale."""
    import torch

    if spec.noise_scale:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + salt * 3 + ("gate", "up", "down").index(role))
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        tensor = (tensor.float() + spec.noise_scale * noise).to(tensor.dtype)
    if role == "down" and spec.residual_scale is not None:
        tensor = (tensor.float() * spec.residual_scale).to(tensor.dtype)
    return tensor


def _write_with_progress(plan: list[PlannedTensor], folder: Path, options: BuildOptions, routers,
                         check: Callable[[], None]) -> list[str]:
    """Write the plan with one bar over its bytes, which names what the router thread is at; `check` runs while
    the writer copies."""
    import torch
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    total = sum(t.nbytes for t in plan)
    cores = torch.get_num_threads()
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), disable=not options.show_progress, transient=True) as progress:
        task = progress.add_task("building", total=total)

        def meanwhile():
            check()
            # The router thread's pass and this thread's merges each get half the cores: two pools of all the
            # cores spin against each other, which made both 2.6x slower (4x1B on 2 cores).
            if routers.start(lambda note: progress.update(task, description=f"building ({note})" if note
                                                          else "building"), threads=max(1, cores - cores // 2)):
                torch.set_num_threads(max(1, cores // 2))
        try:
            return write_sharded(plan, folder, options.shard_bytes,
                                 on_tensor=lambda t: progress.advance(task, t.nbytes), meanwhile=meanwhile)
        finally:
            torch.set_num_threads(cores)


# Activations every transformers release since 4.51 knows. Its config classes accept any `hidden_act` and RoPE
# type; only building a model rejects an unknown one, and that imports the modelling code (1.6 s, a third of a
# random-gate 4x135M build). A config with these and the default RoPE skips the model.
COMMON_ACTIVATIONS = frozenset({"silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"})


def _check_config(layout: MoeLayout, config: dict, base_ref: str) -> None:
    """Make the output's transformers config, and unless its values are common ones a model of it on the meta
    device (which allocates nothing), while the writer copies, so that values of the base's config.json that
    transformers rejects are an error (and the unfinished folder is removed) rather than an output that does not
    load. A layout without a transformers class is written as plain JSON."""
    if layout.config_class is None:
        return
    import transformers

    try:
        model_config = getattr(transformers, layout.config_class)(**config)
        activation = getattr(model_config, "hidden_act", None)
        if activation not in COMMON_ACTIVATIONS or _rope_type(model_config) != "default":
            import torch

            with torch.device("meta"):
                transformers.AutoModelForCausalLM.from_config(model_config)
    except Exception as err:  # noqa: BLE001 - transformers rejects a bad config with any exception type
        first_line = (str(err).splitlines() or [""])[0][:200]
        raise MoelabError(f"config.json of the base model '{base_ref}' has values transformers rejects "
                          f"({type(err).__name__}: {first_line}); the model folder is damaged") from None


def _rope_type(model_config) -> object:
    """`rope_parameters` from transformers 5 on, `rope_scaling` (None for the default) before."""
    rope = getattr(model_config, "rope_parameters", None) or getattr(model_config, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope


def _write_config(layout: MoeLayout, config: dict, folder: Path) -> None:
    import transformers

    if layout.config_class is None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return
    getattr(transformers, layout.config_class)(**config).save_pretrained(folder)


def _copy_tokenizer(base_dir: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, folder / name)


def _write_metadata(folder: Path, folder_name: str, recipe: Recipe, recipe_text: str, layout: MoeLayout,
                    routing: Optional[dict], heal: Optional[dict] = None) -> None:
    from moelab import __version__

    (folder / "moelab_recipe.yaml").write_text(recipe_text)
    meta = {
        "name": recipe.name or folder_name,
        "moelab_version": __version__,
        "architecture": layout.arch_id,
        "gate_mode": recipe.gate_mode,
        "experts_per_token": recipe.experts_per_token,
        "experts": [{"name": n, "source_model": e.source_model} for n, e in zip(recipe.expert_names(), recipe.experts)],
        "shared_expert": ({"source_model": recipe.shared_experts[0].source_model,
                           "residual_scale": recipe.shared_experts[0].residual_scale}
                          if recipe.shared_experts else None),
        "recipe_sha256": recipe_hash(recipe_text),
        "routing": routing,
        "heal": heal,
    }
    (folder / "moelab.json").write_text(json.dumps(meta, indent=2) + "\n")


def _replace(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`; an existing `out` (with --force) is removed only after that succeeds."""
    finish_build_folder(tmp)
    old = None
    with stop_signals_deferred():  # between the two renames, no OUT is there
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old-{tmp.name[-8:]}")
            out.rename(old)
        tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
