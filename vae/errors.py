"""Errors a user can act on, and the one place that turns them into a clean exit."""
import os
import sys


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, no GPU).

    The message is one line that names the problem and the fix; it is printed without a traceback.
    """

    exit_code = 2


class TrainingDiverged(UserError):
    """The loss became NaN or infinite: not a bad setting as such, so it gets its own exit status."""

    exit_code = 3


def describe(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, for a failure that is reported and worked around rather than raised."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}".rstrip(": ")


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
