"""The click group: version, help, exit codes, the OpenMP wait policy, and the shared option
types and output guard of cli/_common.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np
import pytest

from microct_sr import __version__
from microct_sr.cli._common import (
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    FiniteFloat,
    device_problem,
    refuse_output_over_input,
)
from microct_sr.errors import UserError
from microct_sr.volume import write_volume


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


# ---- shared option types and the output-over-input guard ---------------------------------

@pytest.fixture(scope="module")
def tiny_tif(tmp_path_factory) -> Path:
    """A 4 x 32 x 32 uint8 TIFF at 10 um: enough for options that fail while parsing."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.tif"
    return write_volume(path, np.arange(4 * 32 * 32, dtype=np.uint8).reshape(4, 32, 32),
                        (10.0, 10.0, 10.0))


@pytest.mark.parametrize("command, option, args", [
    ("upscale", "--spacing-um", ["--spacing-um", "inf"]),
    ("upscale", "--window", ["--window", "0", "inf"]),
    ("upscale", "--window", ["--window", "nan", "1"]),
    ("evaluate", "--spacing-um", ["--spacing-um", "inf"]),
    ("pair", "--lr-spacing-um", ["--lr-spacing-um", "inf"]),
    ("pair", "--hr-spacing-um", ["--hr-spacing-um", "10,nan,10"]),
    ("pair", "--min-ncc", ["--min-ncc", "nan"]),
    ("simulate", "--rotation", ["--rotation", "nan"]),
    ("simulate", "--shift-um", ["--shift-um", "nan", "0"]),
    ("simulate", "--smoothing", ["--smoothing", "inf"]),
    ("simulate", "--window", ["--window", "0", "inf"]),
    ("simulate", "--attenuation", ["--attenuation", "inf"]),
    ("simulate", "--spacing-um", ["--spacing-um", "-inf"]),
    ("phantom", "--thickness-um", ["--thickness-um", "inf"]),
    ("phantom", "--bvtv", ["--bvtv", "nan"]),
])
def test_non_finite_floats_exit_2_naming_the_option(run_cli, tiny_tif, tmp_path, command,
                                                    option, args):
    out = tmp_path / "out.tif"
    paths = {"upscale": [tiny_tif, out], "evaluate": [tiny_tif, tiny_tif],
             "pair": [tiny_tif, tiny_tif, tmp_path / "pairs"], "simulate": [tiny_tif, out],
             "phantom": [out]}[command]
    r = run_cli(command, *paths, *args)
    assert r.exit_code == 2, r.stderr
    assert f"'{option}'" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, value", [("1e3", 1000.0), ("-0.5", -0.5)])
def test_finite_float_accepts_numbers(text, value):
    assert FINITE.convert(text, None, None) == value


@pytest.mark.parametrize("kind, text, message", [
    (POSITIVE, "0", "> 0"), (NON_NEGATIVE, "-1", ">= 0"), (FiniteFloat(-1, 1), "1.5", "<= 1"),
    (FINITE, "x", "not a number"), (FINITE, "-inf", "not a finite number"),
])
def test_finite_float_bounds(kind, text, message):
    with pytest.raises(click.BadParameter, match=message):
        kind.convert(text, None, None)


@pytest.mark.parametrize("device, problem", [
    ("auto", None), ("cpu", None), ("gpu", "expected auto"), ("cuda:", "expected auto"),
    ("cuda:one", "expected auto")])
def test_device_problem(device, problem):
    got = device_problem(device)
    assert got is None if problem is None else problem in got


def test_device_problem_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "not available" in device_problem("cuda")
    assert "not available" in device_problem("cuda:0")


def _nrecon_scan(folder: Path) -> Path:
    """A 3-slice NRecon folder (uint16: .tif slices) for the guard's folder cases."""
    return write_volume(folder, np.zeros((3, 8, 8), np.uint16), (80.0, 80.0, 80.0))


