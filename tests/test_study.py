"""vae/study.py: a grid of runs that survives being killed, and its tables."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from support import REPO, subprocess_env
from vae.tools.stats import mean_std
from vae.study import tables


def study_args(tiny_data, out, epochs):
    return ["-m", "vae.study", "preset=reinmax", "estimators=[gumbel,st_gumbel]", "seeds=[0]", f"dir={out}",
            f'extra=["debug=tiny","data.root={tiny_data}","epochs={epochs}","log_interval=100"]']


def test_a_killed_study_finishes_without_retraining_finished_cells(tiny_data, tmp_path):
    out = tmp_path / "study"
    first, second = (out / "reinmax" / e / "seed0" for e in ("gumbel", "st_gumbel"))
    proc = subprocess.Popen([sys.executable, *study_args(tiny_data, out, 15)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        # Kill -9 once the first cell is done and the second has saved at least one epoch.
        while not ((first / "metrics.json").exists() and (second / "checkpoints" / "last.pt").exists()):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    time.sleep(3)  # the cell's train.py got SIGTERM with its parent's death: it saves and exits
    done_before = (first / "metrics.json").read_text()
    mtime = (first / "metrics.json").stat().st_mtime_ns
    assert not (second / "metrics.json").exists() or "resumes" not in (second / "metrics.json").read_text()

    again = subprocess.run([sys.executable, *study_args(tiny_data, out, 15)], cwd=REPO, env=subprocess_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done, 1 to resume, 0 to start" in again.stdout + again.stderr
    assert (first / "metrics.json").read_text() == done_before and (first / "metrics.json").stat().st_mtime_ns == mtime
    resumed = json.loads((second / "metrics.json").read_text())
    assert resumed["epochs"] == 15 and resumed.get("resumes")  # continued from its checkpoint, not restarted
    result = json.loads((out / "results.json").read_text())
    assert {r["estimator"]: r["n"] for r in result["rows"]} == {"gumbel": 1, "st_gumbel": 1}
    assert (out / "reinmax.png").is_file() and "| `gumbel` |" in (out / "results.md").read_text()
    # Run once more: nothing left to train.
    listed = subprocess.run([sys.executable, *study_args(tiny_data, out, 15), "action=list"], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert listed.stdout.count("done ") == 2, listed.stdout + listed.stderr


def test_the_table_shows_mean_std_n_and_the_published_number_ranked_by_the_discrete_elbo():
    def row(est, values, published=None):
        mean, std = mean_std(values)
        return {"protocol": "reinmax-10x30", "estimator": est, "n": len(values), "planned": 3, "epochs": 160,
                "test_elbo_discrete": {"mean": mean, "std": std, "n": len(values), "values": values},
                "test_loss": {"mean": 0.0, "std": 0.0, "n": 1, "values": [0.0]},  # relaxed: never ranks
                "published": published}

    text = tables([row("st_gumbel", [103.0, 104.0, 105.0]),
                   row("reinmax", [101.0, 102.0], {"value": 100.49, "source": "Wang & Bui (2026)"})])
    lines = [ln for ln in text.splitlines() if ln.startswith("| `")]
    assert lines[0].startswith("| `reinmax` | 101.50 ± 0.71 | 2 of 3 | 100.49 | Wang & Bui (2026) |")
    assert lines[1].startswith("| `st_gumbel` | 104.00 ± 1.00 | 3 |")


def test_unknown_settings_and_bad_grids_are_refused_before_anything_runs(tmp_path):
    for bad, message in ((["shapes=[3x3]"], "not shapes"), (["preset=nope"], "not a preset"),
                         (['extra=["lattent_dim=3"]'], "lattent_dim"), (["estimators=[nope]"], "estimator")):
        r = subprocess.run([sys.executable, "-m", "vae.study", f"dir={tmp_path}", *bad], cwd=REPO,
                           env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and message in r.stderr + r.stdout and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())
