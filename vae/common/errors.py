"""Errors a user can act on, the one helper that makes any exception one line, and the one wrapper that turns them
into a clean exit for every command-line entry point."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
from typing import Optional

from hydra.errors import CompactHydraException

from vae.common.console import readers_may_leave
from vae.settings.schema import undeclared_settings


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, no GPU).

    The message is one line that names the problem and the fix; it is printed without a traceback.
    """

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: not a bad setting as such, so it gets its own exit status."""

    exit_code = 3


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a space, never inside a word or a number, with "..." when cut."""
    if len(text) <= limit:
        return text
    head = text[:limit - 2]  # one more than fits: a space there ends the last whole word that does
    head = head.rsplit(" ", 1)[0] if " " in head else head[:-1]
    return head.rstrip(" ,;:") + "..."


def describe(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`: how any failure that is reported (rather than raised) reads."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {shorten(text[0], limit) if text else ''}".rstrip(": ")


class JobFailed(UserError, CompactHydraException):
    """A sweep job's `UserError`, re-raised so that the launcher and sweeper record the job as failed (Optuna marks
    the trial failed). Hydra prints a CompactHydraException as its message alone: no traceback at the sweep's end."""


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError, or Python's and numpy's
    MemoryError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                                            or "not enough memory" in text or "out of memory" in text)


def allocation_size(e: BaseException) -> str:
    """What a failed allocation asked for, from its message ("102400000000 bytes" from the CPU allocator, "95.37 GiB"
    from CUDA's, "14.6 GiB for an array" from numpy's), as a short readable text; "" if it does not say."""
    match = re.search(r"allocate (\d+) bytes|allocate ([\d.]+ [KMGTPE]iB)|([\d.]+ [KMGTPE]iB) for an array", str(e))
    if match is None:
        return ""
    exact, size, array = match.groups()
    return f"{int(exact) / 2**30:.3g} GiB" if exact else size or array


@contextlib.contextmanager
def memory_hint(what: str, settings: str):
    """Turn a failed allocation inside the block into one line naming the settings that drive its size."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        size = allocation_size(e)
        asked = f"it asked for {size} at once" if size else describe(e, 120)
        raise UserError(f"out of memory {what} ({asked}); its size grows with {settings}: lower them") from None


def one_line(text: str, limit: int = 300) -> str:
    """`text` with every run of whitespace (newlines too) made one space, cut to `limit` characters: for messages
    whose reason is on a later line (torchvision's "Error downloading x:\nTried <mirror>, got: <reason>")."""
    return shorten(" ".join(text.split()), limit)


def os_error(e: OSError) -> UserError:
    """The one line for a file-system error that reached the top: which path, and what the system said."""
    where = f" {e.filename}" if e.filename is not None else ""
    return UserError(f"cannot use{where}: {e.strerror or describe(e)}; check that path in the settings (set "
                     "HYDRA_FULL_ERROR=1 for the traceback)")


def exit_with(error: UserError) -> None:
    # A traceback helps nobody fix a typo in a setting; keep it for those who ask (Hydra's convention).
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    with contextlib.suppress(OSError):  # stderr closed too (`2>&1 | head -1`): the status still says it
        print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


@contextlib.contextmanager
def exit_on_failure(what: str):
    """For a Hydra callback: whatever goes wrong inside ends the command with one line and a non-zero status (Hydra
    would only warn about an exception in a callback and go on). `what` says what was being done."""
    try:
        yield
    except UserError as e:
        exit_with(e)
    except OSError as e:  # a path in the settings that the file system refuses to look at
        exit_with(os_error(e))
    except Exception as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {what}: {describe(e)} (set HYDRA_FULL_ERROR=1 for the traceback)", file=sys.stderr,
              flush=True)
        sys.exit(1)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def as_user_error(e: Exception) -> Optional[UserError]:
    """`e` as the one line a user can act on: a UserError as it is, and two failures that arrive as other types (a
    file-system error that names its path, an allocation that failed); None for anything else, a bug, whose traceback
    helps. With HYDRA_FULL_ERROR=1 only a UserError: the traceback was asked for."""
    if isinstance(e, UserError):
        return e
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if isinstance(e, OSError) and e.filename is not None:
        return os_error(e)
    if is_out_of_memory(e):  # one that no memory_hint of the command named
        size = allocation_size(e)
        return UserError(f"out of memory{f' (it asked for {size} at once)' if size else ''}: lower the settings that "
                         "size the work (batch sizes, samples, the model's latent_dim x categorical_dim)")
    return None


def entry_point(task):
    """Wrap a Hydra task (`@hydra.main` above, this below): a `UserError` becomes one line on stderr and its exit
    status. In a sweep the error is logged and re-raised as `JobFailed` instead, so that one bad job does not end the
    others (Hydra's launcher records the failure, vae.sweep lists it in the summary; a sweeper such as Optuna marks
    the trial failed and goes on). Before the task, keys outside the schema are refused; during it, a reader of the
    output that leaves early (`| head -1`) costs nothing (`readers_may_leave`)."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            undeclared = undeclared_settings(cfg)  # `+key=` and `~key` slip past Hydra's schema check
            if undeclared:
                raise UserError(undeclared)
            with readers_may_leave():
                return task(cfg)
        except Exception as e:
            error = as_user_error(e)
            if error is None:
                raise
            if _in_multirun():
                from hydra.core.hydra_config import HydraConfig

                logging.getLogger(task.__module__).error("error: %s", error)
                summary = os.path.join(HydraConfig.get().sweep.dir, "summary.md")
                raise JobFailed(f"{error} (every job that ran is listed in {summary})") from e
            exit_with(error)

    return wrapper
