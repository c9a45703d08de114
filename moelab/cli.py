"""The `moelab` command line: parse arguments, call one stage, print its result. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from moelab.errors import MoelabError

app = typer.Typer(
    help="Build Mixture-of-Experts models from dense fine-tunes, then probe, evaluate, compare and publish them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


@app.callback()
def moelab() -> None:
    """recipe -> build -> model -> chat/eval -> report -> compare/leaderboard -> publish"""


@app.command()
def build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit-moe format; see README)."),
    out: Path = typer.Argument(..., help="Output model folder. Written to a temporary folder beside it, then renamed."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    device: str = typer.Option("auto", help="Where the router hidden-state pass runs: cpu, cuda or auto."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Run the hidden-state pass in 4-bit (bitsandbytes, CUDA)."),
    load_in_8bit: bool = typer.Option(False, "--load-in-8bit", help="Run the hidden-state pass in 8-bit (bitsandbytes, CUDA)."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, in bytes (e.g. 5GB, 500MB)."),
    seed: Optional[int] = typer.Option(None, help="Seed for random gates and noise_scale (default: the recipe's seed, 0)."),
    allow_identical_experts: bool = typer.Option(
        False, "--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
        help="Allow a recipe whose experts are all the same model."),
):
    """Merge the dense experts of RECIPE into a Mixture-of-Experts model folder OUT."""
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import load_recipe

    parsed, text = load_recipe(recipe, allow_identical_experts)
    options = BuildOptions(device=device, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit,
                           shard_bytes=parse_size(shard_size), seed=seed, force=force)
    result = build_moe(parsed, text, out, options, recipe_dir=recipe.parent)
    console.print(f"[green]built[/green] {result.architecture} with {result.num_experts} experts "
                  f"({result.total_bytes / 1e9:.2f} GB in {result.num_shards} shard(s)) at {out}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where the demo MoE is written."),
    device: str = typer.Option("auto", help="Where the router hidden-state pass runs: cpu, cuda or auto."),
):
    """Build the embedded offline demo: a 3-expert MoE (chat, math, code) from SmolLM2-135M-Instruct."""
    from moelab.build import BuildOptions, build_moe, is_up_to_date
    from moelab.recipe import load_recipe

    recipe_path = Path(__file__).parent / "recipes" / "demo-smollm2.yaml"
    parsed, text = load_recipe(recipe_path)
    if is_up_to_date(out, text):
        console.print(f"[green]up to date[/green]: {out} was built from this recipe")
    else:
        result = build_moe(parsed, text, out, BuildOptions(device=device, force=True), recipe_dir=recipe_path.parent)
        console.print(f"[green]built[/green] {result.architecture} with {result.num_experts} experts at {out}")
    console.print(f"next: moelab chat {out} --prompt 'What is 12, then times 3?'")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    number = text.strip().upper().rstrip("S")
    digits = number.rstrip("KMGTIB")
    try:
        size = int(float(digits) * units[number[len(digits):]])
    except (ValueError, KeyError):
        raise MoelabError(f"cannot read size '{text}'; write it like 5GB, 500MB or 1000000") from None
    if size <= 0:
        raise MoelabError(f"size must be positive; got '{text}'")
    return size


def main() -> None:
    # transformers' and the Hub's own progress bars and advice would bury moelab's output; users can turn them back on.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except MoelabError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
