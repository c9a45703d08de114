"""moelab build on tiny random models: the identical-experts invariant, layouts, gates, sharding, atomic output."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from moelab.build import BuildOptions, build_moe
from moelab.build.tensors import SafetensorsFolder
from moelab.errors import MoelabError
from moelab.recipe import parse_recipe

PROMPTS = [["The answer is 42"], ["def add(a, b): return a + b"], ["Hello! How are you today?"]]


def write_recipe(folder: Path, file_name: str = "recipe.yaml", **fields) -> tuple[Path, str]:
    text = yaml.safe_dump(fields, sort_keys=False)
    path = folder / file_name
    path.write_text(text)
    return path, text


def build(folder: Path, out_name: str = "moe", options: BuildOptions | None = None, **fields) -> Path:
    path, text = write_recipe(folder, **fields)
    out = folder / out_name
    build_moe(parse_recipe(text, str(path)), text, out, options or BuildOptions(show_progress=False),
              recipe_dir=folder)
    return out


def logits(model_dir: Path, text_ids=(1, 5, 17, 42, 99, 7, 3)) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([list(text_ids)])).logits[0]


LAYOUT_CASES = {
    # case: (family, architecture, shared expert?, canonical expert tensor name)
    "llama-mixtral": ("llama", None, False, "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
    "mistral-mixtral": ("mistral", None, False, "model.layers.1.block_sparse_moe.experts.2.w3.weight"),
    "qwen2-qwen2_moe": ("qwen2", None, False, "model.layers.1.mlp.experts.2.down_proj.weight"),
    "qwen2-qwen2_moe-shared": ("qwen2", None, True, "model.layers.1.mlp.shared_expert.down_proj.weight"),
    "llama-qwen2_moe-shared": ("llama", "Qwen MoE", True, "model.layers.1.mlp.shared_expert_gate.weight"),
    "qwen3-qwen3_moe": ("qwen3", None, False, "model.layers.1.mlp.experts.0.gate_proj.weight"),
}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_identical_experts_give_the_dense_models_logits(tmp_path, tiny_dense, case):
    family, architecture, with_shared, canonical = LAYOUT_CASES[case]
    dense = tiny_dense("dense", family)
    fields = dict(base_model=str(dense), gate_mode="random", experts_per_token=2,
                  allow_identical_experts=True,
                  experts=[{"source_model": str(dense), "positive_prompts": p} for p in PROMPTS])
    if architecture:
        fields["architecture"] = architecture
    if with_shared:
        # out = sum_k w_k * (0.5 mlp) + sigmoid(0) * mlp: a shared expert without prompts has a zero gate.
        for expert in fields["experts"]:
            expert["residual_scale"] = 0.5
        fields["shared_experts"] = [{"source_model": str(dense)}]
    out = build(tmp_path, **fields)

    assert canonical in SafetensorsFolder(out).names()
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    torch.testing.assert_close(logits(out), logits(dense), atol=2e-4, rtol=1e-4)


def test_shapes_and_config_match_the_architecture(tmp_path, tiny_dense):
    a, b = tiny_dense("a", "qwen2", seed=0), tiny_dense("b", "qwen2", seed=1)
    out = build(tmp_path, base_model=str(a), experts_per_token=1, architecture="qwen2_moe",
                experts=[{"source_model": str(a), "positive_prompts": PROMPTS[0]},
                         {"source_model": str(b), "positive_prompts": PROMPTS[1]}],
                shared_experts=[{"source_model": str(b), "positive_prompts": PROMPTS[2], "residual_scale": 0.25}])
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"]) == ("qwen2_moe", 2, 1)
    assert config["moe_intermediate_size"] == config["shared_expert_intermediate_size"] == 128
    assert config["qkv_bias"] is True and config["norm_topk_prob"] is True
    tensors = SafetensorsFolder(out)
    assert tensors.info("model.layers.0.mlp.gate.weight") == ((2, 64), "BF16")
    assert tensors.info("model.layers.0.mlp.shared_expert_gate.weight") == ((1, 64), "BF16")
    assert tensors.info("model.layers.0.mlp.experts.1.gate_proj.weight") == ((128, 64), "BF16")
    assert "model.layers.0.self_attn.q_proj.bias" in tensors
    source_b = SafetensorsFolder(b)
    torch.testing.assert_close(tensors.get("model.layers.1.mlp.experts.1.up_proj.weight"),
                               source_b.get("model.layers.1.mlp.up_proj.weight"), atol=0, rtol=0)
    torch.testing.assert_close(tensors.get("model.layers.1.mlp.shared_expert.down_proj.weight"),
                               source_b.get("model.layers.1.mlp.down_proj.weight") * 0.25, atol=0, rtol=0)
    # Non-expert tensors come from the base, untouched.
    torch.testing.assert_close(tensors.get("model.layers.0.self_attn.q_proj.weight"),
                               SafetensorsFolder(a).get("model.layers.0.self_attn.q_proj.weight"), atol=0, rtol=0)
    meta = json.loads((out / "moelab.json").read_text())
    assert [e["source_model"] for e in meta["experts"]] == [str(a), str(b)]
    assert meta["architecture"] == "qwen2_moe" and meta["shared_expert"]["residual_scale"] == 0.25


def test_cheap_embed_gate_rows_equal_the_hand_computation(tmp_path, tiny_dense):
    from transformers import AutoTokenizer

    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    experts = [{"source_model": str(a), "positive_prompts": ["The answer", "Two plus three"]},
               {"source_model": str(b), "positive_prompts": ["def add"], "negative_prompts": ["Hello"]}]
    out = build(tmp_path, base_model=str(a), gate_mode="cheap_embed", dtype="float32", experts=experts)

    tokenizer = AutoTokenizer.from_pretrained(a)
    embedding = SafetensorsFolder(a).get("model.embed_tokens.weight").float()

    def unit_sum(prompts):
        total = torch.zeros(64)
        for p in prompts:
            for token in [tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]:
                total += embedding[token]
        return total / total.norm()

    expected = torch.stack([unit_sum(experts[0]["positive_prompts"]),
                            (lambda d: d / d.norm())(unit_sum(["def add"]) - unit_sum(["Hello"]))])
    router = SafetensorsFolder(out)
    for layer in range(2):
        torch.testing.assert_close(router.get(f"model.layers.{layer}.block_sparse_moe.gate.weight"), expected,
                                   atol=1e-6, rtol=1e-5)


def router_inputs_by_hand(model_dir: Path, token_ids: list[int]) -> list[torch.Tensor]:
    """x_l = post_attention_layernorm(h_l + attn_l(input_layernorm(h_l))), from the modules, no hooks."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = torch.tensor([token_ids])
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        position_ids = torch.arange(len(token_ids)).unsqueeze(0)
        cos_sin = model.model.rotary_emb(states[0], position_ids)
        mask = torch.full((len(token_ids), len(token_ids)), float("-inf")).triu(1)[None, None].to(torch.bfloat16)
        result = []
        for layer, h in zip(model.model.layers, states):
            attn, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=cos_sin, attention_mask=mask)
            result.append(layer.post_attention_layernorm(h + attn)[0].float())
    return result


