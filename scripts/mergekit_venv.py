"""A separate virtualenv holding mergekit-moe 0.1.5 from PyPI, for benchmarks that run it beside moelab.

The venv sees this interpreter's site-packages (torch, transformers), so only mergekit and its few extra
dependencies are installed; it is made once and reused (`.venv-mergekit/` in the repo root, or $MERGEKIT_VENV).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MERGEKIT_VERSION = "0.1.5"
REPO = Path(__file__).resolve().parents[1]


def mergekit_moe_command() -> list[str]:
    """The command line of mergekit-moe in its venv, creating the venv first if needed."""
    venv = Path(os.environ.get("MERGEKIT_VENV", REPO / ".venv-mergekit"))
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    probe = subprocess.run([str(python), "-c", "import mergekit, importlib.metadata as m; print(m.version('mergekit'))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() != MERGEKIT_VERSION:
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return [str(venv / "bin" / "mergekit-moe")]


if __name__ == "__main__":
    print(" ".join(mergekit_moe_command()))
