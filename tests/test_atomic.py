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


# ------------------------------------------------------------------ interrupted and colliding runs
# Each test below reproduces a failure of a run stopped by a signal (Ctrl-C, SIGTERM, SIGKILL)
# or of two runs writing the same output at once.

import csv  # noqa: E402 - the section's own imports
import json  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _dead_pid() -> int:
    """The id of a process that has exited (a run killed with SIGKILL)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_write_removes_the_temporary_of_a_killed_run(tmp_path):
    """A checkpoint or report write killed with SIGKILL leaves its temporary file; the next
    write of the same file removes it (the writing process is gone) and keeps the temporary
    of a run still going."""
    dead = tmp_path / f".microct-sr-tmp-{_dead_pid()}-abcd_123-model.pt"
    dead.write_bytes(b"half a checkpoint")
    live = tmp_path / f".microct-sr-tmp-{os.getppid()}-zyxw_987-model.pt"
    live.write_bytes(b"a run still writing")
    atomic_write(tmp_path / "model.pt", lambda p: p.write_bytes(b"weights"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "model.pt"]


def test_atomic_write_temporary_is_named_for_the_stale_cleanup(tmp_path, monkeypatch):
    """The temporary name carries the process id (what the cleanup above looks for) and the
    prefix that the slice-folder readers skip."""
    from microct_sr.atomic import TMP_PREFIX
    from microct_sr.volume.base import TMP_PREFIX as VOLUME_TMP_PREFIX

    seen = []
    atomic_write(tmp_path / "table.md", lambda p: seen.append(p.name) or p.write_text("x"))
    assert TMP_PREFIX == VOLUME_TMP_PREFIX
    assert seen[0].startswith(f"{TMP_PREFIX}{os.getpid()}-") and seen[0].endswith("-table.md")


_PAIR_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import microct_sr.pairing as pairing
    real = pairing.iter_patches
    def stopped(*a, **k):  # the job scheduler stops the run while patches are cut
        for i, item in enumerate(real(*a, **k)):
            if i == 1:
                os.kill(os.getpid(), getattr(signal, sys.argv[1]))
            yield item
    pairing.iter_patches = stopped
    from microct_sr.cli import main
    main(sys.argv[2:])
""")


def _pair_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A tiny HR volume, its 8x area-downsampled LR scan and a simulation.json (no motion)."""
    from microct_sr.volume import write_volume

    rng = np.random.default_rng(0)
    hr = (rng.random((32, 128, 128)) * 255).astype(np.uint8)
    lr = hr.reshape(4, 8, 16, 8, 16, 8).mean(axis=(1, 3, 5)).astype(np.uint8)
    write_volume(tmp_path / "hr.tif", hr, (10.0, 10.0, 10.0))
    write_volume(tmp_path / "lr.tif", lr, (80.0, 80.0, 80.0))
    (tmp_path / "simulation.json").write_text(json.dumps({"rotation_deg": 0.0,
                                                          "shift_um": [0.0, 0.0]}))
    return tmp_path / "lr.tif", tmp_path / "hr.tif", tmp_path / "simulation.json"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_pair_stopped_by_sigterm_removes_its_temporary_folder(tmp_path, sig):
    """`pair` has no volume writer, so SIGTERM (a job scheduler) used to kill it on the spot:
    its temporary patch folder stayed in OUT_DIR for good. Now it exits 128 + signum and
    cleans up as after Ctrl-C."""
    lr, hr, motion = _pair_inputs(tmp_path)
    out = tmp_path / "pairs"
    out.mkdir()  # a shared OUT_DIR that already exists
    driver = tmp_path / "driver.py"
    driver.write_text(_PAIR_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), sig, "pair", str(lr), str(hr), str(out), "--scan-id",
         "m1", "--motion-from", str(motion), "--lr-patch", "4", "--min-ncc", "-1",
         "--jobs", "1", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert list(out.iterdir()) == []


def _fake_scan(tmp: Path, scan_id: str, n: int, tag: bytes) -> list[dict]:
    """A pair run's temporary folder with ``n`` patch pairs; returns their pairs.csv rows."""
    rows = []
    for sub in ("lr", "hr"):
        (tmp / sub).mkdir(parents=True)
    for i in range(n):
        pid = f"{scan_id}_{i:05d}"
        for sub in ("lr", "hr"):
            (tmp / sub / f"{pid}.tif").write_bytes(tag)
        rows.append({"patch_id": pid, "scan_id": scan_id, "lr_slice": i})
    return rows


def _listed_but_missing(out: Path) -> list[str]:
    with open(out / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["patch_id"] for r in rows for sub in ("lr", "hr")
            if not (out / sub / f"{r['patch_id']}.tif").exists()]


