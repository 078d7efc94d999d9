"""User-facing errors: the CLI maps them to exit status 2 and one line on stderr."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """Bad input from the user (a file, an option). The message names the file and the problem."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        shown = None if self.path is None else _printable(self.path)
        super().__init__(f"{shown}: {message}" if shown else message)


def _printable(path: str) -> str:
    """``path`` as is, or quoted with escapes when it holds a newline, another control
    character or undecodable bytes, so that the message stays one readable line."""
    if path.isprintable() and not any(0xDC80 <= ord(c) <= 0xDCFF for c in path):
        return path
    return ascii(path)