def test_hidden_gate_rows_equal_the_hand_computation(tmp_path, tiny_dense):
    from transformers import AutoTokenizer

    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    experts = [{"source_model": str(a), "positive_prompts": ["The answer is", "Seven times six"]},
               {"source_model": str(b), "positive_prompts": ["def add"], "negative_prompts": ["Hello there"]}]
    out = build(tmp_path, base_model=str(a), gate_mode="hidden", dtype="float32", experts=experts)

    tokenizer = AutoTokenizer.from_pretrained(a)

    def mean_vector(prompts):  # mean over prompts of the mean router input over tokens after BOS, per layer
        per_prompt = []
        for p in prompts:
            ids = [tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]
            per_prompt.append(torch.stack([x[1:].mean(dim=0) for x in router_inputs_by_hand(a, ids)]))
        return torch.stack(per_prompt).mean(dim=0)

    unit = lambda u: u / u.norm(dim=-1, keepdim=True)  # noqa: E731
    expected = torch.stack([unit(mean_vector(experts[0]["positive_prompts"])),
                            unit(mean_vector(["def add"]) - mean_vector(["Hello there"]))], dim=1)
    router = SafetensorsFolder(out)
    for layer in range(2):
        torch.testing.assert_close(router.get(f"model.layers.{layer}.block_sparse_moe.gate.weight"),
                                   expected[layer], atol=2e-2, rtol=2e-2)