def test_pair_merge_is_not_cut_in_half_by_ctrl_c(tmp_path, monkeypatch):
    """Ctrl-C while `pair --overwrite` merged a scan into OUT_DIR left pairs.csv listing patch
    files already deleted (train then refused the folder). The merge now finishes first;
    the interrupt follows."""
    import microct_sr.pairing.output as output

    out = tmp_path / "pairs"
    out.mkdir()
    output._commit(out, tmp_path / "t1", "m1", _fake_scan(tmp_path / "t1", "m1", 6, b"old"),
                   {"scan_id": "m1"}, overwrite=False)
    new_rows = _fake_scan(tmp_path / "t2", "m1", 6, b"new")
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 3:  # Ctrl-C while the patch files move in
            os.kill(os.getpid(), signal.SIGINT)
        return real(a, b)

    monkeypatch.setattr(output.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        output._commit(out, tmp_path / "t2", "m1", new_rows, {"scan_id": "m1"},
                       overwrite=True)
    monkeypatch.setattr(output.os, "replace", real)
    assert _listed_but_missing(out) == []
    assert {p.read_bytes() for p in (out / "lr").iterdir()} == {b"new"}


def _nrecon(path: Path, value: int, overwrite: bool = False):
    from microct_sr.volume import write_volume

    write_volume(path, np.full((2, 16, 16), value, np.uint8), (80.0, 80.0, 80.0),
                 overwrite=overwrite)


def _value(path: Path) -> int:
    from microct_sr.volume import open_volume

    with open_volume(path) as v:
        return int(v.read(0, len(v)).max())


def test_folder_output_interrupted_during_the_swap_is_whole(tmp_path, monkeypatch):
    """Replacing an NRecon folder is two renames (old folder aside, new one in). Ctrl-C between
    them left no folder under the final name and the old one under a temporary name that the
    next run deletes. Now the swap completes before the interrupt is acted on."""
    import microct_sr.volume.writer as writer

    final = tmp_path / "scan"
    _nrecon(final, 1)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        r = real(a, b)
        if len(calls) == 1:  # the old folder has just been moved aside
            os.kill(os.getpid(), signal.SIGINT)
        return r

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _nrecon(final, 2, overwrite=True)
    monkeypatch.setattr(writer.os, "replace", real)
    assert [p.name for p in tmp_path.iterdir()] == ["scan"]
    assert _value(final) == 2


def test_folder_output_swap_failing_puts_the_old_folder_back(tmp_path, monkeypatch):
    """If moving the new folder in fails after the old one was moved aside, the old output
    goes back under its name (it used to stay under a temporary name, deleted later)."""
    import microct_sr.volume.writer as writer

    final = tmp_path / "scan"
    _nrecon(final, 1)
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(b))
        return real(a, b)

    monkeypatch.setattr(writer.os, "replace", replace)
    with pytest.raises(PermissionError):
        _nrecon(final, 2, overwrite=True)
    monkeypatch.setattr(writer.os, "replace", real)
    assert [p.name for p in tmp_path.iterdir()] == ["scan"]
    assert _value(final) == 1


def _finish_other_run(final: Path, go, done) -> None:
    from microct_sr.volume import create_volume_writer

    w = create_volume_writer(final, (2, 16, 16), np.uint8, (80.0, 80.0, 80.0), overwrite=True)
    w.write(np.full((2, 16, 16), 3, np.uint8))
    go.wait(30)
    w.close()
    done.set()


def test_two_runs_replacing_the_same_folder_both_succeed(tmp_path, monkeypatch):
    """Two `upscale --overwrite` runs into the same NRecon folder: when the other one renamed
    its folder into place between this run's two renames, this run failed with 'Directory not
    empty' and left the old folder behind. Now the later run wins, as with files."""
    import microct_sr.volume.writer as writer
    from microct_sr.volume import create_volume_writer

    final = tmp_path / "scan"
    _nrecon(final, 1)
    ctx = multiprocessing.get_context("fork")
    go, done = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_finish_other_run, args=(final, go, done))
    other.start()
    try:
        w = create_volume_writer(final, (2, 16, 16), np.uint8, (80.0, 80.0, 80.0),
                                 overwrite=True)
        w.write(np.full((2, 16, 16), 2, np.uint8))
        real, calls = os.replace, []

        def replace(a, b):
            r = real(a, b)
            calls.append(a)
            if len(calls) == 1:  # the old folder is aside: the other run finishes now
                go.set()
                assert done.wait(30)
            return r

        monkeypatch.setattr(writer.os, "replace", replace)
        w.close()
    finally:
        go.set()
        other.join(30)
    assert other.exitcode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["scan"]
    assert _value(final) == 2


