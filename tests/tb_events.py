"""Reading TensorBoard event files in tests: what is on disk (every record, duplicates included), as opposed to
what TensorBoard shows (test_train.events: EventAccumulator, which hides the steps a resumed writer purged)."""
from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


def steps_on_disk(run_dir, tag: str = "train/loss") -> list:
    """Every step with a `tag` scalar in every event file of `run_dir`, in file order, duplicates included. A record
    still being written at the end of a file is skipped (the loader stops there), so this may be polled."""
    steps = []
    for path in sorted(Path(run_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps
