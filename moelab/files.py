"""Outputs are written whole or not at all: temporary files and folders beside the target, renamed into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_file_beside(path: Path, suffix: str = ".tmp") -> Path:
    """An empty temporary file in `path`'s folder, with the permissions a plain new file gets (mkstemp gives 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def temp_dir_beside(path: Path, prefix: str | None = None) -> Path:
    """A temporary folder in `path`'s folder, with the permissions a plain new folder gets (mkdtemp gives 0700)."""
    tmp = tempfile.mkdtemp(prefix=prefix or f".{path.name}.tmp-", dir=path.parent)
    os.chmod(tmp, 0o777 & ~_umask())
    return Path(tmp)


def read_user_text(path: Path, what: str) -> str:
    """The UTF-8 text of a file the user named; a MoelabError saying which `what` cannot be read, and why."""
    from moelab.errors import MoelabError

    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise MoelabError(f"cannot read {what} {path} ({err.strerror or type(err).__name__}); check the path") \
            from None
    except UnicodeDecodeError as err:
        raise MoelabError(f"{what} {path} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None


def json_lines(text: str, path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL text; a MoelabError for a line that is not a JSON
    object, or for a text without any."""
    import json

    from moelab.errors import MoelabError

    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if not isinstance(row, dict):
            raise MoelabError(f"{path} line {number} is not JSON, or not an object; {what} is one JSON object per "
                              "line")
        rows.append((number, row))
    if not rows:
        raise MoelabError(f"{path} is empty; {what} is one JSON object per line")
    return rows
