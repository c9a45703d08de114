"""Where a build writes: one build per OUT at a time, no debris from killed builds, and OUT kept apart from sources.

A build of OUT writes `.OUT.tmp-XXXXXXXX/` beside it (with BUILD_MARKER inside while it is being written), renames
an existing OUT to `.OUT.old-XXXXXXXX` and the finished folder to OUT, then removes the old one. It holds an
exclusive lock on `.OUT.lock` the whole time, so whatever of those names it finds on start was left by a build that
was killed: it removes them, or puts a replaced OUT back when the kill came between the two renames.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from moelab.errors import MoelabError
from moelab.files import temp_dir_beside

BUILD_MARKER = ".moelab-build"  # inside a temporary build folder while it is written; holds the writer's pid
RANDOM_SUFFIX = r"[a-z0-9_]{8}"  # what tempfile.mkdtemp appends


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the exclusive lock of OUT (creating OUT's parent first); a second build of OUT gets a one-line error.

    The lock file is removed on release while still locked, and a lock taken on a file that was removed meanwhile
    is taken again on the new one, so two builds never both hold the lock.
    """
    path = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise MoelabError(f"another build is writing {out} (pid {holder}); wait for it to finish, or choose "
                                  "another output folder") from None
            if _same_file(fd, path):
                break
            os.close(fd)
    except OSError as err:
        raise MoelabError(f"cannot write the output folder {out}: {err.strerror} ({err.filename}); choose a "
                          "folder you can write to") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if _same_file(fd, path):
            path.unlink()
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def new_build_folder(out: Path) -> Path:
    """The temporary folder a build of OUT writes, marked as one (removed again by `finish_build_folder`)."""
    tmp = temp_dir_beside(out)
    (tmp / BUILD_MARKER).write_text(f"{os.getpid()}\n")
    return tmp


def finish_build_folder(tmp: Path) -> None:
    (tmp / BUILD_MARKER).unlink()


def remove_stale_folders(out: Path) -> list[Path]:
    """Clean what killed builds of OUT left beside it (call with the lock held); returns what was removed.

    Temporary folders count only when they hold BUILD_MARKER or nothing (a kill right after they were made); an OUT
    that was being replaced comes back as OUT when no OUT is there, and is removed otherwise.
    """
    removed = []
    for path in _beside(out, "tmp"):
        if (path / BUILD_MARKER).is_file():
            shutil.rmtree(path)
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:
            continue
        removed.append(path)
    for path in _beside(out, "old"):
        if not out.exists() and not out.is_symlink():
            path.rename(out)
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        removed.append(path)
    return removed


def _beside(out: Path, kind: str) -> list[Path]:
    pattern = re.compile(re.escape(f".{out.name}.{kind}-") + RANDOM_SUFFIX)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def check_replaceable(out: Path, force: bool, owner: Optional[str]) -> None:
    """An existing OUT is replaced only with force, and with `owner` set only when OUT holds that marker file."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise MoelabError(f"{out} already exists; pass --force to replace it, or choose another output folder")
    if owner is not None and not (out / owner).is_file():
        raise MoelabError(f"{out} exists and was not written by moelab run (it has no {owner} marker), which "
                          "replaces only the model folders it made; move it away, or choose another --out")


def check_apart_from_sources(out: Path, sources: Iterable[tuple[str, Path]], kept: Iterable[tuple[str, Path]]) -> None:
    """Refuse an OUT that is, contains or is inside a source (what the build reads), or is or contains a kept path.

    Compared on real paths (symlinks resolved), so a link or a `..` does not hide a source; a replaced OUT is
    deleted, and one inside a source would change that source.
    """
    real_out = Path(os.path.realpath(out))
    for role, path in sources:
        real = Path(os.path.realpath(path))
        if real_out == real or real_out in real.parents or real in real_out.parents:
            where = "is" if real_out == real else "contains" if real_out in real.parents else "is inside"
            raise MoelabError(f"output folder {out} {where} {role} ({path}), which the build reads; choose an output "
                              "folder apart from every source model")
    for role, path in kept:
        real = Path(os.path.realpath(path))
        if real_out == real or real_out in real.parents:
            raise MoelabError(f"output folder {out} {'is' if real_out == real else 'contains'} {role} ({path}); "
                              "choose an output folder that holds none of the build's inputs")
