"""Atomic outputs keep the permissions that plain new files and folders get."""

import os

from moelab.eval.report import write_text_atomic
from moelab.files import temp_dir_beside


def test_atomic_outputs_have_plain_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "report.json", "{}\n")
        folder = temp_dir_beside(tmp_path / "model")
        assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
        assert folder.stat().st_mode & 0o777 == 0o755
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report")] == []
    finally:
        os.umask(umask)
