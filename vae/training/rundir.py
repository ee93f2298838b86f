"""Which directory a run writes into, and one run at a time in it.

A run directory (`outputs/<date>/<time>/`) holds `.hydra/`, the log, TensorBoard events, `checkpoints/` and
`metrics.json`. A new run needs one that holds no run yet; `resume=<run>/checkpoints/last.pt` continues in `<run>`
when that is one of ours, and in the new run directory otherwise (a checkpoint copied to ~/Downloads must not turn
~ into a run). While a run trains, it holds an exclusive lock on `<run>/.lock` (fcntl.flock): a second train.py in
the same directory refuses to start. The kernel drops the lock when the process ends, however it ends (kill -9
included), so there is never a stale lock to remove; the empty file stays.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from vae.common.atomic import atomic_write_text
from vae.common.errors import UserError

LOCK_NAME = ".lock"


def override(key: str, value) -> str:
    """`key=value` for a command line to paste: quoted for the shell, and for Hydra's override grammar where the value
    holds more than plain path characters (a sweep job's directory `0_lr=0.001,hard=true` has `=` and `,`, which
    Hydra would read as a syntax error and as a sweep)."""
    value = str(value)
    if not re.fullmatch(r"[\w/.+~@-]+", value):
        # Inside Hydra's double quotes only a quote, and backslashes right before a quote or the end, are escaped.
        value = '"' + re.sub(r'(\\*)("|$)', lambda m: m.group(1) * 2 + ('\\"' if m.group(2) else ""), value) + '"'
    return shlex.quote(f"{key}={value}")


def holds_run(run_dir: Path) -> Optional[str]:
    """What shows that `run_dir` already holds a run (None if nothing does): a checkpoint, metrics.json or
    TensorBoard events. Hydra's own `.hydra/` and the log do not count: a run that failed at start-up left only
    those, and running again in its directory is fine."""
    run_dir = Path(run_dir)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "metrics.json"):
        if (run_dir / name).exists():
            return name
    if run_dir.is_dir() and any(p.name.startswith("events.out.tfevents.") for p in run_dir.iterdir()):
        return "TensorBoard events"
    return None


def run_dir_of(checkpoint) -> Tuple[Optional[Path], str]:
    """The run directory that `resume=<checkpoint>` continues in place, or None and the reason it cannot.

    In place only for `<run>/checkpoints/last.pt` in a directory laid out as ours (Hydra's `.hydra/config.yaml` or
    TensorBoard events beside `checkpoints/`) that this process can write: continuing an older checkpoint there
    (best.pt) would overwrite the run's later last.pt.
    """
    path = Path(str(checkpoint)).expanduser().resolve()
    run = path.parent.parent
    if path.parent.name != "checkpoints":
        return None, f"{path} is not in a run's checkpoints/ directory"
    if not ((run / ".hydra" / "config.yaml").is_file()
            or any(p.name.startswith("events.out.tfevents.") for p in run.iterdir())):
        return None, f"{run} is not a run directory (no .hydra/config.yaml or TensorBoard events)"
    if path.name != "last.pt":
        return None, f"{path.name} is not the run's last.pt (continuing it there would overwrite its later last.pt)"
    if not all(os.access(d, os.W_OK | os.X_OK) for d in (run, path.parent)):
        return None, f"{run} is not writable"
    return run, "continuing in its own run directory"


@contextlib.contextmanager
def locked(run_dir: Path, resuming: bool = False) -> Iterator[Path]:
    """Hold `<run_dir>/.lock` for the block; refuse with one line if another process holds it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise UserError(f"cannot use run directory {run_dir}: {e.strerror or e}; choose another with "
                        "hydra.run.dir=<dir> or fix its permissions") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            if resuming:
                raise UserError(f"the run in {run_dir} is being trained by another process (pid {other}); let it "
                                "finish (or stop it) before resuming it") from None
            raise UserError(f"run directory {run_dir} is in use by another train.py (pid {other}); choose another "
                            "with hydra.run.dir=<dir>") from None
        with contextlib.suppress(OSError):  # the pid is for the message above only; the lock is the flock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield run_dir
    finally:
        os.close(fd)  # releases the lock


def write_metrics(run_dir: Path, results: dict, overrides: List[str], *, resumed_in_place: bool,
                  trained: bool) -> bool:
    """Write `<run_dir>/metrics.json`: the results, with `overrides` = the run's own command line. Returns whether
    it was written.

    A resume that continues a run in its own directory keeps the run's original overrides (its metrics.json's, or
    Hydra's record of them in `.hydra/overrides.yaml`) and appends its own to `resumes`, so that a sweep's summary
    still shows what the job swept. A resume that trained nothing (the run had finished) leaves an existing
    metrics.json alone: its numbers would only repeat the run's, and its overrides and timings would replace the
    run's.
    """
    path = Path(run_dir) / "metrics.json"
    record = {**results, "overrides": overrides}
    if resumed_in_place:
        previous = read_json(path)
        if previous is not None and not trained:
            return False
        previous = previous or {}
        original = previous.get("overrides")
        if not isinstance(original, list):
            original = read_overrides(Path(run_dir) / ".hydra" / "overrides.yaml")
        if original is not None:
            resumes = previous.get("resumes") if isinstance(previous.get("resumes"), list) else []
            record.update(overrides=original, resumes=[*resumes, overrides])
    atomic_write_text(path, json.dumps(record, indent=2) + "\n", "metrics")
    return True


def read_json(path: Path) -> Optional[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_overrides(path: Path) -> Optional[List[str]]:
    from omegaconf import OmegaConf

    try:
        return [str(o) for o in OmegaConf.load(path)]
    except Exception:  # absent or unreadable: the run's command line is then unknown
        return None

