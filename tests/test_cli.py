"""The click group: version, help, exit codes and the OpenMP wait policy."""

from __future__ import annotations

import os

from microct_sr import __version__


def test_version_and_help(run_cli):
    r = run_cli("--version")
    assert r.exit_code == 0 and __version__ in r.stdout
    r = run_cli("--help")
    assert r.exit_code == 0
    for name in ("info", "upscale", "simulate", "phantom", "pair", "evaluate", "train"):
        assert name in r.stdout


def test_unknown_command_and_option_exit_2(run_cli):
    assert run_cli("upscal").exit_code == 2
    assert run_cli("info", "--no-such-option", "x").exit_code == 2


def test_openmp_waits_passively_unless_the_user_says_otherwise(run_cli, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    run_cli("--version")
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    run_cli("--version")
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
