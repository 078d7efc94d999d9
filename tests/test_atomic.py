"""atomic_write: all or nothing under the final name, with the usual file permissions."""

from __future__ import annotations

import os

import pytest

from microct_sr.atomic import atomic_write


def test_writes_with_umask_permissions_not_private(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "model.pt", lambda p: p.write_bytes(b"weights"))
    finally:
        os.umask(old)
    assert path.read_bytes() == b"weights"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.md"
    target.write_text("old")

    def broken(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
