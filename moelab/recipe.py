"""The recipe: a mergekit-moe compatible YAML schema, loaded and validated with errors that name the line and the fix."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, FiniteFloat, ValidationError

from moelab.errors import MoelabError
from moelab.files import read_user_text

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random", "hidden_last", "hidden_avg", "trained", "ridge")
PROMPTED_GATE_MODES = ("hidden", "cheap_embed", "hidden_last", "hidden_avg", "trained", "ridge")
FITTED_GATE_MODES = ("trained", "ridge")  # router rows fitted to the experts' router_data
HIDDEN_GATE_MODES = ("hidden", "hidden_last", "hidden_avg")  # router rows from a pass as the build streams
RANDOM_GATE_MODES = ("random", "uniform_random")
SHARED_WEIGHT_MODES = ("base", "average", "task_arithmetic", "ties")
HEAL_PARTS = ("shared", "router", "experts")

# Output architectures: moelab id -> mergekit-moe's name, in mergekit-moe's order of preference. `architecture:`
# is a moelab id, or (as in mergekit-moe) any case-insensitive prefix of a name, which may match several.
ARCHITECTURE_NAMES = {"mixtral": "Mixtral", "deepseek_moe": "DeepSeek MoE", "qwen2_moe": "Qwen MoE",
                      "qwen3_moe": "Qwen3 MoE"}
# An unknown recipe key this close to a known one (difflib ratio) is a typo, not a key to ignore.
NEAR_MISS_RATIO = 0.8
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16",
          "float32": "float32", "fp32": "float32", "float": "float32"}
# Names from a recipe become folder and file names (run's model folder, report folders) and cells of the card's
# table, so each is one path component of safe characters, at most as long as a Hub repo name.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
# torch seeds are 64-bit, and noise seeds are derived from the recipe's seed by multiplying it (build/__init__.py).
MAX_SEED = 2**32 - 1


def check_name(name: str) -> str:
    """`name` if it is a safe file name (NAME_PATTERN), else a ValueError that says what a name may hold."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a usable name: use 1 to 96 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit (it becomes a folder name)")
    return name


SafeName = Annotated[str, AfterValidator(check_name)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Expert(BaseModel):
    # Unknown keys are kept, then warned about (mergekit-moe ignores them); near-misses are refused before this.
    model_config = ConfigDict(extra="allow")

    source_model: str
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)
    noise_scale: Optional[FiniteFloat] = Field(None, ge=0)
    residual_scale: Optional[FiniteFloat] = None
    # moelab additions: a short label used by chat, compare and the model card; the expert's weight in
    # task_arithmetic/ties shared weights.
    name: Optional[SafeName] = None
    weight: Optional[FiniteFloat] = None
    # gate_mode trained/ridge: examples of this expert's domain (JSONL with "text", or one example per line).
    router_data: Optional[str] = None
    # `moelab eval --tasks domains`: held-out data of this expert's domain (fields in moelab/eval/domain.py).
    eval_data: Optional[dict] = None
    # heal: examples of this expert's domain to distill it on (default: its router_data).
    heal_data: Optional[str] = None


class RouterTraining(BaseModel):
    """Options of gate_modes trained and ridge (see moelab/build/router_training.py)."""
    model_config = ConfigDict(extra="forbid")

    examples: int = Field(64, ge=2, le=100_000, description="examples per expert, before the held-out split")
    tokens: int = Field(32, ge=2, le=32_768, description="tokens per example (longer ones are cut)")
    tokens_per_example: int = Field(16, ge=1, le=32_768, description="tokens of each example kept for fitting")
    steps: int = Field(80, ge=1, le=100_000, description="trained: Adam steps")
    lr: FiniteFloat = Field(0.1, gt=0)
    balance: FiniteFloat = Field(0.1, ge=0, description="weight of the load-balance term")
    alpha: FiniteFloat = Field(0.1, gt=0, description="ridge: penalty, relative to the mean eigenvalue of the features")
    margin: FiniteFloat = Field(4.0, gt=0, description="ridge: logit gap aimed for between a token's expert and the rest")
    holdout: FiniteFloat = Field(0.25, ge=0, lt=1, description="share of examples held out to measure routing")


