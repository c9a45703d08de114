"""DeepSeek-MoE output, moelab against mergekit-moe 0.1.5 on the same recipe: tensor names, shapes, values, config.

Tiny random Llama models (hidden 64, 2 layers) are made in-process; the recipe has three routed experts (one with a
residual_scale) and the base as an unprompted shared expert with residual_scale 0.1, which both tools build as
DeepseekForCausalLM. Router rows come from `gate_mode: hidden_last` (mergekit-moe's `hidden`), so they agree to
bf16 precision; every other tensor must be equal bit for bit. Figures go to reports/bench/deepseek.json;
`--fixture PATH` also writes mergekit-moe's layout (names, shapes, config; no weights) for tests/test_compat.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from bench_report import write_bench_json
from mergekit_venv import MERGEKIT_VERSION, mergekit_moe_command

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
# Config keys that name the writer or file, not the model.
UNCOMPARED_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


def deepseek_recipe(base: Path, experts: list[Path]) -> dict:
    prompts = [["The answer is 42"], ["def add(a, b): return a + b"], ["Hello! How are you today?"]]
    routed = [{"source_model": str(e), "positive_prompts": p} for e, p in zip(experts, prompts)]
    routed[1]["residual_scale"] = 0.5
    return {"base_model": str(base), "gate_mode": "hidden_last", "dtype": "bfloat16", "experts_per_token": 2,
            "experts": routed, "shared_experts": [{"source_model": str(base), "residual_scale": 0.1}]}


def read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def layout_of(folder: Path) -> dict:
    """What a loader sees of a checkpoint: tensor names with shapes and dtypes, and config.json."""
    tensors = read_tensors(folder)
    return {"tensors": {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                        for n, t in sorted(tensors.items())},
            "config": json.loads((folder / "config.json").read_text())}


def compare(ours: Path, theirs: Path) -> dict:
    import torch

    a, b = read_tensors(ours), read_tensors(theirs)
    common = sorted(set(a) & set(b))
    routers = [n for n in common if n.endswith("mlp.gate.weight")]
    unequal = [n for n in common if n not in routers and not torch.equal(a[n], b[n])]
    cosines = [torch.nn.functional.cosine_similarity(a[n].float(), b[n].float(), dim=-1).min().item()
               for n in routers]
    config_a, config_b = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    differing = {k: [config_a.get(k), config_b.get(k)] for k in sorted(set(config_a) | set(config_b))
                 if k not in UNCOMPARED_CONFIG_KEYS and config_a.get(k) != config_b.get(k)}
    return {
        "tensors": {"moelab": len(a), "mergekit": len(b), "only_moelab": sorted(set(a) - set(b)),
                    "only_mergekit": sorted(set(b) - set(a)),
                    "shape_or_dtype_differs": [n for n in common if (a[n].shape, a[n].dtype) != (b[n].shape, b[n].dtype)],
                    "bit_identical": len(common) - len(routers) - len(unequal), "values_differ": unequal,
                    "router_rows_min_cosine": min(cosines)},
        "config_differs (moelab, mergekit)": differing,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, help="write mergekit-moe's layout (no weights) to this JSON file")
    args = parser.parse_args()

    from conftest import make_tiny_dense, make_tiny_tokenizer
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import parse_recipe

    with tempfile.TemporaryDirectory(prefix="check-deepseek-") as tmp:
        work = Path(tmp)
        tokenizer = make_tiny_tokenizer(work / "tokenizer")
        # A rope_theta other than the default shows whether it reaches code that reads config.rope_theta.
        rope = {"rope_type": "default", "rope_theta": 1e6}
        base, *experts = [make_tiny_dense(work / f"llama{i}", "llama", i, tokenizer, rope_parameters=rope)
                          for i in range(4)]
        text = yaml.safe_dump(deepseek_recipe(base, experts), sort_keys=False)
        (work / "recipe.yaml").write_text(text)
        result = build_moe(parse_recipe(text), text, work / "moelab", BuildOptions(device="cpu", show_progress=False))
        run = subprocess.run(mergekit_moe_command() + [str(work / "recipe.yaml"), str(work / "mergekit"),
                                                       "--device", "cpu"], capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"mergekit-moe failed:\n{run.stderr[-3000:]}")
        figures = {"mergekit_version": MERGEKIT_VERSION, "moelab_architecture": result.architecture,
                   "mergekit_architectures": json.loads((work / "mergekit" / "config.json").read_text())
                   ["architectures"], **compare(work / "moelab", work / "mergekit")}
        if args.fixture:
            layout = layout_of(work / "mergekit")
            del layout["config"]["_name_or_path"]
            layout["generated_by"] = (f"mergekit-moe {MERGEKIT_VERSION} via scripts/check_deepseek.py --fixture, on "
                                      "tiny Llamas (conftest.make_tiny_dense, rope_theta 1e6): llama0 is the base "
                                      "and the shared expert, llama1..3 the routed experts")
            layout["recipe"] = deepseek_recipe(Path("llama0"), [Path(f"llama{i}") for i in (1, 2, 3)])
            args.fixture.write_text(json.dumps(layout, indent=1, sort_keys=True) + "\n")
            print(f"wrote {args.fixture}")
    print(json.dumps(figures, indent=2))
    write_bench_json("deepseek", figures)


if __name__ == "__main__":
    main()
