"""`python -m vae.bench` on tiny generated data: rows, JSON, skipped modes, settings. Never timing assertions:
the figures belong in the README, taken on a quiet machine."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from support import run_script, subprocess_env
from idx import make_tiny_dataset
from vae import bench as bench_mod
from vae.settings.config import CONFIG_DIR, REPO_DIR
from vae.common.errors import UserError

POSITIVE = ("images_per_s", "s_per_epoch", "seconds", "ms_per_step", "compile_s", "estimate_s",
            "speedup_vs_baseline")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    make_tiny_dataset(root, n_train=300, n_test=20, seed=0)  # 3 batches of 100 per epoch
    return root


def compose_bench(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="bench", overrides=list(overrides))


def test_command_reports_rows_and_skips_what_the_device_lacks(data_root, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "results" / "bench.json"
    # compile is left out: its first build takes about a minute on a small CPU (tests/test_gpu.py covers it).
    args = [f"data.root={data_root}", "data.verify=false", "data.download=false", "device=cpu", "threads=1",
            "steps=4", "warmup_steps=1", "rounds=2", "modes=[eager,cuda_graph]", "profile=true", "profile_steps=2",
            f"out={out}"]
    env = subprocess_env(PYTHONPATH=str(REPO_DIR))
    proc = subprocess.run([sys.executable, "-m", "vae.bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["eager", "cuda_graph", "baseline"]
    for mode in ("eager", "baseline"):
        row = rows[mode]
        assert row["status"] == "ok", row
        assert row["steps"] == 4 and row["steps_per_epoch"] == 3 and not row["extrapolated"]
        assert row["images"] == 400 and len(row["images_per_s_blocks"]) == 2
        for key in POSITIVE:
            assert math.isfinite(row[key]) and row[key] > 0, (mode, key, row[key])
        assert math.isfinite(row["loss"])
        assert row["profile"] and all(op["self_cpu_ms_per_step"] >= 0 for op in row["profile"])
    assert rows["baseline"]["speedup_vs_baseline"] == 1.0
    assert rows["cuda_graph"] == {"mode": "cuda_graph", "status": "n/a", "reason": "n/a: needs CUDA"}
    assert "| cuda_graph | n/a: needs CUDA |" in proc.stdout
    assert "| eager |" in proc.stdout and "| baseline |" in proc.stdout
    assert "10 epochs of training, default setting (eager)" in proc.stdout
    machine = result["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == 1 and machine["cpu_model"]
    assert result["settings"]["steps"] == 4 and result["default_mode"] == "eager"
    assert list(cwd.iterdir()) == []  # Hydra wrote nothing where the command ran


def test_a_mode_that_fails_to_build_is_reported_not_fatal(data_root, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = compose_bench(f"data.root={data_root}", "data.verify=false", "data.download=false", "device=cpu",
                        "steps=1", "warmup_steps=1", "rounds=1", "modes=[compile,eager]", "baseline=false", "out=null")
    result = bench_mod.bench(cfg)
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["compile"] == {"mode": "compile", "status": "failed",
                               "reason": "RuntimeError: no C++ compiler here"}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["speedup_vs_baseline"] is None


def test_defaults_are_the_trainers():
    # The bench takes the trainer's schema (and so its defaults) rather than a copy; configs/config.yaml, which
    # spells the trainer's defaults out for readers, must agree with that schema.
    bench_cfg = OmegaConf.to_container(compose_bench(), resolve=True)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        train_cfg = OmegaConf.to_container(compose(config_name="config"), resolve=True)
    shared = set(train_cfg) - {"epochs", "hydra"}
    assert {"latent_dim", "hard", "estimator", "lr", "data", "flush_denormal"} <= shared
    for key in shared:
        assert bench_cfg[key] == train_cfg[key], key
    assert bench_cfg["estimate_epochs"] == train_cfg["epochs"]
    assert bench_cfg["modes"] == ["eager", "compile", "cuda_graph", "compile+cuda_graph"] and bench_cfg["baseline"]
    assert bench_cfg["baseline_workers"] == 0


@pytest.mark.parametrize("override, key", [
    ("modes=[eager,warp]", "modes"), ("adam=sgd", "adam"), ("epochs=0", "epochs"), ("rounds=0", "rounds"),
    ("threads=0", "threads"), ("steps=0", "steps"), ("device=tpu", "device"), ("prior=gaussian", "prior"),
    ("data.binarize=yes", "data.binarize"),
])
def test_bad_settings_fail_with_one_line(override, key):
    with pytest.raises(UserError, match=f"^{key}=") as info:
        bench_mod.validate(compose_bench(override))
    assert "\n" not in str(info.value)


def test_block_sizes_split_the_steps_evenly():
    assert bench_mod.block_sizes(10, 3) == [4, 3, 3]
    assert bench_mod.block_sizes(2, 5) == [1, 1]
    assert sum(bench_mod.block_sizes(601, 4)) == 601


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_an_out_that_is_not_a_file_is_refused_before_the_benchmark(data_root, tmp_path, kind, monkeypatch):
    out = tmp_path / "out"
    os.mkfifo(out) if kind == "fifo" else out.mkdir()
    monkeypatch.setattr(bench_mod, "build_rows", lambda *a: pytest.fail("the benchmark ran"))
    cfg = compose_bench(f"data.root={data_root}", "data.verify=false", "device=cpu", f"out={out}")
    with pytest.raises(UserError, match=f"out: {out} is a {'FIFO' if kind == 'fifo' else 'directory'}, not a file"):
        bench_mod.bench(cfg)
    assert out.is_fifo() if kind == "fifo" else out.is_dir()


def test_an_out_that_cannot_be_written_is_refused_before_the_benchmark(data_root, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(bench_mod, "build_rows", lambda *a: pytest.fail("the benchmark ran"))
    cfg = compose_bench(f"data.root={data_root}", "data.verify=false", "device=cpu", f"out={blocker / 'b.json'}")
    with pytest.raises(UserError, match="out: .*b.json cannot be written"):
        bench_mod.bench(cfg)


def test_results_are_written_before_they_are_printed(data_root, tmp_path, monkeypatch):
    """`python -m vae.bench | head -1`: the reader leaves, the next print fails; the JSON must be there already."""
    out = tmp_path / "bench.json"

    def reader_gone(*a, **k):
        assert out.is_file()  # written first
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(bench_mod, "format_table", reader_gone)
    cfg = compose_bench(f"data.root={data_root}", "data.verify=false", "device=cpu", "threads=1", "steps=1",
                        "warmup_steps=1", "rounds=1", "modes=[eager]", "baseline=false", f"out={out}")
    with pytest.raises(BrokenPipeError):
        bench_mod.bench(cfg)
    assert json.loads(out.read_text())["rows"][0]["mode"] == "eager"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_runs_every_mode_on_cuda(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_script([f"data.root={tiny_data}", "data.verify=false", "device=cuda", "steps=6", "warmup_steps=3",
                       "rounds=2", "modes=[eager,compile,cuda_graph,compile+cuda_graph]", f"out={out}"],
                      script="vae.bench", timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"eager", "compile", "cuda_graph", "compile+cuda_graph", "baseline"}
    for mode, row in rows.items():
        assert row["status"] == "ok", (mode, row.get("reason"))
        assert row["images_per_s"] > 0 and row["s_per_epoch"] > 0
