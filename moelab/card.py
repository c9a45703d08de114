"""The model card (README.md with Hugging Face Hub metadata) of a moelab-built MoE."""

from __future__ import annotations

import yaml

from moelab.recipe import Recipe


def model_card(recipe: Recipe, recipe_text: str, architecture: str, notes: list[str],
               shared_deltas: dict[str, float] | None = None) -> str:
    """Markdown with YAML front matter: base models, tags, the expert table, build notes, the recipe and usage.

    `shared_deltas`: per expert, how far its shared (non-MLP) weights are from the base's (relative norm).
    """
    sources = [recipe.base_model] + [e.source_model for e in recipe.experts]
    metadata = {
        "base_model": sorted(set(sources)),
        "tags": ["moe", "frankenmoe", "merge", "moelab", architecture],
        "library_name": "transformers",
    }
    title = recipe.name or "moelab Mixture-of-Experts"
    rows = "\n".join(
        f"| {name} | `{e.source_model}` | {len(e.positive_prompts)} | {len(e.negative_prompts)} |"
        for name, e in zip(recipe.expert_names(), recipe.experts))
    notes_md = "".join(f"- {n}\n" for n in notes)
    deltas_md = "".join(f"| {name} | {delta:.2%} |\n" for name, delta in (shared_deltas or {}).items())
    return (
        f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n\n# {title}\n\n"
        f"A {architecture} Mixture-of-Experts built with moelab from {len(recipe.experts)} experts "
        f"({recipe.experts_per_token} per token, `{recipe.gate_mode}` router weights); attention, norms and "
        f"embeddings come from `{recipe.base_model}`.\n\n"
        "| expert | source model | positive prompts | negative prompts |\n|---|---|---|---|\n"
        f"{rows}\n\n"
        + (f"## Shared weights: `{recipe.shared_weights}`\nHow far each expert's non-MLP weights are from the "
           "base's (relative norm of the difference); `base` drops these changes, the merging modes keep them.\n\n"
           f"| expert | change of shared weights |\n|---|---|\n{deltas_md}\n" if deltas_md else "")
        + (f"## Build notes\n{notes_md}\n" if notes else "")
        + f"## Recipe\n```yaml\n{recipe_text.rstrip()}\n```\n\n"
        "## Usage\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tokenizer = AutoTokenizer.from_pretrained(MODEL)\nmodel = AutoModelForCausalLM.from_pretrained(MODEL)\n"
        "messages = [{\"role\": \"user\", \"content\": \"What is 12 times 7?\"}]\n"
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")\n"
        "print(tokenizer.decode(model.generate(inputs, max_new_tokens=64)[0]))\n```\n"
    )