def test_output_over_input_guard(tmp_path):
    scan = _nrecon_scan(tmp_path / "scan")
    slices = sorted(scan.glob("*.tif"))
    single = write_volume(tmp_path / "hr.tif", np.zeros((3, 8, 8), np.uint8), None)
    link = tmp_path / "link.tif"
    link.symlink_to(single)
    hard = tmp_path / "hard.tif"
    os.link(single, hard)
    inputs = [scan, *slices, single]
    refused = {scan: "is the input", tmp_path / "scan" / ".." / "scan": "is the input",
               slices[1]: "is the input", link: "is the input", hard: "is the input",
               tmp_path: "holds the input"}
    for out, message in refused.items():
        with pytest.raises(UserError, match=f"--out {message}"):
            refuse_output_over_input([("--out", out)], inputs)
    # beside the inputs, or a new name inside the scan folder: allowed
    for out in (tmp_path / "sr.tif", scan / "report.csv", scan / "sub" / "x.tif", None):
        refuse_output_over_input([("--out", out)], inputs)


def test_json_output_is_strict_json_with_null_for_non_finite(capsys):
    """NaN/Inf (Python floats or numpy's, nested) come out as null: `jq` and other strict
    parsers reject the NaN and Infinity tokens json.dumps writes by default."""
    import json

    from microct_sr.cli._common import emit_json

    emit_json({"a": float("nan"), "b": [1.5, np.float32("inf"), {"c": -np.inf}],
               "d": np.float64(2.0), "e": np.int64(3), "f": "nan"})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.5, None, {"c": None}], "d": 2.0, "e": 3,
                                "f": "nan"}


def test_error_naming_a_path_with_a_newline_stays_one_line(run_cli, tmp_path):
    """A file name with a newline (or undecodable bytes) is shown escaped: the error is one
    line, as scripts that read the last line of stderr expect."""
    bad = tmp_path / "scan\nlr.tif"
    bad.write_bytes(b"not a tiff")
    r = run_cli("info", bad)
    assert r.exit_code == 2
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "scan\\nlr.tif" in line
    assert str(UserError("x", "a b/é.tif")) == "a b/é.tif: x"  # printable names unchanged


def test_spacing_below_one_um_warns_about_millimetres(caplog):
    """0.08 is accepted (a valid size) but almost surely millimetres for micro-CT: warned."""
    from microct_sr.cli._common import parse_spacing

    with caplog.at_level("WARNING"):
        assert parse_spacing("80") == (80.0, 80.0, 80.0)
    assert caplog.text == ""
    with caplog.at_level("WARNING"):
        assert parse_spacing("0.08") == (0.08, 0.08, 0.08)
    assert "takes micrometres" in caplog.text and "0.08" in caplog.text


# ---- --json when the run fails ----------------------------------------------------------

@pytest.mark.parametrize("args, code, path_named", [
    (["info", "{missing}", "--json"], 2, True),              # bad input (UserError)
    (["upscale", "--json"], 2, False),                       # usage error: no INPUT
    (["upscale", "{tiny}", "out.tif", "--json", "--batch-size", "0"], 2, False),
])
def test_failed_json_run_prints_one_error_document(run_cli, tiny_tif, tmp_path, args, code,
                                                   path_named):
    """A script that parses stdout gets one JSON document whether the run worked or not."""
    import json

    missing = tmp_path / "no such scan"
    args = [a.format(missing=missing, tiny=tiny_tif) for a in args]
    r = run_cli(*args)
    assert r.exit_code == code
    doc = json.loads(r.stdout)
    assert doc["exit_code"] == code and doc["error"]
    assert doc["path"] == (str(missing) if path_named else None)
    assert doc["error"] in r.stderr


def test_failed_run_without_json_prints_nothing_on_stdout(run_cli, tmp_path):
    r = run_cli("info", str(tmp_path / "missing"))
    assert r.exit_code == 2 and r.stdout == "" and "missing" in r.stderr


