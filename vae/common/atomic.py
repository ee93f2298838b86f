"""Atomic file writes: a temporary file in the target's directory, fsynced, then renamed over the target.

A crash or `kill -9` at any moment leaves either the old file or the new one, never half of one. Temporary
files are named `.tmp-*`; whoever owns a directory removes stray ones (they are never read).

A write that fails (disk full, a file-size limit, permissions, an I/O error) raises `WriteFailed`, one line naming
the file and the cause, whatever type the failure arrived as: `torch.save`, for one, reports a full disk as a
RuntimeError of its own, with the OSError only in the exception's context.

The rename replaces whatever has the target's name, so a target that is not a regular file (a directory, a FIFO, a
socket, a device: `out=/dev/null` run as root would replace the system's /dev/null) is refused before anything is
written (`check_replaceable`).
"""
import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

from vae.common.errors import UserError, describe

TMP_PREFIX = ".tmp-"
# What torch's zip writer says when the file under it failed (the OSError, if any, is in the context).
_WRITER_FAILURES = ("PytorchStreamWriter failed", "unexpected pos", "file write failed")
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class WriteFailed(UserError, OSError):
    """A file could not be written; what was there before is intact (atomic writes never leave half a file).
    Also an OSError, so that code which treats a write as best effort (`except OSError`) still does."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = Path(path)


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind `e`: `e` itself, or one in its chain of causes and contexts."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def is_write_failure(e: BaseException) -> bool:
    """A failure of the file system under a write, rather than a bug in what was being written."""
    return os_error_in(e) is not None or (isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITER_FAILURES))


def write_failed(path: Path, e: BaseException, what: str = "", kept: Optional[str] = None) -> WriteFailed:
    """The one-line error for a failed write of `path`: the cause, the fix, and that the old file is intact (or
    `kept`, what is intact instead)."""
    path = Path(path)
    os_error = os_error_in(e)
    if os_error is not None:
        cause = os_error.strerror or str(os_error)
        fix = ("free disk space or raise the file-size limit" if os_error.errno in _NO_SPACE
               else f"check that {path.parent} is writable")
    else:
        cause, fix = describe(e, 160), "free disk space or check the file system"
    if kept is None:
        try:
            kept = f"the previous {path.name} is intact" if path.is_file() else ""
        except OSError:  # the path itself is the problem (too long, a loop of links)
            kept = ""
    kept = f"; {kept}" if kept else ""
    return WriteFailed(f"could not write {what + ' ' if what else ''}{path}: {cause} ({fix}){kept}", path)


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def not_a_regular_file(path: Path) -> Optional[str]:
    """What `path` is ("a FIFO", "a directory", ...) when it exists and is not a regular file (a link is followed);
    None for a regular file or nothing at all."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None if stat.S_ISREG(mode) else kind_of(mode)


def kind_of(mode: int) -> str:
    """What a file of this `st_mode` is, for a message: "a FIFO", "a directory", "a character device"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "a special file")


def check_replaceable(dest: Path, what: str = "") -> None:
    """Refuse, before any work, a target that an atomic write must not rename a file over."""
    try:
        kind = not_a_regular_file(dest)
    except OSError as e:  # a name too long, a loop of links, no permission to look
        raise write_failed(dest, e, what) from None
    if kind:
        raise WriteFailed(f"could not write {what + ' ' if what else ''}{dest}: it is {kind}, not a regular file, "
                          "and would be replaced (choose a file path)", dest)


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


def atomic_write(dest: Path, write: Callable[[BinaryIO], Any], what: str = "") -> None:
    """`write(file)` into a temporary file beside `dest`, then rename it to `dest`; `WriteFailed` if the file
    system fails (`what` names the file in that message, e.g. "checkpoint")."""
    dest = Path(dest)
    check_replaceable(dest, what)
    try:
        tmp = write_temp(dest.parent, write)
        try:
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
    except WriteFailed:
        raise
    except Exception as e:
        if not is_write_failure(e):
            raise
        raise write_failed(dest, e, what) from e


def atomic_write_text(dest: Path, text: str, what: str = "") -> None:
    """`dest` holds `text` (UTF-8) in full or keeps what it held: metrics, summaries and other small text files."""
    atomic_write(dest, lambda f: f.write(text.encode()), what)


def remove_stray_temporaries(directory: Path) -> list:
    """Temporary files left by a process killed mid-write; they are never read, so remove them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stray = [p for p in directory.iterdir() if p.name.startswith(TMP_PREFIX)]
    for p in stray:
        p.unlink(missing_ok=True)
    return stray
