"""Collect training runs into one small JSON: each run's metrics.json and its test curves from TensorBoard.

    python scripts/export_runs.py RUNS_DIR OUT.json

RUNS_DIR holds one directory per run (as train.py writes them); the checkpoints and images stay behind, but the
evaluation `python -m vae.evaluate` wrote beside a run's last.pt is included. The result is what
scripts/estimator_tables.py reads.
"""
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAGS = ("test/loss", "test/elbo_discrete", "test/iw_bound", "train/loss", "latents/active", "latents/perplexity")


def export(run: Path) -> dict:
    ea = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 1, "histograms": 1})
    ea.Reload()
    curves = {tag: [[e.step, e.value] for e in ea.Scalars(tag)] for tag in TAGS if tag in ea.Tags()["scalars"]}
    overrides = run / ".hydra" / "overrides.yaml"
    evaluated = run / "checkpoints" / "last.metrics.json"  # `python -m vae.evaluate` of the last checkpoint, if run
    return {"metrics": json.loads((run / "metrics.json").read_text()), "curves": curves,
            "overrides": overrides.read_text() if overrides.is_file() else None,
            "evaluate": json.loads(evaluated.read_text()) if evaluated.is_file() else None}


def main(runs_dir: str, out: str) -> None:
    result = {}
    for run in sorted(Path(runs_dir).iterdir()):
        if (run / "metrics.json").is_file():
            result[run.name] = export(run)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(result)} runs -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
