"""How a RunPod pod gets moelab: this very moelab as a wheel through the run's secret Gist, or a checked --install.

moelab is not on PyPI, so by default the local side builds a wheel of its own source (cached by content hash),
and sends it base64-encoded as one file of the run's Gist; the pod's start command runs `moelab/eval/bootstrap.py`
(stdlib only), which reads that file, pip-installs it with the eval extra and starts the pod entry. The demo's
LoRA experts (19 MB) stay out of that wheel: the pod evaluates a Hub model and never builds the demo.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

from moelab import __version__
from moelab.errors import MoelabError

WHEEL_SUFFIX = ".whl.b64"  # the Gist file holding the wheel; the pod's bootstrap and post_report know it
POD_ENV_INSTALL = "MOELAB_INSTALL"  # --install's pip argument, when given
POD_ENV_WHEEL = "MOELAB_WHEEL_FILE"  # else the Gist file of the wheel
LEFT_OUT_OF_POD_WHEEL = ("data/experts",)  # relative to the package folder
# A pip requirement, URL or path as one argument: no blanks, quotes or shell characters, whatever runs it.
UNSAFE_INSTALL = re.compile(r"[\s'\"`$;&|<>\\(){}*?!#~]")
URL_SCHEMES = ("https://", "http://", "git+https://", "git+ssh://", "file://")


def check_install(spec: str) -> str:
    """--install as the pod's pip receives it: a requirement (moelab[eval]==0.1.0), a URL, or an absolute path."""
    if not spec or UNSAFE_INSTALL.search(spec):
        raise MoelabError(f"--install '{spec}' is not one pip argument; give a requirement such as "
                          "moelab[eval]==0.1.0, a URL (https://..., git+https://...) or an absolute path on the pod")
    if spec.startswith(URL_SCHEMES) or spec.startswith("/"):
        return spec
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        Requirement(spec)
    except InvalidRequirement as err:
        raise MoelabError(f"--install '{spec}' is not a pip requirement ({str(err).splitlines()[0]}); give e.g. "
                          "moelab[eval]==0.1.0, "
                          "a URL or an absolute path on the pod") from None
    return spec


def wheel_file_name() -> str:
    return f"moelab-{__version__}-py3-none-any{WHEEL_SUFFIX}"


def source_tree() -> Path:
    """The folder holding pyproject.toml and moelab/ that this moelab runs from (a checkout, editable install)."""
    root = Path(__file__).resolve().parents[2]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "moelab"' not in pyproject.read_text():
        raise MoelabError("this moelab is not running from its source tree, so it cannot send itself to the pod; "
                          "pass --install with a pip requirement, URL or path the pod can install moelab from")
    return root


def _pod_files(root: Path) -> list[Path]:
    package = root / "moelab"
    left_out = [package / part for part in LEFT_OUT_OF_POD_WHEEL]
    return [root / "pyproject.toml", root / "README.md"] + sorted(
        f for f in package.rglob("*") if f.is_file() and "__pycache__" not in f.parts
        and not any(f.is_relative_to(folder) for folder in left_out))


def own_wheel() -> Path:
    """A wheel of this moelab's source for the pod, built once per content (pip wheel, no network)."""
    from moelab.build.sources import cache_dir
    from moelab.files import temp_dir_beside

    root = source_tree()
    files = _pod_files(root)
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    target = cache_dir() / "wheels" / digest.hexdigest()[:16]
    built = sorted(target.glob("moelab-*.whl"))
    if built:
        return built[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    work = temp_dir_beside(target, prefix=".tmp-")
    try:
        for file in files:  # a copy without the left-out data, so the build also leaves the checkout untouched
            copy = work / "src" / file.relative_to(root)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, copy)
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                               "-w", str(work / "dist"), str(work / "src")], capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MoelabError(f"cannot build moelab's wheel for the pod (pip wheel: {last}); pass --install with "
                              "a pip requirement, URL or path the pod can install moelab from")
        (work / "dist").rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return next(target.glob("moelab-*.whl"))


def wheel_as_text(wheel: Path) -> str:
    return base64.b64encode(wheel.read_bytes()).decode()


def bootstrap_source() -> str:
    """The pod's first program (it runs before moelab is installed)."""
    return (Path(__file__).parent / "bootstrap.py").read_text()
