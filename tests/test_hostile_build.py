"""Hostile recipes, model files and faults against build and run: nothing deleted, nothing broken written with exit 0,
no debris, one-line errors (issue 17, items 1, 2, 5, 6, 7 and 10)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from moelab.build import BuildOptions, build_moe
from moelab.build.output import lock_path
from moelab.errors import MoelabError
from moelab.recipe import load_recipe
from moelab.run import DEMO_DATA_DIR, RUN_MARKER, RunConfig, plan_stages, run_stages

REPO = Path(__file__).resolve().parents[1]
QUIET = BuildOptions(show_progress=False)


def write_recipe(folder: Path, file_name: str = "r.yaml", **fields) -> Path:
    path = Path(folder) / file_name
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def random_recipe(folder: Path, a: Path, b: Path, **fields) -> Path:
    return write_recipe(folder, **{"base_model": str(a), "gate_mode": "random",
                                   "experts": [{"source_model": str(a), "name": "a"},
                                               {"source_model": str(b), "name": "b"}], **fields})


def build(recipe: Path, out: Path, options: BuildOptions = QUIET):
    parsed, text = load_recipe(recipe)
    return build_moe(parsed, text, out, options, recipe_dir=recipe.parent)


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(MoelabError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def contents(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the digest of its bytes: equal before and after means nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def moelab_cli(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def assert_cli_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------- 1. a recipe's name never decides what is deleted


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", "..", ".hidden", "", "x" * 97, "two\nlines",
                                  "pipe|name", "sp ace"])
@pytest.mark.parametrize("where", ["model", "expert"])
def test_names_from_a_recipe_are_one_safe_path_component(tmp_path, name, where):
    fields = {"base_model": "a", "gate_mode": "random", "experts": [{"source_model": "a"}, {"source_model": "b"}]}
    if where == "model":
        fields["name"] = name
    else:
        fields["experts"][0]["name"] = name
    one_line_error(lambda: load_recipe(write_recipe(tmp_path, **fields)), "is not a usable name")


def test_run_replaces_only_model_folders_it_built(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    recipe = random_recipe(tmp_path, a, b, name="victim")
    config = RunConfig(recipe, tmp_path / "out", ["bigbench_navigate"], 1, DEMO_DATA_DIR, device="cpu")
    build_stage = lambda: run_stages(plan_stages(config)[:1], config.out)  # noqa: E731

    user_folder = config.out / "victim"
    user_folder.mkdir(parents=True)
    (user_folder / "thesis.txt").write_text("years of work")
    one_line_error(build_stage, "was not written by moelab run")
    assert (user_folder / "thesis.txt").read_text() == "years of work"

    (user_folder / "thesis.txt").unlink()
    user_folder.rmdir()
    assert build_stage()[0].status == "ran" and (user_folder / RUN_MARKER).is_file()
    recipe.write_text(recipe.read_text() + "seed: 1\n")  # a new model: run replaces the folder it made
    assert build_stage()[0].status == "ran" and (user_folder / RUN_MARKER).is_file()
    assert not [p for p in config.out.iterdir() if p.name.startswith(".victim")]

    # A model folder of `moelab build` is not run's to replace either.
    build(recipe, tmp_path / "built")
    recipe.write_text(recipe.read_text() + "density: 0.5\n")
    user_folder.rename(tmp_path / "run-made")
    (tmp_path / "built").rename(user_folder)
    before = contents(user_folder)
    one_line_error(build_stage, "was not written by moelab run")
    assert contents(user_folder) == before


def test_a_recipe_file_name_that_is_no_folder_name_needs_a_name_field(tmp_path):
    recipe = write_recipe(tmp_path, "...yaml", base_model="a", gate_mode="random", experts=[{"source_model": "a"}])
    config = RunConfig(recipe, tmp_path / "out", ["bigbench_navigate"], 1, DEMO_DATA_DIR)
    one_line_error(lambda: plan_stages(config), "add a `name:`")


# ---------------------------------------------------------------- 2. --force never deletes a source


@pytest.mark.parametrize("relation", ["is the base", "contains the experts", "inside the base", "links to an expert",
                                      "contains the recipe"])
def test_an_output_folder_that_overlaps_a_source_is_refused_even_with_force(tmp_path, tiny_dense, relation):
    a, b = tiny_dense("models/a"), tiny_dense("models/b", seed=1)
    (tmp_path / "recipes").mkdir()
    recipe = random_recipe(tmp_path / "recipes", a, b)
    (tmp_path / "link").symlink_to(b)
    out = {"is the base": a, "contains the experts": tmp_path / "models", "inside the base": a / "moe",
           "links to an expert": tmp_path / "link", "contains the recipe": tmp_path / "recipes"}[relation]
    before = contents(tmp_path)
    one_line_error(lambda: build(recipe, out, BuildOptions(force=True, show_progress=False)), "output folder")
    assert contents(tmp_path) == before


def test_an_output_folder_holding_the_converted_lora_cache_is_refused(tmp_path, tiny_dense, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_dense("base")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                   LoraConfig(r=2, target_modules=["down_proj"])).save_pretrained(tmp_path / "adapter")
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    recipe = write_recipe(tmp_path, base_model=str(base), gate_mode="random",
                          experts=[{"source_model": str(base)}, {"source_model": f"{base}+{tmp_path / 'adapter'}"}])
    (tmp_path / "cache").mkdir()
    one_line_error(lambda: build(recipe, tmp_path / "cache", BuildOptions(force=True, show_progress=False)),
                   "contains expert 1")
    assert any((tmp_path / "cache" / "lora").iterdir())


# ---------------------------------------------------------------- 5. no broken output with exit 0


def rewrite_tensor(model: Path, name: str, make) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model / "model.safetensors")
    tensors[name] = make(tensors[name])
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("damage, fragment", [
    (lambda t: t[:7, :7].clone(), "has shape [7, 7] but its config plans [128, 64]"),
    (lambda t: t.to(__import__("torch").int8), "is I8, not a float type"),
])
def test_source_tensors_of_the_wrong_shape_or_dtype_are_refused_before_writing(tmp_path, tiny_dense, damage, fragment):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    rewrite_tensor(b, "model.layers.1.mlp.gate_proj.weight", damage)
    one_line_error(lambda: build(random_recipe(tmp_path, a, b), tmp_path / "out"),
                   "model.layers.1.mlp.gate_proj.weight", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "r.yaml"]


@pytest.mark.parametrize("field, value", [
    ("noise_scale", ".nan"), ("residual_scale", ".inf"), ("weight", ".nan"), ("noise_scale", "-0.1"),
    ("density", ".nan"), ("router_training", "{lr: .inf}"), ("router_training", "{balance: .nan}"),
    ("router_training", "{holdout: -.inf}"), ("seed", "-1"), ("seed", "123456789012345678901234567890"),
    ("router_training", "{steps: 10000000000}"),
])
def test_recipe_numbers_must_be_finite_and_in_range(tmp_path, field, value):
    on_expert = field in ("noise_scale", "residual_scale", "weight")
    text = (f"base_model: a\ngate_mode: random\n{'' if on_expert else f'{field}: {value}'}\nexperts:\n"
            f"  - {{source_model: a{f', {field}: {value}' if on_expert else ''}}}\n  - {{source_model: b}}\n")
    (tmp_path / "r.yaml").write_text(text)
    one_line_error(lambda: load_recipe(tmp_path / "r.yaml"), field)


# ---------------------------------------------------------------- 6. debris, signals and concurrent builds


@pytest.fixture(scope="module")
def slow_build(tmp_path_factory, tiny_tokenizer_dir):
    """A recipe whose build takes a second or more on top of the imports: a hidden-state pass, then about 6 MB of
    noisy expert weights in shards of 1 MB, so that a signal can land before and during writing."""
    from conftest import make_tiny_dense

    root = tmp_path_factory.mktemp("slow")
    size = dict(intermediate_size=1024, num_hidden_layers=4)
    a = make_tiny_dense(root / "a", "llama", 0, tiny_tokenizer_dir, **size)
    b = make_tiny_dense(root / "b", "llama", 1, tiny_tokenizer_dir, **size)
    experts = [{"source_model": str(m), "name": f"e{i}", "noise_scale": 0.01, "positive_prompts": [f"topic {i}"]}
               for i, m in enumerate([a, b, a, b])]
    return write_recipe(root, base_model=str(a), experts=experts)


def start_build(recipe: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moelab", "build", str(recipe), str(out), "--shard-size", "1MB",
                             "--device", "cpu"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def temp_folders(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]


MOMENTS = {
    "holding the lock": lambda out: lock_path(out).exists() and lock_path(out).stat().st_size > 0,  # pid written
    "writing": lambda out: any(temp_folders(out)),
    "after a shard": lambda out: any(f.name.startswith("model-") for t in temp_folders(out) for f in t.iterdir()),
}


def wait_for(moment: str, out: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if MOMENTS[moment](out):
                return
        except FileNotFoundError:  # a folder vanished while being listed
            pass
        assert process.poll() is None, f"the build ended before {moment}: {process.stderr.read()}"
        time.sleep(0.002)
    raise AssertionError(f"no {moment} within {timeout_s} s")


@pytest.mark.parametrize("signum, moment", [
    (signal.SIGTERM, "holding the lock"), (signal.SIGTERM, "writing"), (signal.SIGHUP, "after a shard"),
    (signal.SIGKILL, "after a shard"),
])
def test_a_killed_build_leaves_nothing_a_rerun_does_not_clean(tmp_path, slow_build, signum, moment):
    out = tmp_path / "outs" / "moe"
    out.parent.mkdir()
    process = start_build(slow_build, out)
    wait_for(moment, out, process)
    process.send_signal(signum)
    process.wait(timeout=60)
    assert not out.exists()
    if signum == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL and (moment == "holding the lock" or temp_folders(out))
    else:  # unwound like Ctrl-C: the temporary folder and the lock are gone at once
        assert process.returncode == 128 + signum, process.stderr.read()
        assert list(out.parent.iterdir()) == []
    build(slow_build, out, BuildOptions(shard_bytes=10**6, device="cpu", show_progress=False))
    assert [p.name for p in out.parent.iterdir()] == ["moe"]
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]


def test_a_rerun_puts_back_an_output_a_kill_left_between_its_two_renames(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    recipe, out = random_recipe(tmp_path, a, b), tmp_path / "outs" / "moe"
    build(recipe, out)
    before = contents(out)
    out.rename(out.with_name(".moe.old-abcd1234"))  # where _replace had put it when the kill came
    one_line_error(lambda: build(recipe, out), "already exists")
    assert contents(out) == before and [p.name for p in out.parent.iterdir()] == ["moe"]
    (out.parent / ".moe.tmp-zz99zz99").mkdir()  # a kill right after the temporary folder was made
    (out.parent / ".moe.tmp-not-ours").mkdir()  # not a name moelab makes: kept
    (out.parent / ".moe.tmp-zz99zz99.keep").write_text("x")
    build(recipe, out, BuildOptions(force=True, show_progress=False))
    assert sorted(p.name for p in out.parent.iterdir()) == [".moe.tmp-not-ours", ".moe.tmp-zz99zz99.keep", "moe"]


def test_two_builds_to_one_output_folder_cannot_both_succeed(tmp_path, slow_build):
    out = tmp_path / "moe"
    first = start_build(slow_build, out)
    wait_for("holding the lock", out, first)
    one_line_error(lambda: build(slow_build, out, BuildOptions(force=True, show_progress=False)),
                   "another build is writing", str(first.pid))
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert (out / "config.json").is_file() and not lock_path(out).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["moe"]


# ---------------------------------------------------------------- 7. one-line errors, no tracebacks


def test_a_recipe_that_is_not_utf8_or_nested_too_deeply_gets_a_one_line_error(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("base_model: caf\xe9\nexperts: []\n".encode("latin-1"))
    assert_cli_error(moelab_cli("build", tmp_path / "latin1.yaml", tmp_path / "out"), "is not UTF-8")
    (tmp_path / "deep.yaml").write_text("[" * 3000 + "]" * 3000)
    one_line_error(lambda: load_recipe(tmp_path / "deep.yaml"), "nested too deeply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep.yaml", "latin1.yaml"]


def header_bytes(header) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded


DAMAGED_FILES = {
    "config.json is a list": ("config.json", b"[1, 2, 3]", "is a JSON list"),
    "config.json is garbage": ("config.json", b"\xff\xfe{{{", "cannot read config.json"),
    "config.json has no sizes": ("config.json", b'{"model_type": "llama"}', "hidden_size=None"),
    "config.json has 10^10 layers": ("config.json", b'{"model_type": "llama", "hidden_size": 64, '
                                                    b'"num_hidden_layers": 10000000000}', "num_hidden_layers=1000"),
    "safetensors is garbage": ("model.safetensors", os.urandom(64), "cannot read safetensors"),
    "safetensors header is huge": ("model.safetensors", struct.pack("<Q", 2**63) + b"{}", "larger than the file"),
    "safetensors header is a list": ("model.safetensors", header_bytes([1]), "not an object"),
    "safetensors offsets past the end": ("model.safetensors", header_bytes(
        {"lm_head.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}), "does not fit"),
    "safetensors unknown dtype": ("model.safetensors", header_bytes(
        {"lm_head.weight": {"dtype": "Q4", "shape": [0], "data_offsets": [0, 0]}}), "unsupported entry"),
    "index is broken": ("model.safetensors.index.json", b'{"weight_map": ', "the index is damaged"),
    "index leaves the folder": ("model.safetensors.index.json", b'{"weight_map": {"x": "../../etc/passwd"}}',
                                "shard file names in the same folder"),
}


@pytest.mark.parametrize("case", DAMAGED_FILES)
def test_damaged_model_files_get_a_one_line_error(tmp_path, tiny_dense, case):
    file_name, data, fragment = DAMAGED_FILES[case]
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    (b / file_name).write_bytes(data)
    one_line_error(lambda: build(random_recipe(tmp_path, a, b), tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()


def test_an_index_that_puts_a_tensor_in_a_shard_without_it_gets_a_one_line_error(tiny_dense):
    from moelab.build.tensors import SafetensorsFolder

    model = tiny_dense("a")
    (model / "model.safetensors.index.json").write_text('{"weight_map": {"x.weight": "model.safetensors"}}')
    one_line_error(lambda: SafetensorsFolder(model).info("x.weight"), "x.weight", "does not hold it")


@pytest.mark.parametrize("key, value", [("hidden_act", "no-such-activation"), ("rms_norm_eps", "tiny"),
                                        ("rope_scaling", {"rope_type": "no-such-rope"})])
@pytest.mark.parametrize("gate_mode", ["random", "hidden"])  # hidden: refused before the pass makes its base model
def test_a_base_config_that_transformers_rejects_is_refused_before_writing(tmp_path, tiny_dense, key, value,
                                                                           gate_mode):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, key: value}))
    experts = [{"source_model": str(m), "name": n, "positive_prompts": [f"about {n}"]} for m, n in ((a, "a"), (b, "b"))]
    recipe = random_recipe(tmp_path, a, b, gate_mode=gate_mode, experts=experts)
    one_line_error(lambda: build(recipe, tmp_path / "out"), "values transformers rejects")
    assert not (tmp_path / "out").exists()


def test_a_garbage_gguf_gets_a_one_line_error(tmp_path, tiny_dense, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    a = tiny_dense("a")
    for name, data in [("random.gguf", os.urandom(256)), ("truncated.gguf", b"GGUF\x03\x00\x00\x00\x01")]:
        (tmp_path / name).write_bytes(data)
        one_line_error(lambda: build(random_recipe(tmp_path, a, tmp_path / name), tmp_path / "out"),
                       "cannot read", "as a GGUF model")
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("data, fragment", [
    (b"", "is empty"), (b'{"text": null}\n{"text": "x"}\n', "line 1 has no text"),
    (b"\xff\xfe\x00bad\n", "not UTF-8"), (b'[1, 2]\n{"text": "x"}\n', "line 1 is not JSON, or not an object"),
    (b'{"text": "only one"}\n', "1 example(s)"), (b"{not json\n", "line 1 is not JSON"),
])
def test_malformed_router_data_is_refused_before_the_hidden_state_pass(tmp_path, tiny_dense, data, fragment):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    (tmp_path / "math.jsonl").write_bytes(data)
    recipe = write_recipe(tmp_path, base_model=str(a), gate_mode="trained", experts=[
        {"source_model": str(a), "name": "chat", "positive_prompts": ["hi", "hello"]},
        {"source_model": str(b), "name": "math", "positive_prompts": ["2+2"], "router_data": "math.jsonl"}])
    # --device cuda on a machine without one fails in the hidden-state pass: this error comes first.
    one_line_error(lambda: build(recipe, tmp_path / "out", BuildOptions(device="cuda", show_progress=False)),
                   "math.jsonl", fragment)


def test_gate_mode_trained_without_router_data_needs_two_examples(tmp_path):
    recipe = write_recipe(tmp_path, base_model="a", gate_mode="trained",
                          experts=[{"source_model": "a", "positive_prompts": ["x"]},
                                   {"source_model": "b", "positive_prompts": ["y", "z"]}])
    one_line_error(lambda: load_recipe(recipe), "expert 0 (E0) has no router_data and 1 positive prompt(s)")


def test_out_of_range_build_numbers_get_a_one_line_error(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    recipe = random_recipe(tmp_path, a, b)
    assert_cli_error(moelab_cli("build", recipe, tmp_path / "out", "--shard-size", "inf"), "cannot read size 'inf'")
    for options in [BuildOptions(seed=2**70), BuildOptions(seed=-3), BuildOptions(shard_bytes=0)]:
        one_line_error(lambda: build(recipe, tmp_path / "out", options), "out of range" if options.seed else "shard")
    config = RunConfig(recipe, tmp_path / "run", ["bigbench_navigate"], 0, DEMO_DATA_DIR)
    one_line_error(lambda: plan_stages(config), "--limit 0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "r.yaml"]


# ---------------------------------------------------------------- 10. the card, and an unwritable output folder


def test_a_huge_recipe_is_linked_from_the_card_not_copied(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    recipe = random_recipe(tmp_path, a, b)
    recipe.write_text(recipe.read_text() + "".join(f"# padding line {i:06d} of a hostile recipe\n"
                                                   for i in range(3000)))
    out = tmp_path / "out"
    build(recipe, out)
    card = (out / "README.md").read_text()
    assert len(card) < 10_000 and "[moelab_recipe.yaml](moelab_recipe.yaml)" in card
    assert (out / "moelab_recipe.yaml").read_text() == recipe.read_text()


def test_a_source_path_with_a_pipe_and_backticks_stays_in_its_table_cell(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("odd|na`me", seed=1)
    out = tmp_path / "out"
    build(random_recipe(tmp_path, a, b), out)
    card = (out / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| b |"))
    assert row.replace("\\|", "").count("|") == 5 and "odd\\|na`me" in row


def test_an_unwritable_output_folder_is_found_before_the_hidden_state_pass(tmp_path, tiny_dense):
    a, b = tiny_dense("a"), tiny_dense("b", seed=1)
    recipe = write_recipe(tmp_path, base_model=str(a), experts=[{"source_model": str(a), "positive_prompts": ["x"]},
                                                                {"source_model": str(b), "positive_prompts": ["y"]}])
    (tmp_path / "a-file").write_text("not a folder")
    # --device cuda on a machine without one fails in the hidden-state pass: this error comes first.
    cuda = BuildOptions(device="cuda", show_progress=False)
    one_line_error(lambda: build(recipe, tmp_path / "a-file" / "out", cuda), "cannot write the output folder")
    if os.geteuid() != 0:  # root writes into read-only folders
        (tmp_path / "ro").mkdir(mode=0o555)
        one_line_error(lambda: build(recipe, tmp_path / "ro" / "out", cuda), "Permission denied")