def test_simulate_tif_folder_left_by_a_killed_run_is_removed(tmp_path):
    """`simulate --format tif` builds LR_OUT as a temporary folder renamed at the end; one
    killed with SIGKILL stayed beside LR_OUT for good. The next run removes it."""
    from microct_sr.simulate import SimParams, simulate_volume
    from microct_sr.volume import open_volume, write_volume

    rng = np.random.default_rng(0)
    write_volume(tmp_path / "hr.tif", (rng.random((16, 64, 64)) * 255).astype(np.uint8),
                 (10.0, 10.0, 10.0))
    stale = tmp_path / f".microct-sr-tmp-{_dead_pid()}-lr"
    stale.mkdir()
    (stale / f".microct-sr-tmp-{os.getpid()}-lr.tif").write_bytes(b"half an LR scan")
    with open_volume(tmp_path / "hr.tif") as hr:
        simulate_volume(hr, tmp_path / "lr", SimParams(views=16, window=(0.0, 255.0)),
                        fmt="tif", quiet=True, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hr.tif", "lr"]


# ---- without --overwrite, an output another run finished meanwhile is never replaced ------

@pytest.mark.parametrize("hard_links", [True, False])
def test_atomic_write_without_replace_keeps_a_file_that_appeared(tmp_path, monkeypatch,
                                                                hard_links):
    """Checking for the output and renaming into place are two steps: a second run that
    finished in between used to replace the first one's report. Also on a file system
    without hard links (the check-then-rename fallback)."""
    import errno

    from microct_sr.errors import UserError

    if not hard_links:
        def no_link(a, b):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "table.md"

    def write(tmp: Path) -> None:
        tmp.write_text("this run")
        path.write_text("the other run")  # the other run finishes while this one writes

    with pytest.raises(UserError, match="appeared while this run was writing it"):
        atomic_write(path, write, replace=False)
    assert path.read_text() == "the other run"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]
    assert atomic_write(tmp_path / "new.md", lambda t: t.write_text("x"), replace=False)
    assert (tmp_path / "new.md").read_text() == "x"
    with pytest.raises(UserError):  # an existing file, as before: kept as well
        atomic_write(tmp_path / "new.md", lambda t: t.write_text("y"), replace=False)
    assert (tmp_path / "new.md").read_text() == "x"


@pytest.mark.parametrize("name", ["scan.tif", "scan.nii.gz", "scan"])
def test_volume_output_finished_by_another_run_meanwhile_is_kept(tmp_path, monkeypatch, name):
    """Two runs without --overwrite into the same output: the one that finished second
    replaced the first one's volume (a TIFF, a NIfTI file or an NRecon folder). Now it stops
    with exit 2's UserError naming the file, the first result stays, nothing is left over."""
    import microct_sr.volume.writer as writer
    from microct_sr.errors import UserError
    from microct_sr.volume import create_volume_writer

    final = tmp_path / name
    real, state = writer._check_target, {"closing": False}

    def check(path, overwrite, folder):
        real(path, overwrite, folder)
        if state["closing"]:  # the other run renames its output into place right now
            if name == "scan":
                final.mkdir()
                (final / "scan_rec.log").write_text("the other run")
            else:
                final.write_text("the other run")

    monkeypatch.setattr(writer, "_check_target", check)
    w = create_volume_writer(final, (2, 16, 16), np.uint8, (80.0, 80.0, 80.0))
    w.write(np.full((2, 16, 16), 2, np.uint8))
    state["closing"] = True
    with pytest.raises(UserError, match="appeared while this run was writing it") as e:
        w.close()
    assert e.value.path == str(final)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    kept = final / "scan_rec.log" if name == "scan" else final
    assert kept.read_text() == "the other run"


class _Killed(BaseException):
    """Stands for SIGKILL at one step of the merge: nothing after it runs (no handler sees
    SIGKILL; the merge has no cleanup of its own to skip)."""


