"""Atomic file output: write under a temporary name beside the target, then rename.

Also the signal plumbing that keeps outputs whole when a run is stopped:
:func:`exit_on_termination` (the CLI turns SIGTERM/SIGHUP into ``SystemExit(128 + signum)``,
so cleanup code runs as it does for Ctrl-C) and :func:`deferred_signals` (a few renames that
must happen together, e.g. ``pair``'s merge into a shared folder, are not cut in half).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger(__name__)

# The prefix of every temporary output (files, slice folders, pair's patch folders): readers
# skip names starting with it, and :func:`remove_dead_runs` cleans up after killed runs.
TMP_PREFIX = ".microct-sr-tmp-"
# mkstemp's random part: 8 characters of this set (tempfile._RandomNameSequence)
_RANDOM = r"[a-z0-9_]{8}"

# Signals that stop a run: Ctrl-C, a job scheduler / kill, a closed terminal or ssh session.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                     if hasattr(signal, n))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A failure or interrupt removes the temporary file and leaves ``path`` untouched. The file
    gets the usual permissions (0666 less the umask), not mkstemp's private 0600, so model files
    and reports are readable by the lab's other accounts like any other output.

    The temporary name is ``.microct-sr-tmp-<pid>-<random>-<name>``: one left by a killed run
    (SIGKILL, power loss) is removed by the next write of the same file once its process is
    gone, so checkpoints and reports do not pile up hidden copies. ``replace=False``: an
    existing ``path`` is never replaced (:func:`publish`)."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=f"-{path.name}",
                                dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        publish(tmp, path, replace)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def publish(tmp: Path, final: Path, replace: bool = True) -> None:
    """Rename the finished temporary output ``tmp`` (a file or a folder) to ``final``.

    ``replace=False`` never replaces an existing ``final``, not even one that a concurrent run
    put there after this run checked (UserError instead, ``tmp`` left to the caller): a file
    is hard-linked, which fails when the name exists, then its temporary name removed; a
    folder is renamed, which fails over anything but an empty folder. On a file system
    without hard links (FAT, some network shares) a file falls back to check-then-rename."""
    if replace:
        os.replace(tmp, final)
        return
    try:
        if tmp.is_dir():
            os.rename(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    raise
                if os.path.lexists(final):  # no hard links here
                    raise FileExistsError(errno.EEXIST, "exists", str(final)) from e
                os.replace(tmp, final)
            else:
                tmp.unlink()
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise UserError("appeared while this run was writing it (another run?); it is "
                            "kept: pass --overwrite to replace it", final) from e
        raise


def remove_stale_temporaries(path: Path) -> None:
    """Remove :func:`atomic_write` temporaries for ``path`` whose process no longer runs."""
    remove_dead_runs(path.parent, re.compile(
        rf"^{re.escape(TMP_PREFIX)}(\d+)-{_RANDOM}-{re.escape(path.name)}$"))


def remove_dead_runs(folder: Path, pattern: re.Pattern) -> None:
    """Remove the files and folders in ``folder`` whose name matches ``pattern`` (group 1:
    the id of the process that made them) when that process is gone: what runs killed
    outright (SIGKILL, power loss) left behind. A missing folder is left to the caller."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            log.info("removing %s left by an interrupted run", p)
            remove_path(p)


def remove_path(p: Path) -> None:
    """Remove the file, link or folder ``p`` (a folder with its contents); nothing if gone."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def raise_exit(signum: int, frame: Any) -> None:
    """Signal handler: stop the run as Ctrl-C does (cleanup runs), exit status 128 + signum."""
    raise SystemExit(128 + signum)


@contextmanager
def exit_on_termination() -> Iterator[None]:
    """Within the block, SIGTERM (job schedulers, ``kill``) and SIGHUP (a closed terminal or
    ssh session) raise ``SystemExit(128 + signum)`` in the main thread, so ``finally`` blocks
    and the writers' abort remove temporary output, as after Ctrl-C. A signal set to be
    ignored (``nohup``) stays ignored; the previous handlers are back after the block (the
    CLI's ``main`` may run inside another program, e.g. the tests)."""
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signum == signal.SIGINT:
                continue  # Python's own KeyboardInterrupt
            try:
                if signal.getsignal(signum) == signal.SIG_DFL:
                    previous[signum] = signal.signal(signum, raise_exit)
            except (ValueError, OSError):
                pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is raise_exit:
                signal.signal(signum, handler)


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP for the duration of the block, then act on the first one
    that came (the handler in force before: KeyboardInterrupt, SystemExit, or the default
    action). For short steps that must not stop half-way: a folder swap, a merge of several
    files. Only the main thread can do this; elsewhere the block runs unprotected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous: dict[int, Any] = {}

    def hold(signum: int, frame: Any) -> None:
        caught.append((signum, frame))

    try:
        for signum in STOP_SIGNALS:
            try:
                handler = signal.getsignal(signum)
                if handler is None or handler == signal.SIG_IGN:
                    continue  # ignored stays ignored; None: installed outside Python
                previous[signum] = signal.signal(signum, hold)
            except (ValueError, OSError):
                pass
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            signum, frame = caught[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            else:  # SIG_DFL: the default action, now that the block is done
                signal.raise_signal(signum)
