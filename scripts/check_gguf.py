"""Each moelab output layout through llama.cpp's own convert_hf_to_gguf.py: does it convert, with the tensors expected?

For every case a tiny MoE (hidden 64, 2 layers, 4 experts, SmolLM2's tokenizer, which llama.cpp recognizes) is built
from random dense models, converted to an f32 GGUF, and read back with llama.cpp's gguf-py: the architecture, expert
counts, every tensor name llama.cpp's loader expects, and the stacked expert and router tensors against the
checkpoint's, value for value. Where llama-cpp-python is installed, the GGUF's logits are also compared with
transformers' on a few tokens (DeepSeek excepted: transformers runs it only with remote code).

The llama.cpp sources come from the llama-cpp-python sdist on PyPI (`--llama-cpp DIR` to use a checkout instead);
nothing is compiled. Figures go to reports/bench/gguf.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import yaml
from bench_report import write_bench_json

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
LLAMA_CPP_PYTHON = "0.3.36"
SOURCES_CACHE = Path.home() / ".cache" / "moelab" / f"llama.cpp-from-llama-cpp-python-{LLAMA_CPP_PYTHON}"
NUM_EXPERTS, TOP_K = 4, 2

SHARED_EXPERT = ["ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"]
# case: (dense family, recipe fields, llama.cpp architecture, per-layer tensors beyond the common ones)
CASES = {
    "mixtral (llama experts)": ("llama", {}, "llama", []),
    "mixtral (phi3 experts)": ("phi3", {}, "llama", []),
    # llama.cpp's qwen2moe and deepseek loaders require the shared expert's tensors, of full size.
    "qwen2_moe (qwen2 experts, no shared expert)": (
        "qwen2", {}, "qwen2moe", ["attn_q.bias", "attn_k.bias", "attn_v.bias", "ffn_gate_inp_shexp.weight"]
        + SHARED_EXPERT),
    "qwen2_moe (llama experts, gated shared expert)": (
        "llama", {"shared_experts": [{"positive_prompts": ["Hello"]}], "architecture": "qwen"}, "qwen2moe",
        ["ffn_gate_inp_shexp.weight"] + SHARED_EXPERT),
    "qwen3_moe": ("qwen3", {}, "qwen3moe", ["attn_q_norm.weight", "attn_k_norm.weight"]),
    "deepseek_moe (shared expert)": ("llama", {"shared_experts": [{"residual_scale": 0.1}]}, "deepseek",
                                     SHARED_EXPERT),
    "deepseek_moe (no shared expert)": ("llama", {"architecture": "deepseek"}, "deepseek", SHARED_EXPERT),
}
COMMON_LAYER_TENSORS = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                        "ffn_norm.weight", "ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                        "ffn_down_exps.weight"]
# GGUF stacked tensor -> the checkpoint's expert role, to compare values.
STACKED = {"ffn_gate_exps.weight": "gate", "ffn_up_exps.weight": "up", "ffn_down_exps.weight": "down"}


def llama_cpp_sources(given: Path | None) -> Path:
    """A folder with convert_hf_to_gguf.py, conversion/ and gguf-py/, from the llama-cpp-python sdist."""
    if given:
        return given
    if (SOURCES_CACHE / "convert_hf_to_gguf.py").is_file():
        return SOURCES_CACHE
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
        wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as sdist:
            members = [m for m in sdist.getmembers() if m.name.startswith(wanted) and m.isfile()]
            for member in members:
                member.name = member.name[len(prefix):]
            sdist.extractall(SOURCES_CACHE, members=members, filter="data")
    return SOURCES_CACHE


def build_case(work: Path, family: str, extra: dict, tokenizer: Path) -> Path:
    from conftest import make_tiny_dense
    from moelab.build import BuildOptions, build_moe
    from moelab.recipe import parse_recipe

    dense = [make_tiny_dense(work / f"{family}{i}", family, i, tokenizer) for i in range(NUM_EXPERTS)]
    fields = {"base_model": str(dense[0]), "gate_mode": "random", "experts_per_token": TOP_K,
              "experts": [{"source_model": str(d)} for d in dense]}
    fields.update({k: v for k, v in extra.items() if k != "shared_experts"})
    if "shared_experts" in extra:
        fields["shared_experts"] = [{"source_model": str(dense[0]), **extra["shared_experts"][0]}]
    text = yaml.safe_dump(fields)
    return build_moe(parse_recipe(text), text, work / "moe", BuildOptions(show_progress=False)).out


def check_gguf(gguf_path: Path, moe: Path, arch: str, extra_layer_tensors: list[str]) -> dict:
    import numpy as np
    from gguf import GGUFReader

    from moelab.build.layouts import LAYOUTS, expert_tensor_names
    from moelab.build.tensors import SafetensorsFolder

    reader = GGUFReader(gguf_path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    tensors = {t.name: t for t in reader.tensors}
    config = json.loads((moe / "config.json").read_text())
    layers = config["num_hidden_layers"]
    expected = ["token_embd.weight", "output_norm.weight", "output.weight"] + [
        f"blk.{layer}.{name}" for layer in range(layers) for name in COMMON_LAYER_TENSORS + extra_layer_tensors]
    layout = LAYOUTS[next(a for a, lay in LAYOUTS.items() if lay.hf_architecture == config["architectures"][0])]
    source = SafetensorsFolder(moe)
    mismatched = []
    for layer in range(layers):
        for gguf_name, role in STACKED.items():
            stacked = np.stack([source.get(expert_tensor_names(layout, layer, e)[role]).float().numpy()
                                for e in range(NUM_EXPERTS)])
            if not np.array_equal(np.asarray(tensors[f"blk.{layer}.{gguf_name}"].data).reshape(stacked.shape), stacked):
                mismatched.append(f"blk.{layer}.{gguf_name}")
        router = source.get(layout.router.format(layer=layer)).float().numpy()
        if not np.array_equal(np.asarray(tensors[f"blk.{layer}.ffn_gate_inp.weight"].data).reshape(router.shape),
                              router):
            mismatched.append(f"blk.{layer}.ffn_gate_inp.weight")
    return {"architecture": fields.get("general.architecture"),
            "expert_count": fields.get(f"{arch}.expert_count"),
            "expert_used_count": fields.get(f"{arch}.expert_used_count"),
            "expert_shared_count": fields.get(f"{arch}.expert_shared_count"),
            "missing_tensors": [n for n in expected if n not in tensors],
            "unexpected_tensors": sorted(set(tensors) - set(expected)),
            # llama.cpp's loader reads a shared expert of size 0 as one of feed_forward_length, and refuses it.
            "zero_size_tensors": sorted(n for n, t in tensors.items() if 0 in [int(d) for d in t.shape]),
            "values_differ": mismatched}


def logits_match(gguf_path: Path, moe: Path) -> float | None:
    """Largest |logit difference| between llama.cpp and transformers on a few tokens; None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    tokens = [1, 520, 2000, 33, 4000, 77]
    model = llama_cpp.Llama(str(gguf_path), logits_all=True, verbose=False, n_ctx=64)
    model.eval(tokens)
    ours = np.asarray(model.scores[:len(tokens)])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(moe, dtype=torch.float32)(torch.tensor([tokens])).logits[0]
    return float(np.abs(ours - reference.numpy()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp folder (default: from the llama-cpp-python sdist)")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), help="default: all")
    args = parser.parse_args()

    from moelab.build.sources import SMOLLM2_REF, resolve_model

    sources = llama_cpp_sources(args.llama_cpp)
    sys.path.insert(0, str(sources / "gguf-py"))  # llama.cpp's own reader, newer than gguf on PyPI
    tokenizer = resolve_model(SMOLLM2_REF)
    results = {}
    for case in args.cases or CASES:
        family, extra, arch, extra_tensors = CASES[case]
        with tempfile.TemporaryDirectory(prefix="check-gguf-") as tmp:
            work = Path(tmp)
            moe = build_case(work, family, extra, tokenizer)
            gguf_path = work / "moe.gguf"
            run = subprocess.run([sys.executable, str(sources / "convert_hf_to_gguf.py"), str(moe), "--outfile",
                                  str(gguf_path), "--outtype", "f32"], capture_output=True, text=True)
            if run.returncode != 0:
                error = [line for line in run.stderr.strip().splitlines() if line.strip()][-1]
                results[case] = {"converts": False, "error": error}
            else:
                result = {"converts": True, **check_gguf(gguf_path, moe, arch, extra_tensors)}
                result["ok"] = (result["architecture"] == arch and result["expert_count"] == NUM_EXPERTS
                                and result["expert_used_count"] == TOP_K and not result["missing_tensors"]
                                and not result["values_differ"] and not result["zero_size_tensors"])
                if not case.startswith("deepseek"):
                    result["max_abs_logit_diff_llama_cpp"] = logits_match(gguf_path, moe)
                results[case] = result
        print(f"{case}: {results[case]}")
    write_bench_json("gguf", {"llama_cpp_python_sdist": LLAMA_CPP_PYTHON, "num_experts": NUM_EXPERTS,
                              "experts_per_token": TOP_K, "cases": results})


if __name__ == "__main__":
    main()
