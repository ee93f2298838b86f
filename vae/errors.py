"""Errors a user can act on, the one helper that makes any exception one line, and the one wrapper that turns them
into a clean exit for every command-line entry point."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys

from hydra.errors import CompactHydraException


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, no GPU).

    The message is one line that names the problem and the fix; it is printed without a traceback.
    """

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: not a bad setting as such, so it gets its own exit status."""

    exit_code = 3


def describe(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`: how any failure that is reported (rather than raised) reads."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


class JobFailed(UserError, CompactHydraException):
    """A sweep job's `UserError`, re-raised so that the launcher and sweeper record the job as failed (Optuna marks
    the trial failed). Hydra prints a CompactHydraException as its message alone: no traceback at the sweep's end."""


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text
                                            or "out of memory" in text)


@contextlib.contextmanager
def memory_hint(what: str, settings: str):
    """Turn a failed allocation inside the block into one line naming the settings that drive its size."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise UserError(f"out of memory {what} ({describe(e, 120)}); its size grows with {settings}: "
                        "lower them") from None


def one_line(text: str, limit: int = 300) -> str:
    """`text` with every run of whitespace (newlines too) made one space, cut to `limit` characters: for messages
    whose reason is on a later line (torchvision's "Error downloading x:\nTried <mirror>, got: <reason>")."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def exit_with(error: UserError) -> None:
    # A traceback helps nobody fix a typo in a setting; keep it for those who ask (Hydra's convention).
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(error.exit_code)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def entry_point(task):
    """Wrap a Hydra task (`@hydra.main` above, this below): a `UserError` becomes one line on stderr and its exit
    status. In a sweep the error is logged and re-raised as `JobFailed` instead, so that one bad job does not end the
    others (Hydra's launcher records the failure, vae.sweep lists it in the summary; a sweeper such as Optuna marks
    the trial failed and goes on)."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except UserError as e:
            if _in_multirun():
                from hydra.core.hydra_config import HydraConfig

                logging.getLogger(task.__module__).error("error: %s", e)
                summary = os.path.join(HydraConfig.get().sweep.dir, "summary.md")
                raise JobFailed(f"{e} (every job that ran is listed in {summary})") from e
            exit_with(e)

    return wrapper
