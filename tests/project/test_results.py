"""Result files (docs/results/README.md): made from a run by scripts/make_result.py, re-checked by
scripts/check_result.py, which evaluates the checkpoint again and must notice any changed number."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from support import REPO, subprocess_env, train_in_process


def script(name, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def result_file(tiny_data, tmp_path_factory):
    """A tiny run, its evaluation and the result file made from them."""
    from vae.evaluate import EvaluateConfig, evaluate

    tmp = tmp_path_factory.mktemp("result")
    run_dir = tmp / "run"
    metrics = train_in_process(tiny_data, run_dir, "epochs=1", "latent_dim=4")
    # What Hydra writes for `python train.py <overrides>` (an in-process run has no .hydra/).
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(metrics["overrides"]), run_dir / ".hydra" / "overrides.yaml")
    evaluate(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(run_dir / "checkpoints" / "last.pt"), "iw_samples": 10, "iw_chunk": 5,
        "batch_size": 50, "device": "cpu"}))
    out = tmp / "result.json"
    proc = script("make_result.py", run_dir, "--name", "tiny", "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, run_dir


def test_make_result_records_what_a_reader_needs(result_file):
    out, run_dir = result_file
    r = json.loads(out.read_text())
    assert r["format"] == "gumbel-vae-result/1" and r["name"] == "tiny"
    assert r["command"].startswith("python train.py debug=tiny ") and "latent_dim=4" in r["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert r["commit"] == head and isinstance(r["dirty"], bool)
    assert r["hardware"]["evaluate_device"] == "cpu" and r["hardware"]["torch"] and r["date"]
    assert r["checkpoint"]["path"] == str(run_dir / "checkpoints" / "last.pt")  # outside the repository: absolute
    assert len(r["checkpoint"]["sha256"]) == 64 and r["checkpoint"]["step"] == 6
    assert r["evaluate"]["settings"] == {"iw_samples": 10, "iw_chunk": 5, "batch_size": 50, "seed": 0,
                                         "device": "cpu"}
    assert set(r["metrics"]) == {"loss", "bce", "kl", "elbo_discrete", "iw_bound"}
    assert all(math.isfinite(v) for v in r["metrics"].values())
    assert r["tolerance"]["abs"] == r["tolerance"]["rel"] == 0  # a CPU evaluation: exact
    assert r["training"]["step"] == 6 and "test_loss" in r["training"]


def test_check_result_passes_then_catches_a_changed_number(result_file, tmp_path):
    out, _ = result_file
    proc = script("check_result.py", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK:" in proc.stdout and "python -m vae.evaluate" in proc.stdout

    r = json.loads(out.read_text())
    r["metrics"]["iw_bound"] += 1e-9  # exact comparison: the last digits count
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(r))
    proc = script("check_result.py", tampered)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    mismatched = [line for line in proc.stdout.splitlines() if line.endswith("MISMATCH")]
    assert len(mismatched) == 1 and mismatched[0].startswith("metrics.iw_bound"), proc.stdout


def test_check_result_without_the_right_checkpoint(result_file, tmp_path):
    out, _ = result_file
    r = json.loads(out.read_text())
    # Another file than the one the result was made from: refused before any evaluation.
    wrong = dict(r, checkpoint=dict(r["checkpoint"], sha256="0" * 64))
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    proc = script("check_result.py", tmp_path / "wrong.json")
    assert proc.returncode == 1 and "sha256" in proc.stdout, proc.stdout + proc.stderr
    # No checkpoint here: said loudly, not an error unless required.
    gone = dict(r, checkpoint=dict(r["checkpoint"], path=str(tmp_path / "elsewhere" / "last.pt")))
    (tmp_path / "gone.json").write_text(json.dumps(gone))
    proc = script("check_result.py", tmp_path / "gone.json")
    assert proc.returncode == 0 and "NOT re-evaluated" in proc.stdout, proc.stdout + proc.stderr
    proc = script("check_result.py", tmp_path / "gone.json", "--require-checkpoint")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # Another device type draws other noise: refused without a stated tolerance.
    proc = script("check_result.py", out, "--device", "cuda")
    assert proc.returncode == 2 and "tolerance" in proc.stderr, proc.stdout + proc.stderr
    # A file that is not a result.
    (tmp_path / "bad.json").write_text(json.dumps({"metrics": {}}))
    assert script("check_result.py", tmp_path / "bad.json").returncode == 2