class Heal(BaseModel):
    """Options of the heal step after the merge (see moelab/build/heal.py)."""
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(60, ge=1, description="optimizer steps")
    rank: int = Field(8, ge=1, description="LoRA rank")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (warm-up, then cosine decay)")
    parts: list[str] = Field(default_factory=lambda: ["shared", "router"],
                             description="what is trained: shared (LoRA on attention), router (its rows), experts "
                                         "(LoRA on the experts' MLPs)")
    examples: int = Field(48, ge=2, description="examples per domain, before the held-out split")
    tokens: int = Field(64, ge=2, description="tokens per example (longer ones are cut)")
    batch: int = Field(2, ge=1, description="examples per domain in each step")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of the examples held out to measure the heal")
    top_k: int = Field(32, ge=1, description="teacher log-probabilities kept per token")
    general_weight: float = Field(0.5, ge=0, description="weight of the general-data term (base as teacher)")
    general_data: Optional[str] = None
    load_in_4bit: bool = Field(False, description="CUDA: frozen weights in 4-bit (QLoRA) through bitsandbytes")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="allow")

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None
    # moelab additions.
    name: Optional[SafeName] = None
    seed: Seed = 0
    allow_identical_experts: bool = False
    shared_weights: str = "base"
    density: FiniteFloat = 0.5
    router_training: RouterTraining = Field(default_factory=RouterTraining)
    heal: Optional[Heal] = None

    def expert_names(self) -> list[str]:
        return [e.name or f"E{i}" for i, e in enumerate(self.experts)]

    def output_architectures(self) -> tuple[str, ...]:
        """The moelab ids `architecture` may mean, in mergekit-moe's order of preference (all when it is absent)."""
        if not self.architecture:
            return tuple(ARCHITECTURE_NAMES)
        asked = self.architecture.lower()
        if asked in ARCHITECTURE_NAMES:
            return (asked,)
        matches = tuple(a for a, name in ARCHITECTURE_NAMES.items() if name.lower().startswith(asked))
        if not matches:
            names = ", ".join(f"{a} ('{name}')" for a, name in ARCHITECTURE_NAMES.items())
            raise MoelabError(f"unknown architecture '{self.architecture}': use one of {names} or a prefix of a "
                              "quoted name, or leave it out to infer it")
        return matches

    def ignored_keys(self) -> list[str]:
        """Recipe keys moelab does not know (mergekit-moe ignores them too), as dotted paths."""
        keys = list(self.model_extra or {})
        for group, experts in (("experts", self.experts), ("shared_experts", self.shared_experts or [])):
            keys += [f"{group}.{i}.{key}" for i, e in enumerate(experts) for key in e.model_extra or {}]
        return keys

    def torch_dtype_name(self) -> Optional[str]:
        return None if self.dtype is None else DTYPES[self.dtype.lower()]


def recipe_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_recipe(path: str | Path, allow_identical_experts: bool = False) -> tuple[Recipe, str]:
    """Read and validate a recipe file; returns the recipe and its text as given (stored beside the model)."""
    path = Path(path)
    text = read_user_text(path, "recipe")
    return parse_recipe(text, str(path), allow_identical_experts), text


def parse_recipe(text: str, source: str = "<recipe>", allow_identical_experts: bool = False) -> Recipe:
    try:
        return _parse_recipe(text, source, allow_identical_experts)
    except RecursionError:
        raise MoelabError(f"{source}: the YAML is nested too deeply to be a recipe; a recipe is a mapping of "
                          "fields and lists of experts") from None


def _parse_recipe(text: str, source: str, allow_identical_experts: bool) -> Recipe:
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and context_mark:
            problem += f" ({context} started at line {context_mark.line + 1})"
        raise MoelabError(f"{source}: malformed YAML{where}: {problem}; fix the YAML syntax there") from None
    if not isinstance(data, dict):
        raise MoelabError(f"{source}: a recipe is a YAML mapping with base_model and experts; got {type(data).__name__}")
    _check_keys(data, root, source)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise MoelabError(f"{source}{_line_of(root, first['loc'])}: {_describe(first)}") from None
    recipe.allow_identical_experts = recipe.allow_identical_experts or allow_identical_experts
    _check_recipe(recipe, source)
    return recipe


def _check_keys(data: dict, root, source: str) -> None:
    """Refuse what is surely a mistake before validation: a key one typo away from a field, prompts as one string."""
    mappings = [((), data, Recipe)]
    for group in ("experts", "shared_experts"):
        if isinstance(data.get(group), list):
            mappings += [((group, i), e, Expert) for i, e in enumerate(data[group]) if isinstance(e, dict)]
    for loc, mapping, model in mappings:
        for key, value in mapping.items():
            where = f"{source}{_line_of(root, loc + (key,))}"
            field = ".".join(str(p) for p in loc + (key,))
            if key in model.model_fields:
                if key in ("positive_prompts", "negative_prompts") and isinstance(value, str):
                    shown = value if len(value) <= 40 else value[:37] + "..."
                    raise MoelabError(f"{where}: '{field}' is one string; write a list, one prompt per item: "
                                      f"{key}: [{json.dumps(shown)}, \"another prompt\"]")
                continue
            meant = difflib.get_close_matches(str(key), list(model.model_fields), n=1, cutoff=NEAR_MISS_RATIO)
            if meant:
                raise MoelabError(f"{where}: unknown field '{field}'; did you mean {meant[0]}?")


