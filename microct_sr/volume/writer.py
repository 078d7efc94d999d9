"""The :class:`VolumeWriter` base: slices appended in order under a temporary name in the
target folder, renamed into place by ``close()``; target checks, stale temporary outputs left
by killed runs, and the SIGTERM handler that turns a kill into an abort while writers are open.
The format writers live with their readers (tiff.py, slices.py, sitk.py)."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import deferred_signals, publish, raise_exit, remove_dead_runs, remove_path
from ..errors import UserError
from .base import IMAGE_SUFFIXES, TMP_PREFIX, Spacing, to_dtype

log = logging.getLogger(__name__)

_ACTIVE: set["VolumeWriter"] = set()
_PREV_SIGTERM: Any = None


# SIGTERM while writing (a library caller; the CLI installs the same handler for the whole
# run): raise, so that context managers abort and remove temporary output.
_on_sigterm = raise_exit


def _register(writer: "VolumeWriter") -> None:
    global _PREV_SIGTERM
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is not _on_sigterm:
        try:
            _PREV_SIGTERM = signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):
            _PREV_SIGTERM = None
    _ACTIVE.add(writer)


def _unregister(writer: "VolumeWriter") -> None:
    global _PREV_SIGTERM
    _ACTIVE.discard(writer)
    if not _ACTIVE and _PREV_SIGTERM is not None and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _PREV_SIGTERM)
        _PREV_SIGTERM = None


def float16_as_float32(path: Path, dtype: Any, fmt: str) -> np.dtype:
    """``dtype``, or float32 for float16, which ``fmt`` cannot hold (every float16 value is
    exactly a float32 one), with a warning naming ``path``."""
    dt = np.dtype(dtype)
    if dt != np.float16:
        return dt
    log.warning("%s: %s cannot hold float16; writing float32 (the same values)", path, fmt)
    return np.dtype(np.float32)


class VolumeWriter:
    """Appends slices in order under a temporary name; ``close()`` renames into place."""

    kind = "abstract"

    def __init__(self, path: Path, shape: tuple[int, int, int], dtype: Any,
                 spacing_um: Spacing | None, overwrite: bool):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.spacing_um = None if spacing_um is None else tuple(float(s) for s in spacing_um)
        self.overwrite = overwrite
        self.count = 0
        self.closed = False
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be (z, y, x) with positive sizes, got {shape}")
        _check_target(self.path, overwrite, folder=self.kind == "nrecon")
        if self._uncompressed():
            _check_free_space(self.path, int(np.prod(self.shape)) * self.dtype.itemsize)
        self.tmp = self.path.parent / f"{TMP_PREFIX}{os.getpid()}-{self._tmp_name()}"
        remove_path(self.tmp)
        _remove_stale(self.path)
        _register(self)
        try:
            self._open()
        except BaseException:
            self.abort()
            raise

    # subclasses: _open(), _write(block), _finish(), _cleanup(); _tmp_name() if need be
    def _tmp_name(self) -> str:
        """The output's name as the temporary name ends (``.microct-sr-tmp-<pid>-<this>``)."""
        return self.path.name

    def _uncompressed(self) -> bool:
        """Whether the output takes its full voxel size on disk (checked against free space)."""
        return True

    def _open(self) -> None:
        """Create the temporary output."""

    def write(self, slices: np.ndarray) -> None:
        """Append one (y, x) slice or a (n, y, x) block; converted with :func:`to_dtype`."""
        if self.closed:
            raise RuntimeError(f"writer for {self.path} is closed")
        block = np.asarray(slices)
        if block.ndim == 2:
            block = block[None]
        if block.ndim != 3 or block.shape[1:] != self.shape[1:]:
            raise ValueError(f"slices of shape {block.shape} do not fit volume {self.shape}")
        if self.count + block.shape[0] > self.shape[0]:
            raise ValueError(f"too many slices for {self.path}: {self.count + block.shape[0]} "
                             f"> {self.shape[0]}")
        try:
            self._write(to_dtype(block, self.dtype))
        except BaseException:
            self.abort()
            raise
        self.count += block.shape[0]

    def close(self) -> None:
        """Finish the file, check the slice count and rename into place."""
        if self.closed:
            return
        if self.count != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: wrote {self.count} of {self.shape[0]} slices")
        try:
            self._finish()
            _check_target(self.path, self.overwrite, folder=self.kind == "nrecon")
            _move_into_place(self.tmp, self.path, self.overwrite)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        _unregister(self)

    def abort(self) -> None:
        """Discard the temporary output; the final name is left untouched."""
        if self.closed:
            return
        self.closed = True
        try:
            self._cleanup()
        finally:
            remove_path(self.tmp)
            _unregister(self)

    def _write(self, block: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def _cleanup(self) -> None:
        pass

    def __enter__(self) -> "VolumeWriter":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_target(path: Path, overwrite: bool, folder: bool) -> None:
    """UserError unless ``path`` may be (re)written."""
    if not path.parent.is_dir():
        raise UserError("the output's parent folder does not exist (create it first: "
                        f"mkdir -p {path.parent})", path.parent)
    if not path.exists():
        return
    if not overwrite:
        raise UserError("already exists; pass --overwrite to replace it", path)
    if path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise UserError(f"exists and is {kind}; refusing to replace it", path)
    if folder:
        _check_replaceable_folder(path)


def _check_free_space(path: Path, nbytes: int) -> None:
    """UserError naming ``path`` when its file system has less free space than the output
    needs (an 8x output is 64x its input): found before the work, not after it."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:  # not every file system reports it
        return
    if nbytes > free:
        raise UserError(f"the output needs {nbytes / 2**30:.2f} GiB but only "
                        f"{free / 2**30:.2f} GiB are free there", path)


_REPLACEABLE = set(IMAGE_SUFFIXES) | {".log", ".json", ".csv", ".txt", ".png"}


def _check_replaceable_folder(path: Path) -> None:
    """Only replace an empty folder or one that looks like an NRecon-style output (slices, a
    reconstruction log, JSON): ``--overwrite`` on a folder of the user's own volumes would
    otherwise delete them all."""
    entries = list(path.iterdir())
    for p in entries:
        if p.is_dir() or p.suffix.lower() not in _REPLACEABLE:
            raise UserError(f"refusing to replace the folder: it holds {p.name!r}, which this "
                            "tool does not write", path)
    if entries and not any(p.suffix.lower() == ".log" for p in entries):
        raise UserError("refusing to replace the folder: it has no reconstruction log, so it "
                        "is no slice folder this tool wrote (a path without a suffix writes "
                        "an NRecon-style slice folder; did you mean a file in it, such as "
                        f"{path / 'NAME.tif'}?)", path)


def _remove_stale(final: Path) -> None:
    """Remove temporary outputs for ``final`` left by killed processes (SIGKILL, power loss).
    The name's case is ignored: some writers lower-case the suffix of their temporary name.

    A writer inside this process's own temporary folder ``.microct-sr-tmp-<pid>-<name>`` (one
    renamed to ``<name>`` when the run succeeds, e.g. ``simulate --format tif``) also removes
    the folders of that name left by killed runs: nothing else would."""
    remove_dead_runs(final.parent, re.compile(
        rf"^{re.escape(TMP_PREFIX)}(?:old-)?(\d+)-{re.escape(final.name)}$", re.IGNORECASE))
    own = re.match(rf"^{re.escape(TMP_PREFIX)}(\d+)-(.+)$", final.parent.name)
    if own and int(own.group(1)) == os.getpid():
        _remove_stale(final.parent.parent / own.group(2))


def _move_into_place(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; an existing folder is swapped out first, then removed.
    Without ``overwrite`` nothing is replaced, not even an output a concurrent run finished
    after :func:`_check_target` (:func:`~microct_sr.atomic.publish`).

    The folder swap is two renames: it runs with SIGINT/SIGTERM held (an interrupt between
    them would leave nothing under the final name and the old output under a temporary name
    that the next run deletes), puts the old folder back if the second rename fails, and
    swaps again when a concurrent run renamed its own folder into place in between (the run
    that finishes last wins, as with files, instead of failing with 'Directory not empty')."""
    if not overwrite or not tmp.is_dir():
        publish(tmp, final, replace=overwrite)
        return
    old = final.parent / f"{TMP_PREFIX}old-{os.getpid()}-{final.name}"
    done = False
    try:
        with deferred_signals():
            for attempt in range(_SWAP_TRIES):
                remove_path(old)  # the output a concurrent run put in place: replaced as well
                moved = False
                try:
                    os.replace(final, old)
                    moved = True
                except FileNotFoundError:
                    pass
                try:
                    os.replace(tmp, final)
                    done = True
                    break
                except BaseException as e:
                    if moved and not final.exists():
                        os.replace(old, final)  # the old output back under its name
                    if not (isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY,
                                                                   errno.EEXIST)) \
                            or attempt == _SWAP_TRIES - 1:
                        raise
    finally:
        if done:
            remove_path(old)


_SWAP_TRIES = 5
