"""Model references: Hub repo ids through the local Hugging Face cache (offline), GGUF files, packages, LoRA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from moelab.build.sources import resolve_data_path, resolve_model
from moelab.errors import MoelabError


def put_in_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay `model_dir` out as huggingface_hub's cache does for a downloaded snapshot of `repo_id`."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_hub_repo_id_resolves_from_the_offline_cache(tmp_path, tiny_dense, monkeypatch):
    dense = tiny_dense("dense")
    cache = tmp_path / "hub"
    snapshot = put_in_hub_cache(cache, "moelab-tests/tiny-llama", dense)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("moelab-tests/tiny-llama").resolve() == snapshot.resolve()
    with pytest.raises(MoelabError, match="not in the Hugging Face cache"):
        resolve_model("moelab-tests/not-downloaded")


def test_paths_packages_and_errors(tmp_path, tiny_dense):
    dense = tiny_dense("dense")
    assert resolve_model("dense", base_dir=dense.parent) == dense
    assert resolve_data_path("pkg:moelab/data/router/math.jsonl").is_file()
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(MoelabError, match="needs the Python package 'no_such_pkg'"):
        resolve_model("pkg:no_such_pkg/model.gguf")
    with pytest.raises(MoelabError, match="no adapter_config.json"):
        resolve_model(f"{dense}+{tmp_path / 'empty'}")
    with pytest.raises(MoelabError, match="not found"):
        resolve_model("./missing-folder")
