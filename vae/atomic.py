"""Atomic file writes: a temporary file in the target's directory, fsynced, then renamed over the target.

A crash or `kill -9` at any moment leaves either the old file or the new one, never half of one. Temporary
files are named `.tmp-*`; whoever owns a directory removes stray ones (they are never read).
"""
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable: without this a power cut can forget it."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write into a fresh temporary file in `directory` (so a rename into place is atomic) and fsync it."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=directory)
    try:
        # mkstemp makes the file private (0600); ours are for everyone the umask allows, like any other file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def atomic_write(dest: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a temporary file beside `dest`, then rename it to `dest`."""
    dest = Path(dest)
    tmp = write_temp(dest.parent, write)
    try:
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def atomic_write_text(dest: Path, text: str) -> None:
    """`dest` holds `text` (UTF-8) in full or keeps what it held: metrics, summaries and other small text files."""
    atomic_write(dest, lambda f: f.write(text.encode()))


def remove_stray_temporaries(directory: Path) -> list:
    """Temporary files left by a process killed mid-write; they are never read, so remove them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stray = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray
