#!/usr/bin/env python3
"""Build a result file (docs/results/README.md) from a finished run and its evaluation.

    python -m vae.evaluate checkpoint=outputs/<date>/<time>/checkpoints/last.pt iw_samples=1000 device=cpu
    python scripts/make_result.py outputs/<date>/<time> --name paper-gs-cpu -o docs/results/paper-gs-cpu.json

Reads the run directory's metrics.json (train.py's final numbers), .hydra/overrides.yaml (the command; a run
called in process has none, then metrics.json's `overrides`), train.log (the training device), the evaluation JSON
that `python -m vae.evaluate` wrote beside the checkpoint (the numbers the result states), and adds the checkpoint's
sha256, this checkout's git commit, this machine's hardware and the date. Run it from the checkout, and on the
machine, that made the run: the commit and the hardware are read here, not from the run.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vae.tools.machine import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FORMAT = "gumbel-vae-result/1"
METRICS = ("loss", "bce", "kl", "elbo_discrete", "iw_bound")  # what `python -m vae.evaluate` reports


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def shown_path(path: Path) -> str:
    """Relative to the repository when the file lies inside it (as a committed result should name it)."""
    path = path.resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def overrides_of(run_dir: Path, metrics: dict) -> list:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.load(path)]
    return list(metrics.get("overrides", []))


def train_device(run_dir: Path):
    """The device train.py logged ("run directory ... | device cuda:0 | ..."), or None without a train.log."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    m = re.search(r"\| device (\S+) \|", log.read_text(errors="replace"))
    return m.group(1) if m else None


def gpus() -> list:
    """This machine's GPUs, from nvidia-smi (importing torch and initialising CUDA only to name them is slow)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def torch_build() -> dict:
    """PyTorch's version and CUDA build, read from torch/version.py (importing torch takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    text = (Path(spec.origin).parent / "version.py").read_text() if spec and spec.origin else ""

    def field(name):
        m = re.search(rf"^{name}\b[^=]*=\s*'([^']*)'", text, re.M)
        return m.group(1) if m else None

    return {"torch": field("__version__"), "cuda": field("cuda")}


def hardware(run_dir: Path, evaluation: dict) -> dict:
    return {"train_device": train_device(run_dir), "evaluate_device": evaluation["device"],
            "evaluate_device_name": evaluation.get("device_name"), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "gpus": gpus(), "platform": platform.platform(), "python": platform.python_version(), **torch_build()}


def find_evaluation(run_dir: Path) -> Path:
    for stem in ("last", "best"):
        path = run_dir / "checkpoints" / f"{stem}.metrics.json"
        if path.is_file():
            return path
    sys.exit(f"error: no evaluation in {run_dir / 'checkpoints'}: run `python -m vae.evaluate "
             f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}` first, or pass --evaluation")


def default_tolerance(device: str) -> dict:
    if device.startswith("cuda"):
        return {"abs": 0.0, "rel": 1e-5, "note": "CUDA: another GPU model may pick other cuBLAS kernels; the noise "
                                                "is the same (same seed, same device type)"}
    return {"abs": 0.0, "rel": 0.0, "note": "CPU: exact on the same machine and PyTorch build"}


def make_result(run_dir: Path, evaluation_path: Path, name: str, tolerance: dict = None) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluation = json.loads(evaluation_path.read_text())
    checkpoint = Path(evaluation["checkpoint"])
    if not checkpoint.is_absolute() and not checkpoint.is_file():
        checkpoint = evaluation_path.parent / checkpoint.name
    if not checkpoint.is_file():
        sys.exit(f"error: the evaluated checkpoint {evaluation['checkpoint']} is not there any more")
    overrides = overrides_of(run_dir, metrics)
    settings = {"iw_samples": evaluation["k"], "iw_chunk": evaluation["iw_chunk"],
                "batch_size": evaluation["batch_size"], "seed": evaluation["seed"],
                "device": evaluation["device"].split(":")[0]}
    eval_command = "python -m vae.evaluate " + " ".join(
        [f"checkpoint={shlex.quote(shown_path(checkpoint))}"] + [f"{k}={v}" for k, v in settings.items()])
    result = {
        "format": FORMAT,
        "name": name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_finished": dt.datetime.fromtimestamp((run_dir / "metrics.json").stat().st_mtime,
                                                  dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "command": "python train.py " + " ".join(shlex.quote(o) for o in overrides),
        "hardware": hardware(run_dir, evaluation),
        "checkpoint": {"path": shown_path(checkpoint), "sha256": sha256(checkpoint),
                       "bytes": checkpoint.stat().st_size, "epoch": evaluation["epoch"], "step": evaluation["step"]},
        "evaluate": {"command": eval_command, "settings": settings, "tau": evaluation["tau"],
                     "hard": evaluation["hard"], "n_images": evaluation["n_images"],
                     "seconds": evaluation["seconds"]},
        "metrics": {k: evaluation["metrics"][k] for k in METRICS},
        "tolerance": tolerance or default_tolerance(evaluation["device"]),
        "training": {k: v for k, v in metrics.items() if k != "overrides"},
    }
    if metrics.get("overrides") and list(metrics["overrides"]) != overrides:
        result["resumed_with"] = "python train.py " + " ".join(shlex.quote(o) for o in metrics["overrides"])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="the run directory: outputs/<date>/<time>")
    p.add_argument("--evaluation", type=Path, help="the evaluation JSON (default: checkpoints/last.metrics.json, "
                                                   "else best.metrics.json)")
    p.add_argument("--name", help="a short name for the result (default: the run directory's name)")
    p.add_argument("-o", "--out", type=Path, help="where to write the result (default: standard output)")
    p.add_argument("--abs-tol", type=float, help="stated tolerance for a re-check, nats (default by device)")
    p.add_argument("--rel-tol", type=float, help="stated relative tolerance for a re-check (default by device)")
    p.add_argument("--tol-note", default="", help="why that tolerance")
    a = p.parse_args(argv)
    run_dir = a.run_dir.resolve()
    if not (run_dir / "metrics.json").is_file():
        sys.exit(f"error: {run_dir} has no metrics.json: not a finished train.py run")
    tolerance = None
    if a.abs_tol is not None or a.rel_tol is not None:
        tolerance = {"abs": a.abs_tol or 0.0, "rel": a.rel_tol or 0.0, "note": a.tol_note}
    result = make_result(run_dir, (a.evaluation or find_evaluation(run_dir)).resolve(), a.name or run_dir.name,
                         tolerance)
    text = json.dumps(result, indent=2) + "\n"
    if a.out is None:
        sys.stdout.write(text)
    else:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    if result["dirty"]:
        print("warning: the checkout has uncommitted changes; the commit named does not hold the code that ran",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