def test_pair_merge_killed_at_any_step_leaves_a_readable_folder(tmp_path, monkeypatch):
    """SIGKILL half-way through `pair --overwrite`'s merge left pairs.csv listing patch files
    already deleted (train refused the folder). Now each step keeps the index true: killed
    at every one of its file operations in turn, pairs.csv lists only existing patches, and
    the next `pair --overwrite` of the scan leaves exactly its new patches, no orphans."""
    import pathlib

    import microct_sr.pairing.output as output

    real_replace, real_unlink = os.replace, pathlib.Path.unlink
    step = {"n": 0, "kill_at": None}

    def counted(real):
        def op(*a, **k):
            step["n"] += 1
            if step["n"] == step["kill_at"]:
                raise _Killed
            return real(*a, **k)
        return op

    k, completed = 0, False
    while not completed:
        k += 1
        case = tmp_path / f"k{k}"
        out = case / "pairs"
        out.mkdir(parents=True)
        output._commit(out, case / "t1", "m1", _fake_scan(case / "t1", "m1", 6, b"old"),
                       {"scan_id": "m1"}, overwrite=False)
        output._commit(out, case / "t2", "m2", _fake_scan(case / "t2", "m2", 3, b"m2"),
                       {"scan_id": "m2"}, overwrite=False)
        new_rows = _fake_scan(case / "t3", "m1", 4, b"new")
        step.update(n=0, kill_at=k)
        monkeypatch.setattr(os, "replace", counted(real_replace))
        monkeypatch.setattr(pathlib.Path, "unlink", counted(real_unlink))
        try:
            output._commit(out, case / "t3", "m1", new_rows, {"scan_id": "m1"},
                           overwrite=True)
            completed = True
        except _Killed:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
            monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
        assert _listed_but_missing(out) == [], f"killed at step {k}"
        # the rerun a user makes after the kill
        output._commit(out, case / "t4", "m1", _fake_scan(case / "t4", "m1", 4, b"again"),
                       {"scan_id": "m1"}, overwrite=True)
        assert _listed_but_missing(out) == []
        for sub in ("lr", "hr"):
            names = sorted(p.name for p in (out / sub).iterdir())
            assert names == [f"m1_{i:05d}.tif" for i in range(4)] + \
                [f"m2_{i:05d}.tif" for i in range(3)], f"killed at step {k}"
    assert k > 20  # every delete and move of the merge was a kill point


def test_simulate_tif_folder_another_run_made_meanwhile_is_kept(tmp_path, monkeypatch):
    """`simulate --format tif` renames its temporary folder to LR_OUT at the end: an LR_OUT
    another run finished in between is kept (exit 2's UserError naming it, not an OSError
    crash or a replaced folder) and this run's temporary folder is removed."""
    import microct_sr.simulate as simulate
    from microct_sr.errors import UserError
    from microct_sr.simulate import SimParams, simulate_volume
    from microct_sr.volume import open_volume, write_volume

    rng = np.random.default_rng(0)
    write_volume(tmp_path / "hr.tif", (rng.random((16, 64, 64)) * 255).astype(np.uint8),
                 (10.0, 10.0, 10.0))
    out = tmp_path / "lr"
    real = simulate.atomic_write

    def write(path, *a, **k):
        if not out.exists():  # the other run renames its LR_OUT into place right now
            out.mkdir()
            (out / "simulation.json").write_text("the other run")
        return real(path, *a, **k)

    monkeypatch.setattr(simulate, "atomic_write", write)
    with open_volume(tmp_path / "hr.tif") as hr, \
            pytest.raises(UserError, match="appeared while this run was writing it") as e:
        simulate_volume(hr, out, SimParams(views=16, window=(0.0, 255.0)), fmt="tif",
                        quiet=True, workers=1)
    assert e.value.path == str(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hr.tif", "lr"]
    assert [p.name for p in out.iterdir()] == ["simulation.json"]
    assert (out / "simulation.json").read_text() == "the other run"


def test_pair_merge_of_a_scan_keeps_the_patches_of_a_scan_whose_id_extends_it(tmp_path):
    """--overwrite of scan `m1` removes its own patches (listed or left by a killed merge:
    `m1_NNNNN.tif`), never those of scan `m1_b` (`m1_b_NNNNN.tif`) in the same folder."""
    import microct_sr.pairing.output as output

    out = tmp_path / "pairs"
    out.mkdir()
    for tmp, scan, n in (("t1", "m1", 3), ("t2", "m1_b", 2)):
        output._commit(out, tmp_path / tmp, scan, _fake_scan(tmp_path / tmp, scan, n, b"x"),
                       {"scan_id": scan}, overwrite=False)
    output._commit(out, tmp_path / "t3", "m1", _fake_scan(tmp_path / "t3", "m1", 2, b"new"),
                   {"scan_id": "m1"}, overwrite=True)
    for sub in ("lr", "hr"):
        assert sorted(p.name for p in (out / sub).iterdir()) == \
            ["m1_00000.tif", "m1_00001.tif", "m1_b_00000.tif", "m1_b_00001.tif"]
    assert _listed_but_missing(out) == []