def test_crash_and_signal_with_json_print_an_error_document(run_cli, tiny_tif, monkeypatch):
    """An unexpected exception (exit 1) and a SIGTERM (exit 143, atomic.raise_exit) as well."""
    import json

    import microct_sr.volume as volume

    def crash(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(volume, "describe", crash)
    r = run_cli("info", str(tiny_tif), "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"error": "RuntimeError: boom", "exit_code": 1, "path": None}

    def terminated(*a, **k):
        raise SystemExit(143)

    monkeypatch.setattr(volume, "describe", terminated)
    r = run_cli("info", str(tiny_tif), "--json")
    assert r.exit_code == 143
    assert json.loads(r.stdout) == {"error": "stopped by signal 15", "exit_code": 143,
                                    "path": None}


@pytest.mark.parametrize("exc, code, error", [
    (KeyboardInterrupt(), 130, "Aborted."),              # Ctrl-C (click makes it an Abort)
    (click.exceptions.Abort(), 130, "Aborted."),
    (SystemExit("disk full"), 1, "disk full"),           # sys.exit("message")
])
def test_interrupt_abort_and_exit_with_a_message_keep_their_status_with_json(
        run_cli, tiny_tif, monkeypatch, exc, code, error):
    """Each way a command can stop keeps its exit status (130 for Ctrl-C, as a shell reports
    it) and, with --json, gives one error document naming it."""
    import microct_sr.volume as volume

    def stop(*a, **k):
        raise exc

    monkeypatch.setattr(volume, "describe", stop)
    r = run_cli("info", str(tiny_tif), "--json")
    assert r.exit_code == code
    assert json.loads(r.stdout) == {"error": error, "exit_code": code, "path": None}
    r = run_cli("info", str(tiny_tif))
    assert r.exit_code == code and r.stdout == "" and error in r.stderr


def test_ctrl_c_outside_a_command_exits_130_with_a_json_document(run_cli, monkeypatch):
    """A KeyboardInterrupt that click does not turn into an Abort (raised around the
    command, not in it) exits 130 as well, saying 'Interrupted.'."""
    import microct_sr.cli as cli_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod.cli, "main", interrupted)
    r = run_cli("info", "x", "--json")
    assert r.exit_code == 130 and r.stderr.strip() == "Interrupted."
    assert json.loads(r.stdout) == {"error": "Interrupted.", "exit_code": 130, "path": None}


def test_a_run_that_printed_its_document_gets_no_error_document_after_it(run_cli, tiny_tif,
                                                                         monkeypatch):
    """stdout holds one JSON document: a command that printed its own and then failed adds
    no error document after it (two documents are not one valid JSON text)."""
    import microct_sr.volume as volume
    from microct_sr.cli._common import emit_json

    def report_then_fail(*a, **k):
        emit_json({"partial": 1})
        raise UserError("failed after its report", tiny_tif)

    monkeypatch.setattr(volume, "describe", report_then_fail)
    r = run_cli("info", str(tiny_tif), "--json")
    assert r.exit_code == 2 and "failed after its report" in r.stderr
    assert json.loads(r.stdout) == {"partial": 1}
    # the count is per document: the next failed run in this process still gets its own
    monkeypatch.setattr(volume, "describe", lambda *a, **k: (_ for _ in ()).throw(
        UserError("bad scan", tiny_tif)))
    r = run_cli("info", str(tiny_tif), "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"].endswith("bad scan")


def test_torchrun_ranks_other_than_0_print_no_json_and_log_warnings_only(run_cli, tmp_path,
                                                                        monkeypatch):
    """Under torchrun every process runs the CLI: a failed `train --json` printed N error
    documents on the shared stdout, and every INFO line N times."""
    import logging

    levels = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    monkeypatch.setenv("RANK", "1")
    r = run_cli("info", str(tmp_path / "missing"), "--json")
    assert r.exit_code == 2 and r.stdout == "" and "missing" in r.stderr
    monkeypatch.setenv("RANK", "0")
    r = run_cli("info", str(tmp_path / "missing"), "--json")
    assert r.exit_code == 2 and json.loads(r.stdout)["exit_code"] == 2
    assert levels == [logging.WARNING, logging.INFO]
    monkeypatch.setenv("RANK", "1")  # --debug asks for every rank's debug lines
    r = run_cli("--debug", "info", str(tmp_path / "missing"))
    assert r.exit_code == 2 and levels[-1] == logging.DEBUG
