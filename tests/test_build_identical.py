"""Every layout, shared_weights mode and gate mode builds tensors bit-identical to a recorded reference.

The reference (tests/fixtures/build_hashes.json: sha256 per output tensor) was recorded with the build before
its streaming rewrite, so a faster build must still write the same bytes. Regenerate it only on purpose:
MOELAB_WRITE_BUILD_HASHES=1 python -m pytest tests/test_build_identical.py

Float32 router rows keep the last bits of the pass's float32 matmuls, whose summation order MKL picks by CPU (on
AMD it runs other kernels than on Intel), so a case may also hold, under outputs_on_other_cpus, the hashes that
the build before streaming (cd7e703) wrote on another CPU; a tensor matches its recorded hash or one of those.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moelab.build.tensors import SafetensorsFolder
from moelab.build import BuildOptions, build_moe
from moelab.recipe import parse_recipe
from test_build import write_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "build_hashes.json"
WRITE = os.environ.get("MOELAB_WRITE_BUILD_HASHES") == "1"
PROMPTS = {"math": ["The answer is 42", "Two plus three is five", "Seven times six", "12 minus 5 equals 7"],
           "code": ["def add(a, b): return a + b", "import os", "class Model(nn.Module): pass", "return a"],
           "chat": ["Hello! How are you today?", "I like to chat", "a helpful assistant", "How are you?"]}
TRAINING = {"examples": 4, "tokens": 8, "tokens_per_example": 3, "steps": 4, "holdout": 0.25}

# case: (family, recipe fields; experts name models "base", "ft1", "ft2": fine-tunes of the base)
CASES = {
    "mixtral-base-hidden": ("llama", dict(shared_weights="base", gate_mode="hidden")),
    "mixtral-average-hidden_last": ("mistral", dict(shared_weights="average", gate_mode="hidden_last")),
    "mixtral-task_arithmetic-hidden_avg-knobs": ("llama", dict(shared_weights="task_arithmetic",
                                                               gate_mode="hidden_avg", knobs=True)),
    "mixtral-ties-cheap_embed": ("llama", dict(shared_weights="ties", density=0.3, gate_mode="cheap_embed")),
    "mixtral-float32-task_arithmetic-hidden": ("llama", dict(shared_weights="task_arithmetic", gate_mode="hidden",
                                                             dtype="float32")),
    "mixtral-task_arithmetic-trained": ("llama", dict(shared_weights="task_arithmetic", gate_mode="trained",
                                                      router_training=TRAINING)),
    "mixtral-base-random": ("llama", dict(shared_weights="base", gate_mode="random")),
    "qwen2_moe-task_arithmetic-hidden": ("qwen2", dict(shared_weights="task_arithmetic", gate_mode="hidden")),
    "qwen2_moe-shared-ties-hidden": ("qwen2", dict(shared_weights="ties", gate_mode="hidden", shared="ft2")),
    "qwen2_moe-llama-unprompted-shared-uniform_random": ("llama", dict(architecture="Qwen MoE", shared="base",
                                                                       gate_mode="uniform_random",
                                                                       shared_weights="average")),
    "qwen3_moe-average-hidden": ("qwen3", dict(shared_weights="average", gate_mode="hidden")),
}


def fine_tune(base: Path, out: Path, seed: int) -> Path:
    """`base` with a seeded small change of every tensor."""
    shutil.copytree(base, out)
    tensors = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    changed = {name: (t.float() + 0.02 * torch.randn(t.shape, generator=generator)).to(t.dtype)
               for name, t in tensors.items()}
    save_file(changed, out / "model.safetensors", metadata={"format": "pt"})
    return out


def tensor_hashes(folder: Path) -> dict[str, str]:
    tensors = SafetensorsFolder(folder)
    hashes = {}
    for name in sorted(tensors.names()):
        t = tensors.get(name)
        digest = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
        digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        hashes[name] = digest.hexdigest()
    return hashes


def recipe_fields(models: dict[str, Path], fields: dict) -> dict:
    fields = dict(fields)
    knobs, shared = fields.pop("knobs", False), fields.pop("shared", None)
    experts = [{"name": n, "source_model": str(models[m]), "positive_prompts": PROMPTS[n]}
               for n, m in (("chat", "base"), ("math", "ft1"), ("code", "ft2"))]
    if knobs:
        experts[0]["negative_prompts"] = PROMPTS["code"][:2]
        experts[1]["noise_scale"] = 0.01
        experts[2]["residual_scale"] = 0.7
    if shared == "base":
        fields["shared_experts"] = [{"source_model": str(models["base"]), "residual_scale": 2.0}]
    elif shared:
        fields["shared_experts"] = [{"source_model": str(models[shared]), "positive_prompts": PROMPTS["math"][:2]}]
    return dict(base_model=str(models["base"]), experts_per_token=2, seed=3, experts=experts, **fields)


@pytest.fixture(scope="module")
def reference() -> dict:
    return {} if WRITE else json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def written():
    recorded = {}
    yield recorded
    if WRITE:
        FIXTURE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", CASES)
def test_build_writes_the_recorded_tensors(tmp_path, tiny_dense, case, reference, written):
    family, fields = CASES[case]
    base = tiny_dense("base", family)
    models = {"base": base, "ft1": fine_tune(base, tmp_path / "ft1", 1), "ft2": fine_tune(base, tmp_path / "ft2", 2)}
    inputs = {name: hashlib.sha256(json.dumps(tensor_hashes(folder)).encode()).hexdigest()
              for name, folder in models.items()}
    path, text = write_recipe(tmp_path, **recipe_fields(models, fields))
    result = build_moe(parse_recipe(text, str(path)), text, tmp_path / "moe",
                       BuildOptions(show_progress=False, shard_bytes=300_000))
    outputs = tensor_hashes(result.out)
    deltas = result.shared_deltas
    if WRITE:
        written[case] = {"inputs": inputs, "outputs": outputs, "shared_deltas": deltas}
        return
    expected = reference[case]
    assert inputs == expected["inputs"], "the tiny input models changed (torch/transformers version?): " \
                                         "the reference cannot be compared; regenerate it on the old code"
    assert sorted(outputs) == sorted(expected["outputs"])
    # The deltas are sums of squares in float32 chunks (merge.sum_of_squares), within 1e-5 of exact sums; the
    # reference has them from one float32 reduction per tensor.
    assert deltas == pytest.approx(expected["shared_deltas"], rel=1e-5)
    accepted = {name: {digest} for name, digest in expected["outputs"].items()}
    for hashes in expected.get("outputs_on_other_cpus", {}).values():
        for name, digest in hashes.items():
            accepted[name].add(digest)
    different = [name for name in outputs if outputs[name] not in accepted[name]]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]} (float32 router rows alone on a " \
                          "new kind of CPU: record cd7e703's hashes there, see the module docstring)"
