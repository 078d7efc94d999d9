"""Shared test fixtures: the real shared data folder and an in-process CLI runner."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository root; skips with a reason when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA} (only present on the dev machine)")
    return SHARED_DATA


@dataclass
class CliResult:
    """Exit code and captured streams of one ``microct-sr`` invocation."""

    exit_code: int
    stdout: str
    stderr: str


def invoke_cli(*args: str | Path) -> CliResult:
    """Run ``microct_sr.cli.main`` in-process with ``args``; capture exit code, stdout, stderr."""
    import logging

    from microct_sr.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    old_handlers, old_level = root.handlers[:], root.level
    root.handlers = []  # let the CLI's basicConfig attach a handler to our captured stderr
    code: int | str | None = 0
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as e:
                code = e.code
    finally:
        for h in root.handlers:
            if h not in old_handlers:
                h.close()
        root.handlers, root.level = old_handlers, old_level
    if code is None:
        code = 0
    elif not isinstance(code, int):
        err.write(str(code))
        code = 1
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli():
    """``run_cli("info", path, "--json")`` -> :class:`CliResult` (exit_code, stdout, stderr)."""
    return invoke_cli


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests run on one torch thread: on a shared 2-core machine OpenMP threads that spin on
    busy cores made tiny-network steps up to 30x slower; results do not depend on it."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