def _describe(error: dict) -> str:
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"unknown field '{field}'; check its spelling against the recipe format in README.md"
    if error["type"] == "missing":
        return f"missing required field '{field}'"
    return f"field '{field}': {error['msg'].removeprefix('Value error, ')}"


def _line_of(node, loc: tuple) -> str:
    """' (line N)' for the YAML node at a pydantic error location, as far down as it exists."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return f" (line {line})" if line else ""


def _check_recipe(recipe: Recipe, source: str) -> None:
    n = len(recipe.experts)
    if n == 0:
        raise MoelabError(f"{source}: 'experts' is empty; list at least one expert with a source_model")
    if "experts_per_token" not in recipe.model_fields_set:
        recipe.experts_per_token = min(2, n)
    if not 1 <= recipe.experts_per_token <= n:
        raise MoelabError(
            f"{source}: experts_per_token is {recipe.experts_per_token} but there are {n} experts; "
            f"set it between 1 and {n}")
    if recipe.gate_mode not in GATE_MODES:
        raise MoelabError(f"{source}: unknown gate_mode '{recipe.gate_mode}'; use one of {', '.join(GATE_MODES)}")
    if recipe.dtype is not None and recipe.dtype.lower() not in DTYPES:
        raise MoelabError(f"{source}: unknown dtype '{recipe.dtype}'; use bfloat16, float16 or float32")
    recipe.output_architectures()
    if recipe.shared_weights not in SHARED_WEIGHT_MODES:
        raise MoelabError(f"{source}: unknown shared_weights '{recipe.shared_weights}'; "
                          f"use one of {', '.join(SHARED_WEIGHT_MODES)}")
    if not 0 < recipe.density <= 1:
        raise MoelabError(f"{source}: density is {recipe.density}; it is the share of each delta ties keeps, "
                          "so set it in (0, 1]")
    if recipe.heal is not None:
        _check_heal(recipe.heal, source)
    if recipe.shared_experts is not None and len(recipe.shared_experts) > 1:
        raise MoelabError(
            f"{source}: {len(recipe.shared_experts)} shared experts given; the supported layouts take at most one "
            "(merge them first, or keep one)")
    names = recipe.expert_names()
    if len(set(names)) != len(names):
        raise MoelabError(f"{source}: expert names must be unique; got {names}")
    if recipe.gate_mode == "trained":
        for i, expert in enumerate(recipe.experts):
            if expert.router_data is None and len(expert.positive_prompts) < 2:
                raise MoelabError(
                    f"{source}: expert {i} ({names[i]}) has no router_data and {len(expert.positive_prompts)} "
                    "positive prompt(s); gate_mode trained fits on examples and holds some out, so give it a "
                    "router_data file (or at least 2 positive prompts)")
    if recipe.gate_mode in PROMPTED_GATE_MODES:
        for i, expert in enumerate(recipe.experts):
            if not expert.positive_prompts:
                raise MoelabError(
                    f"{source}: expert {i} ({names[i]}) has no positive_prompts, which gate_mode "
                    f"'{recipe.gate_mode}' needs; add prompts or use gate_mode: random")
        prompt_sets = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in recipe.experts}
        if n > 1 and len(prompt_sets) == 1:
            raise MoelabError(
                f"{source}: all experts have the same prompts, so the router cannot tell them apart; "
                "give each expert prompts of its own domain")
    sources = {e.source_model for e in recipe.experts}
    if (n > 1 and len(sources) == 1 and recipe.gate_mode not in RANDOM_GATE_MODES
            and not recipe.allow_identical_experts):
        raise MoelabError(
            f"{source}: all experts are the same model ({recipe.experts[0].source_model}), so the MoE computes "
            "exactly what that model does and routing changes nothing until it is trained; set "
            "allow_identical_experts: true (or pass --allow-identical-experts) if that is what you want")


def _check_heal(heal: Heal, source: str) -> None:
    unknown = [p for p in heal.parts if p not in HEAL_PARTS]
    if unknown or not heal.parts or len(set(heal.parts)) != len(heal.parts):
        raise MoelabError(f"{source}: heal.parts is {heal.parts}; list each of {', '.join(HEAL_PARTS)} at most once "
                          "(at least one)")
    if heal.examples * heal.holdout < 1 or heal.examples * (1 - heal.holdout) < 1:
        raise MoelabError(f"{source}: heal.examples {heal.examples} with heal.holdout {heal.holdout} leaves no "
                          "training or no held-out example; raise examples or change holdout")