def test_the_pass_computes_the_same_states_whatever_the_threads():
    """MKL sums a matmul of 5 to 11 rows in another order on 2 threads than on 1 (hidden 576, this machine's 2 cores):
    the pass computes every batch with one torch thread, so states do not depend on the caller's thread count, nor
    on how many threads run batches side by side (it used to switch counts as the writer finished: rows that varied
    from run to run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelab.build.layer_pass import LayerPass, prompt_batches

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                         num_attention_heads=9, num_key_value_heads=3)).eval()
    groups = [[list(range(1, 8))], [list(range(1, 11))], [list(range(1, 6))]]  # 7, 10 and 5 rows

    def states(torch_threads: int, workers: int):
        threads = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        try:
            layer_pass = LayerPass(model, prompt_batches(groups), "cpu", streamed=False)
            layer_pass.workers = workers
            layer_pass.embed()
            return layer_pass.run_layer()
        finally:
            torch.set_num_threads(threads)

    reference = states(1, 1)
    for torch_threads, workers in ((2, 1), (2, 2), (2, 3)):
        for got, want in zip(states(torch_threads, workers), reference):
            assert torch.equal(got, want), (torch_threads, workers)


def test_a_gang_of_batches_computes_what_each_batch_computes_alone():
    """Batches of few rows share each linear layer's matmul (one read of the weights for all of them); every batch
    still gets the states of a pass over that batch alone, bit for bit (the 1B benchmark's layer shapes, which gang:
    188 MB in float32; batches of 7, 10 and 5 rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from moelab.build.layer_pass import LayerPass, prompt_batches

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                                         num_attention_heads=16, num_key_value_heads=8)).eval()
    groups = [[list(range(1, 8))], [list(range(1, 11))], [list(range(3, 8))]]

    def states(token_groups):
        layer_pass = LayerPass(model, prompt_batches(token_groups), "cpu", streamed=False)
        layer_pass.embed()
        return [layer_pass.run_layer() for _ in range(2)]

    assert LayerPass(model, prompt_batches(groups), "cpu", streamed=False).gangs == [[0, 1, 2]]
    together = states(groups)
    for b, group in enumerate(groups):
        alone = states([group])
        for layer in range(2):
            assert torch.equal(together[layer][b], alone[layer][0]), (b, layer)


