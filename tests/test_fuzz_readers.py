"""Every reader of user files, fed generated garbage and mutations of valid files through the real CLI entry.

A mutation may still be valid (exit 0); anything else must be moelab's one-line error: exit 2, the last stderr
line `error: ...`, no traceback, and nothing new at or beside the output path.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_hostile_io import run_moelab

SHIPPED_DATA = Path(__file__).resolve().parents[1] / "moelab" / "data"
FUZZ = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
FUZZ_MODELS = settings(FUZZ, max_examples=10)  # each valid mutation builds a tiny MoE (about a second)


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def assert_one_line_error_or_success(args: list[str], output: Path) -> None:
    before = listing(output.parent)
    code, _, err = run_moelab(*args)
    assert code in (0, 2), f"exit {code} for {args}:\n{err}"
    assert "Traceback" not in err, err
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: "), err
        assert sum(line.startswith("error: ") for line in lines) == 1, err
        assert listing(output.parent) == before, f"{args} left files behind:\n{err}"


# --- garbage and mutations -------------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.sampled_from([math.nan, math.inf, -math.inf, -1.0])
    | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def nodes(value, path=()):
    yield path
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield from nodes(child, (*path, key))


def replaced(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = replaced(value[path[0]], path[1:], new)
    return copy


@st.composite
def structured_mutation(draw, document):
    """`document` with one node (a field, a list item, the whole) replaced, removed or given a wrong value."""
    paths = list(nodes(document))
    path = draw(st.sampled_from(paths))
    if path and draw(st.booleans()):
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        trimmed = dict(parent) if isinstance(parent, dict) else list(parent)
        del trimmed[path[-1]]
        return replaced(document, path[:-1], trimmed)
    return replaced(document, path, draw(JSON_VALUES))


@st.composite
def byte_mutation(draw, data: bytes):
    """`data` truncated, with bytes flipped, inserted or deleted (non-UTF-8 bytes included)."""
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:] if data else b"\xff"
    if kind == "insert":
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    return data[:at] + data[at + draw(st.integers(1, 64)):]


def file_variants(valid: bytes, dump: Callable | None = None, load: Callable | None = None):
    """Garbage, byte mutations of `valid`, and (for JSON/YAML) structural mutations of its parsed document."""
    choices = [st.binary(max_size=200), byte_mutation(valid)]
    if dump is not None:
        choices.append(structured_mutation(load(valid)).map(dump))
    return st.one_of(choices)


def json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def yaml_bytes(value) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True).encode()


def jsonl_bytes(rows) -> bytes:
    rows = rows if isinstance(rows, list) else [rows]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def jsonl_rows(data: bytes) -> list:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


# --- the workspace: valid inputs for every reader ---------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_moe_dir) -> Path:
    from test_compare import CODE, MATH, MOE

    root = tmp_path_factory.mktemp("fuzz")
    for report in (MOE, MATH, CODE):
        report.save(root / f"{report.model_name}.json")
    shutil.copy(Path(__file__).parent / "fixtures" / "gists" / "SmolLM2-MoE-2x135M-Nous.md", root / "gist-Nous.md")
    (root / "probe.json").write_text(json.dumps({"expert_names": ["moe", "math", "code"][1:],
                                                 "accuracy_per_expert": {"math": 0.5, "code": 0.25},
                                                 "usage": {"math": 0.6, "code": 0.4}}))
    shutil.copy(Path(__file__).parent / "fixtures" / "probe" / "tiny.yaml", root / "prompts.yaml")
    (root / "data" / "bigbench").mkdir(parents=True)
    shutil.copy(SHIPPED_DATA / "bigbench" / "navigate.jsonl", root / "data" / "bigbench" / "navigate.jsonl")
    (root / "arith.jsonl").write_bytes(b"".join((SHIPPED_DATA / "heldout" / "arith.jsonl").read_bytes()
                                                .splitlines(keepends=True)[:5]))
    (root / "tasks.yaml").write_text(yaml.safe_dump({"math": {"path": "arith.jsonl", "kind": "exact_match"}}))
    sources = tiny_moe_dir.parent  # the dense models a and b the tiny MoE was built from
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "fuzz", "base_model": str(sources / "a"), "gate_mode": "random",
        "experts": [{"source_model": str(sources / "a"), "name": "math"},
                    {"source_model": str(sources / "b"), "name": "code"}]}))
    shutil.copytree(sources / "a", root / "dense")
    shutil.copytree(tiny_moe_dir, root / "moe")
    return root


@dataclass
class Reader:
    """A user file some command reads: where the variant goes, and the command that reads it."""
    file: str  # path in the example's folder
    valid: Callable[[Path], bytes]  # from the workspace
    command: Callable[[Path, Path], list[str]]  # (workspace, example folder) -> arguments
    output: str  # what the command would write, in the example folder
    dump: Callable | None = None
    load: Callable | None = None
    examples: int = FUZZ.max_examples


PLOTTED = 12  # fewer examples where a mutation that stays valid draws a plot (a third of a second)


def _report(ws):
    return (ws / "moe.json").read_bytes()


READERS = {
    "compare report": Reader("moe.json", _report, lambda ws, ex: [
        "compare", str(ex / "moe.json"), str(ws / "math.json"), "--out", str(ex / "out")], "out",
        json_bytes, json.loads, PLOTTED),
    "leaderboard report": Reader("moe.json", _report, lambda ws, ex: [
        "leaderboard", str(ex / "moe.json"), "--out", str(ex / "out")], "out", json_bytes, json.loads, PLOTTED),
    "publish --gist report": Reader("moe.json", _report, lambda ws, ex: [
        "publish", "--gist", str(ex / "moe.json"), "--dry-run"], "moe.json.unused", json_bytes, json.loads),
    "publish --report": Reader("moe.json", _report, lambda ws, ex: [
        "publish", str(ws / "moe"), "--repo", "moelab-test/m", "--report", str(ex / "moe.json"), "--dry-run"],
        "unused", json_bytes, json.loads),
    "chat probe prompts": Reader("prompts.yaml", lambda ws: (ws / "prompts.yaml").read_bytes(), lambda ws, ex: [
        "chat", str(ws / "moe"), "--probe", str(ex / "prompts.yaml"), "--device", "cpu"], "unused",
        yaml_bytes, yaml.safe_load),
    "gist": Reader("m-Nous.md", lambda ws: (ws / "gist-Nous.md").read_bytes(), lambda ws, ex: [
        "leaderboard", str(ex / "m-Nous.md"), "--out", str(ex / "out")], "out", examples=PLOTTED),
    "compare probe json": Reader("probe.json", lambda ws: (ws / "probe.json").read_bytes(), lambda ws, ex: [
        "compare", str(ws / "moe.json"), str(ws / "math.json"), str(ws / "code.json"), "--probe",
        str(ex / "probe.json"), "--out", str(ex / "out")], "out", json_bytes, json.loads, PLOTTED),
    "bigbench data": Reader("data/bigbench/navigate.jsonl",
                            lambda ws: b"".join((ws / "data/bigbench/navigate.jsonl").read_bytes()
                                                .splitlines(keepends=True)[:3]),
                            # a valid file gets to the --batch-size check, so no model is ever loaded
                            lambda ws, ex: ["eval", str(ws / "dense"), "--tasks", "bigbench_navigate", "--data-dir",
                                            str(ex / "data"), "--batch-size", "0", "--output", str(ex / "r.json")],
                            "r.json", jsonl_bytes, jsonl_rows),
    "domain data": Reader("arith.jsonl", lambda ws: (ws / "arith.jsonl").read_bytes(), lambda ws, ex: [
        "eval", str(ws / "dense"), "--tasks", str(ex / "tasks.yaml"), "--batch-size", "0",
        "--output", str(ex / "r.json")], "r.json", jsonl_bytes, jsonl_rows),
    "domain tasks file": Reader("tasks.yaml", lambda ws: (ws / "tasks.yaml").read_bytes(), lambda ws, ex: [
        "eval", str(ws / "dense"), "--tasks", str(ex / "tasks.yaml"), "--batch-size", "0",
        "--output", str(ex / "r.json")], "r.json", yaml_bytes, yaml.safe_load),
    "recipe": Reader("recipe.yaml", lambda ws: (ws / "recipe.yaml").read_bytes(), lambda ws, ex: [
        "build", str(ex / "recipe.yaml"), str(ex / "out")], "out", yaml_bytes, yaml.safe_load),
}

MODEL_FILES = {
    "config.json": (json_bytes, json.loads),
    "model.safetensors": (None, None),
    "tokenizer_config.json": (json_bytes, json.loads),
}


def example_folder(ws: Path) -> Path:
    folder = Path(tempfile.mkdtemp(dir=ws, prefix="example-"))
    shutil.copy(ws / "arith.jsonl", folder / "arith.jsonl")
    shutil.copy(ws / "tasks.yaml", folder / "tasks.yaml")
    shutil.copytree(ws / "data", folder / "data")
    return folder


@pytest.mark.parametrize("name", list(READERS))
def test_a_damaged_file_is_a_one_line_error(name, workspace, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(workspace / "cache"))
    reader = READERS[name]

    @settings(FUZZ, max_examples=reader.examples)
    @given(variant=file_variants(reader.valid(workspace), reader.dump, reader.load))
    def reads_cleanly(variant: bytes) -> None:
        example = example_folder(workspace)
        try:
            (example / reader.file).write_bytes(variant)
            assert_one_line_error_or_success(reader.command(workspace, example), example / reader.output)
        finally:
            shutil.rmtree(example)

    reads_cleanly()


@pytest.mark.parametrize("name", list(MODEL_FILES))
@FUZZ_MODELS
@given(data=st.data())
def test_a_damaged_model_folder_is_a_one_line_error(name, data, workspace, monkeypatch):
    """A source model with one damaged file, built into a MoE through a recipe."""
    monkeypatch.setenv("MOELAB_CACHE", str(workspace / "cache"))
    dump, load = MODEL_FILES[name]
    valid = (workspace / "dense" / name).read_bytes()
    if name == "model.safetensors":  # the header is what a reader parses; mutate there
        header_end = 8 + int.from_bytes(valid[:8], "little")
        variant = data.draw(st.one_of(st.binary(max_size=200),
                                      byte_mutation(valid[:header_end]).map(lambda h: h + valid[header_end:]),
                                      st.integers(0, 2**64 - 1).map(lambda n: n.to_bytes(8, "little")
                                                                    + valid[8:])), label="file")
    else:
        variant = data.draw(file_variants(valid, dump, load), label="file")

    def damaged_copy(example: Path) -> None:
        shutil.copytree(workspace / "dense", example / "dense")
        (example / "dense" / name).write_bytes(variant)

    build_from_damaged_source(workspace, damaged_copy, "dense")


@FUZZ
@given(variant=st.binary(max_size=300) | st.sampled_from([b"GGUF", b"GGUF\x03\x00\x00\x00" + b"\xff" * 24]))
def test_a_garbage_gguf_is_a_one_line_error(variant, workspace, monkeypatch):
    monkeypatch.setenv("MOELAB_CACHE", str(workspace / "cache"))
    build_from_damaged_source(workspace, lambda example: (example / "model.gguf").write_bytes(variant), "model.gguf")


def build_from_damaged_source(workspace: Path, make_source: Callable[[Path], object], source: str) -> None:
    """`moelab build` of a recipe whose base and first expert are SOURCE, made in a fresh example folder."""
    example = example_folder(workspace)
    try:
        make_source(example)
        recipe = yaml.safe_load((workspace / "recipe.yaml").read_text())
        recipe["base_model"] = recipe["experts"][0]["source_model"] = str(example / source)
        (example / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        assert_one_line_error_or_success(["build", str(example / "recipe.yaml"), str(example / "out")],
                                         example / "out")
    finally:
        shutil.rmtree(example)
