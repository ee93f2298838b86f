#!/usr/bin/env python3
"""Re-check a result file (docs/results/README.md): evaluate its checkpoint again with `python -m vae.evaluate`,
with the settings the file records (k, chunk, batches, seed, device type), and compare every number.

    python scripts/check_result.py docs/results/<name>.json
    python scripts/check_result.py docs/results/<name>.json --checkpoint ~/runs/last.pt --data-root ~/mnist
    python scripts/check_result.py docs/results/<gpu-result>.json --device cpu --abs-tol 0.2   # other noise: a tolerance

Exit status: 0 every number agrees, or the checkpoint is not here (then only the file itself was checked, and the
output says the numbers were NOT re-evaluated; --require-checkpoint makes that an error); 1 a number differs, or
the checkpoint is not the file the result was made from (sha256); 2 the result file, the settings or the
evaluation itself is unusable.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_result import sha256  # noqa: E402  (one implementation, beside this script)

REPO = Path(__file__).resolve().parent.parent
FORMAT = "gumbel-vae-result/1"
METRICS = ("loss", "bce", "kl", "elbo_discrete", "iw_bound")
SETTINGS = ("iw_samples", "iw_chunk", "batch_size", "seed", "device")
# Facts about the checkpoint that the evaluation reports again: they must not change at all.
CONTEXT = (("checkpoint", "epoch", "epoch"), ("checkpoint", "step", "step"), ("evaluate", "tau", "tau"),
           ("evaluate", "hard", "hard"), ("evaluate", "n_images", "n_images"))


class Unusable(Exception):
    pass


def check_structure(result: dict) -> None:
    if not isinstance(result, dict) or result.get("format") != FORMAT:
        raise Unusable(f"not a result file (format {FORMAT!r} expected)")
    missing = [k for k in ("metrics", "command", "commit", "hardware", "date", "checkpoint", "evaluate", "tolerance")
               if k not in result]
    if missing:
        raise Unusable(f"lacks {', '.join(missing)}")
    ckpt = result["checkpoint"]
    if not (ckpt.get("path") or ckpt.get("sha256")):
        raise Unusable("names no checkpoint (path or sha256)")
    settings = result["evaluate"].get("settings", {})
    if any(k not in settings for k in SETTINGS):
        raise Unusable(f"evaluate.settings must give {', '.join(SETTINGS)}")
    bad = [k for k in METRICS if not isinstance(result["metrics"].get(k), (int, float))
           or not math.isfinite(result["metrics"][k])]
    if bad:
        raise Unusable(f"metrics {', '.join(bad)} missing or not finite numbers")


def find_checkpoint(result: dict, result_path: Path, given) -> Path:
    if given is not None:
        return Path(given).expanduser()
    path = Path(result["checkpoint"].get("path") or "")
    for candidate in ((path,) if path.is_absolute() else (REPO / path, result_path.parent / path)):
        if str(path) and candidate.is_file():
            return candidate
    return REPO / path if not path.is_absolute() else path


def evaluate_again(checkpoint: Path, settings: dict, device: str, data_root, timeout: float) -> dict:
    """`python -m vae.evaluate` on a link to the checkpoint in a scratch directory: its outputs (metrics JSON,
    images) go there, not beside the checkpoint, whose own evaluation may be what the result was made from."""
    with tempfile.TemporaryDirectory(prefix="check-result-") as tmp:
        link = Path(tmp) / checkpoint.name
        try:
            link.symlink_to(checkpoint.resolve())
        except OSError:
            import shutil

            shutil.copyfile(checkpoint, link)
        args = [f"checkpoint={link}", *(f"{k}={settings[k]}" for k in SETTINGS if k != "device"), f"device={device}"]
        if data_root is not None:
            args.append(f"data_root={data_root}")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        print("$ python -m vae.evaluate " + " ".join(args), flush=True)
        proc = subprocess.run([sys.executable, "-m", "vae.evaluate", *args], cwd=tmp, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0:
            raise Unusable(f"the evaluation failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
        return json.loads((Path(tmp) / f"{link.stem}.metrics.json").read_text())


def compare(result: dict, again: dict, abs_tol: float, rel_tol: float) -> list:
    """Rows (name, recorded, re-evaluated, ok) for every metric either side has, and the checkpoint's facts."""
    rows = []
    for name in sorted(set(result["metrics"]) | set(again["metrics"])):
        a, b = result["metrics"].get(name), again["metrics"].get(name)
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= abs_tol + rel_tol * abs(b)
        rows.append((f"metrics.{name}", a, b, ok))
    for section, key, their_key in CONTEXT:
        a, b = result[section].get(key), again.get(their_key)
        if a is not None:
            rows.append((f"{section}.{key}", a, b, a == b))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="a result file, e.g. docs/results/<name>.json")
    p.add_argument("--checkpoint", help="where the checkpoint is here (default: the path the file records)")
    p.add_argument("--data-root", help="where the dataset is here (default: the checkpoint's data.root)")
    p.add_argument("--device", help="cpu | cuda (default: the device type the file records)")
    p.add_argument("--abs-tol", type=float, help="nats (default: the file's tolerance)")
    p.add_argument("--rel-tol", type=float, help="relative (default: the file's tolerance)")
    p.add_argument("--require-checkpoint", action="store_true", help="fail when the checkpoint is not here")
    p.add_argument("--timeout", type=float, default=3600, help="seconds for the evaluation")
    a = p.parse_args(argv)
    try:
        result = json.loads(a.result.read_text())
        check_structure(result)
    except (OSError, ValueError, Unusable) as e:
        print(f"error: {a.result}: {e}", file=sys.stderr)
        return 2
    print(f"{a.result}: {result.get('name', '')} | commit {result['commit'][:12]} | {result['date']}")
    print(f"  made by: {result['command']}")

    checkpoint = find_checkpoint(result, a.result, a.checkpoint)
    if not checkpoint.is_file():
        message = f"checkpoint {checkpoint} is not here: the file is well formed, its numbers were NOT re-evaluated"
        if a.require_checkpoint:
            print(f"error: {message}", file=sys.stderr)
            return 2
        print(f"SKIPPED: {message} (pass --checkpoint PATH)")
        return 0
    want = result["checkpoint"].get("sha256")
    if want:
        got = sha256(checkpoint)
        if got != want:
            print(f"MISMATCH: {checkpoint} has sha256 {got}, the result was made from {want}")
            return 1

    settings = result["evaluate"]["settings"]
    recorded_device = str(settings["device"]).split(":")[0]
    device = a.device or recorded_device
    tol = result["tolerance"]
    abs_tol = a.abs_tol if a.abs_tol is not None else float(tol.get("abs", 0.0))
    rel_tol = a.rel_tol if a.rel_tol is not None else float(tol.get("rel", 0.0))
    if device.split(":")[0] != recorded_device and a.abs_tol is None and a.rel_tol is None:
        print(f"error: the result was evaluated on {recorded_device}; on {device} the Gumbel noise comes from another "
              "random generator, so the numbers differ by Monte Carlo error: state a tolerance (--abs-tol, in nats)",
              file=sys.stderr)
        return 2
    try:
        again = evaluate_again(checkpoint, settings, device, a.data_root, a.timeout)
    except (Unusable, subprocess.TimeoutExpired, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    rows = compare(result, again, abs_tol, rel_tol)
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'recorded':>22}  {'re-evaluated':>22}")
    for name, recorded, fresh, ok in rows:
        print(f"{name:<{width}}  {recorded!s:>22}  {fresh!s:>22}  {'ok' if ok else 'MISMATCH'}")
    bad = [r[0] for r in rows if not r[3]]
    tolerance = "exactly" if abs_tol == rel_tol == 0 else f"within {abs_tol:g} nats + {rel_tol:g} relative"
    if bad:
        print(f"MISMATCH: {', '.join(bad)} (compared {tolerance}; evaluated on {again.get('device_name')}, the result "
              f"on {result['hardware'].get('evaluate_device_name')} / {result['hardware'].get('cpu')})")
        return 1
    print(f"OK: {len(rows)} numbers agree {tolerance} ({again.get('device_name')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