def test_a_gang_never_waits_for_a_batch_that_takes_another_path():
    """Batches of a gang that call different linear layers, one of them twice, or none, each get their own rows'
    products, and none waits forever for a batch that will not come."""
    import threading

    from moelab.build.layer_pass import _Gang

    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 32), torch.nn.Linear(64, 48)
    paths = [[a, b], [b], [a, a, b], []]  # per batch: the linear layers it calls, in turn
    inputs = [torch.randn(8, 64) for _ in paths]
    gang, results = _Gang(len(paths)), {}

    def run(slot: int) -> None:
        calls: dict = {}
        try:
            results[slot] = []
            for module in paths[slot]:
                calls[module] = calls.get(module, -1) + 1
                results[slot].append(gang.linear(module, inputs[slot], slot, calls[module]))
        finally:
            gang.finish()

    threads = [threading.Thread(target=run, args=(slot,), daemon=True) for slot in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a batch of the gang still waits"
    for slot, path in enumerate(paths):
        assert len(results[slot]) == len(path)
        for module, got in zip(path, results[slot]):
            want = torch.nn.functional.linear(inputs[slot], module.weight, module.bias)
            assert torch.allclose(got, want, atol=1e-6), slot


def test_random_gates_are_seeded_and_scaled(tmp_path, tiny_dense):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    experts = [{"source_model": str(a)}, {"source_model": str(b)}]
    first = build(tmp_path, "one", base_model=str(a), gate_mode="uniform_random", dtype="float32", experts=experts)
    again = build(tmp_path, "two", base_model=str(a), gate_mode="uniform_random", dtype="float32", experts=experts)
    other = build(tmp_path, "three", options=BuildOptions(seed=7, show_progress=False), base_model=str(a),
                  gate_mode="uniform_random", dtype="float32", experts=experts)
    name = "model.layers.0.block_sparse_moe.gate.weight"
    g1, g2, g3 = (SafetensorsFolder(d).get(name) for d in (first, again, other))
    assert torch.equal(g1, g2) and not torch.equal(g1, g3)
    assert g1.abs().max() <= 64 ** -0.5


MODELLING_LOADED = """
import json, re, sys
from pathlib import Path
from moelab.build import BuildOptions, build_moe
from moelab.recipe import parse_recipe

recipe = Path(sys.argv[1])
build_moe(parse_recipe(recipe.read_text(), str(recipe)), recipe.read_text(), recipe.parent / "moe",
          BuildOptions(show_progress=False), recipe_dir=recipe.parent)
# the base of every model class, and the model classes themselves (the auto mapping's module is no model class)
print(json.dumps(sorted(m for m in sys.modules if re.fullmatch(
    r"transformers[.](modeling_utils|models[.](?!auto[.])[a-z0-9_]+[.]modeling_[a-z0-9_]+)", m))))
"""


@pytest.mark.parametrize("gate_mode, hidden_act, loaded", [
    ("random", "silu", []), ("cheap_embed", "silu", []),
    # an activation outside the common ones: only a model of the config shows whether transformers has it
    ("random", "gelu_10", ["transformers.modeling_utils", "transformers.models.mixtral.modeling_mixtral"])])
def test_gates_without_a_pass_load_no_modelling_code(tmp_path, tiny_dense, gate_mode, hidden_act, loaded):
    a, b = tiny_dense("a", seed=0, hidden_act=hidden_act), tiny_dense("b", seed=1, hidden_act=hidden_act)
    recipe, _ = write_recipe(tmp_path, base_model=str(a), gate_mode=gate_mode, experts=[
        {"source_model": str(a), "positive_prompts": ["The answer is 42"]},
        {"source_model": str(b), "positive_prompts": ["def add(a, b): return a + b"]}])
    run = subprocess.run([sys.executable, "-c", MODELLING_LOADED, str(recipe)], capture_output=True, text=True,
                         timeout=300)

    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == loaded
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["hidden_act"] == hidden_act


def test_noise_and_residual_scale(tmp_path, tiny_dense):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    out = build(tmp_path, base_model=str(a), gate_mode="random", dtype="float32",
                experts=[{"source_model": str(a), "residual_scale": 0.5},
                         {"source_model": str(b), "noise_scale": 0.01}])
    moe, src_a, src_b = SafetensorsFolder(out), SafetensorsFolder(a), SafetensorsFolder(b)
    torch.testing.assert_close(moe.get("model.layers.0.block_sparse_moe.experts.0.w2.weight"),
                               src_a.get("model.layers.0.mlp.down_proj.weight").float() * 0.5)
    torch.testing.assert_close(moe.get("model.layers.0.block_sparse_moe.experts.0.w1.weight"),
                               src_a.get("model.layers.0.mlp.gate_proj.weight").float())
    delta = moe.get("model.layers.0.block_sparse_moe.experts.1.w3.weight") - \
        src_b.get("model.layers.0.mlp.up_proj.weight").float()
    assert 0.005 < delta.std() < 0.02


def test_small_shards_and_tied_embeddings(tmp_path, tiny_dense):
    dense = tiny_dense("tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in SafetensorsFolder(dense)
    out = build(tmp_path, options=BuildOptions(shard_bytes=40_000, show_progress=False), base_model=str(dense),
                gate_mode="random", allow_identical_experts=True,
                experts=[{"source_model": str(dense)}, {"source_model": str(dense)}])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert sum((out / s).stat().st_size for s in shards) > index["metadata"]["total_size"]
    assert "lm_head.weight" not in index["weight_map"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    torch.testing.assert_close(logits(out), logits(dense), atol=2e-4, rtol=1e-4)


def test_output_folder_has_tokenizer_card_and_recipe(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    out = build(tmp_path, base_model=str(dense), gate_mode="random", allow_identical_experts=True,
                experts=[{"source_model": str(dense), "name": "math"}, {"source_model": str(dense), "name": "code"}])
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "README.md", "moelab_recipe.yaml", "moelab.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "moe" in front["tags"] and "mixtral" in front["tags"]
    assert "| math |" in card and "| code |" in card
    assert (out / "moelab_recipe.yaml").read_text() == (tmp_path / "recipe.yaml").read_text()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a plain folder's permissions, not the temp folder's 0700


def test_failed_build_leaves_nothing_at_out(tmp_path, tiny_dense):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    shard = b / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # the header survives, the tensor data does not
    with pytest.raises(Exception):
        build(tmp_path, base_model=str(a), gate_mode="random",
              experts=[{"source_model": str(a)}, {"source_model": str(b)}])
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]


def two_expert_hidden_recipe(a: Path, b: Path) -> dict:
    return dict(base_model=str(a), gate_mode="hidden", experts=[
        {"source_model": str(a), "positive_prompts": PROMPTS[0]}, {"source_model": str(b), "positive_prompts": PROMPTS[1]}])


def test_without_kernel_copies_the_build_writes_the_same_files(tmp_path, tiny_dense, monkeypatch):
    """Where os.copy_file_range cannot copy (an older kernel across file systems), the bytes go through a buffer."""
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    in_kernel = build(tmp_path, "in-kernel", **two_expert_hidden_recipe(a, b))
    refused = []

    def cross_device(*args):
        refused.append(args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
    monkeypatch.setattr(os, "copy_file_range", cross_device)
    buffered = build(tmp_path, "buffered", **two_expert_hidden_recipe(a, b))
    assert len(refused) == 1  # the first refusal switches the build to buffered copies
    shards = sorted(p.name for p in in_kernel.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in buffered.glob("*.safetensors"))
    for shard in shards:
        assert (in_kernel / shard).read_bytes() == (buffered / shard).read_bytes(), shard


def test_a_full_disk_during_the_copies_is_one_error_and_leaves_nothing(tmp_path, tiny_dense, monkeypatch):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "copy_file_range", full)
    with pytest.raises(MoelabError, match="No space left on device; free some space"):
        build(tmp_path, **two_expert_hidden_recipe(a, b))
    assert not (tmp_path / "moe").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]


def test_existing_output_needs_force(tmp_path, tiny_dense):
    a, b = tiny_dense("a", seed=0), tiny_dense("b", seed=1)
    fields = dict(base_model=str(a), gate_mode="random", experts=[{"source_model": str(a)}, {"source_model": str(b)}])
    out = build(tmp_path, **fields)
    (out / "marker").write_text("old")
    with pytest.raises(MoelabError, match="--force"):
        build(tmp_path, **fields)
    build(tmp_path, options=BuildOptions(force=True, show_progress=False), **fields)
    assert not (out / "marker").exists() and (out / "config.json").is_file()


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


RECIPE_ERRORS = {
    "malformed yaml": ("base_model: a\nexperts:\n  - source_model: [unclosed\n", ["malformed YAML", "line 3"]),
    "missing base": ("experts:\n  - source_model: a\n", ["missing required field 'base_model'"]),
    "typo field": ("base_model: a\nexperts:\n  - source_model: a\n    postive_prompts: [x]\n",
                   ["unknown field 'experts.0.postive_prompts'", "line 4"]),
    "top-k zero": ("base_model: a\nexperts_per_token: 0\nexperts:\n  - {source_model: a, positive_prompts: [x]}\n",
                   ["experts_per_token is 0", "between 1 and 1"]),
    "top-k too big": ("base_model: a\nexperts_per_token: 3\nexperts:\n  - {source_model: a, positive_prompts: [x]}\n"
                      "  - {source_model: b, positive_prompts: [y]}\n", ["experts_per_token is 3"]),
    "no prompts": ("base_model: a\nexperts:\n  - {source_model: a, positive_prompts: [x]}\n  - {source_model: b}\n",
                   ["expert 1 (E1) has no positive_prompts"]),
    "gate mode": ("base_model: a\ngate_mode: learned\nexperts:\n  - {source_model: a}\n", ["unknown gate_mode 'learned'"]),
    "architecture": ("base_model: a\narchitecture: switch\ngate_mode: random\nexperts:\n  - {source_model: a}\n",
                     ["unknown architecture 'switch'"]),
    "two shared": ("base_model: a\ngate_mode: random\nexperts:\n  - {source_model: a}\n  - {source_model: b}\n"
                   "shared_experts:\n  - {source_model: a}\n  - {source_model: b}\n", ["2 shared experts"]),
    "identical": ("base_model: a\nexperts:\n  - {source_model: a, positive_prompts: [x]}\n"
                  "  - {source_model: a, positive_prompts: [y]}\n", ["all experts are the same model",
                                                                      "allow_identical_experts"]),
}


@pytest.mark.parametrize("case", RECIPE_ERRORS)
def test_bad_recipes_get_a_one_line_error(tmp_path, case):
    text, fragments = RECIPE_ERRORS[case]
    (tmp_path / "r.yaml").write_text(text)
    result = run_cli("build", tmp_path / "r.yaml", tmp_path / "out")
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_bad_models_get_a_one_line_error(tmp_path, tiny_dense):
    llama, llama2 = tiny_dense("llama", seed=0), tiny_dense("llama2", seed=1)
    wide = tiny_dense("wide", hidden_size=96, head_dim=24)
    deep = tiny_dense("deep", num_hidden_layers=3)
    vocab = tiny_dense("vocab", vocab_size=400)
    qwen = tiny_dense("qwen", "qwen2")
    qwen3 = tiny_dense("qwen3", "qwen3")

    written = []

    def recipe(base, *experts, **extra):
        fields = dict(base_model=str(base), gate_mode="random", experts=[{"source_model": str(e)} for e in experts])
        fields.update(extra)
        written.append(fields)
        return write_recipe(tmp_path, f"recipe{len(written)}.yaml", **fields)[0]

    cases = [
        (recipe(llama, llama, tmp_path / "nope"), ["nope", "not found"]),
        (recipe(llama, llama, tmp_path / "recipe1.yaml"), ["not a .gguf"]),
        (recipe(llama, llama, wide), ["hidden_size=96", "base has 64"]),
        (recipe(llama, llama, deep), ["num_hidden_layers=3"]),
        (recipe(llama, llama, vocab), ["vocab_size=400"]),
        (recipe(llama, llama, qwen), ["qwen2 model but the base is llama"]),
        (recipe(llama, llama, llama2, shared_experts=[{"source_model": str(llama)}], architecture="mixtral"),
         ["mixtral has no shared expert"]),
        (recipe(qwen3, qwen3, qwen3, shared_experts=[{"source_model": str(qwen3)}]),
         ["qwen3_moe has no shared expert"]),
        (recipe(llama, llama, llama2, architecture="qwen3_moe"), ["cannot be built from llama"]),
        (recipe(llama, llama, llama2, architecture="deepseek",
                shared_experts=[{"source_model": str(llama), "positive_prompts": ["x"]}]),
         ["deepseek_moe has an ungated shared expert"]),
    ]
    for path, fragments in cases:
        result = run_cli("build", path, tmp_path / "out", "--device", "cpu")
        assert_one_line_error(result, *fragments)
        assert not (tmp_path / "out").exists()
    result = run_cli("build", recipe(llama, llama, llama2), tmp_path / "out", "--load-in-4bit", "--device", "cpu")
    assert result.returncode == 0, result.stderr  # random gates run no hidden pass, so no GPU is needed
    result = run_cli("build", write_recipe(tmp_path, "hidden.yaml", base_model=str(llama), experts=[
        {"source_model": str(llama), "positive_prompts": ["a"]},
        {"source_model": str(llama2), "positive_prompts": ["b"]}])[0], tmp_path / "out2", "--load-in-8bit",
        "--device", "cpu")
    assert_one_line_error(result, "need a CUDA GPU")



@pytest.mark.parametrize("recipe_file", sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe_file):
    from moelab.recipe import load_recipe

    recipe, _ = load_recipe(recipe_file)
    assert recipe.experts and recipe.base_model
    assert len(set(recipe.expert_names())) == len(recipe.experts)


def test_mergekit_moe_recipe_loads_unchanged():
    text = """
base_model: mlabonne/Marcoro14-7B-slerp
gate_mode: hidden
dtype: bfloat16
experts:
  - source_model: openchat/openchat-3.5-1210
    positive_prompts: ["chat", "assistant", "tell me", "explain"]
  - source_model: beowolx/CodeNinja-1.0-OpenChat-7B
    positive_prompts: ["code", "python", "javascript", "programming", "algorithm"]
    noise_scale: 0.01
shared_experts:
  - source_model: mlabonne/Marcoro14-7B-slerp
    positive_prompts: ["general"]
    residual_scale: 0.1
architecture: Qwen MoE
"""
    recipe = parse_recipe(text)
    assert recipe.output_architectures() == ("qwen2_moe",)
    assert recipe.experts_per_token == 2 and recipe.expert_names() == ["E0", "E1"]
    assert recipe.shared_experts[0].residual_scale == 0.1
