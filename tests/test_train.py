"""End-to-end runs of train.py on tiny generated data: one real process (Hydra's own files, the log), the rest in
process."""
from __future__ import annotations

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from support import run_train, tiny_overrides, train_in_process

SCALARS = {"train/loss", "train/bce", "train/kl", "train/temperature", "test/loss", "test/elbo_discrete",
           "train/grad_norm", "latents/perplexity", "latents/active", "latents/confidence"}
IMAGES = {"test/reconstructions", "samples/prior", "latents/traversal", "latents/usage", "latents/class_means"}
HISTOGRAMS = {"latents/kl_per_variable", "latents/perplexity_per_variable"}


def events(run_dir):
    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    return ea


def scalar_steps(run_dir, tag):
    return [e.step for e in events(run_dir).Scalars(tag)]


@pytest.fixture(scope="module")
def hard_run(tiny_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("hard") / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "hard=true", "temperature=1.0", "epochs=2"))
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


def test_run_writes_tensorboard_checkpoints_and_metrics(hard_run):
    run_dir, proc = hard_run
    ea = events(run_dir)
    assert SCALARS <= set(ea.Tags()["scalars"])
    assert IMAGES <= set(ea.Tags()["images"])
    assert HISTOGRAMS <= set(ea.Tags()["histograms"])
    assert "custom_scalars__config__" in ea.PluginTagToContent("custom_scalars") or \
        ea.PluginTagToContent("custom_scalars")  # the layout of the Custom Scalars tab
    assert [e.step for e in ea.Scalars("train/grad_norm")] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(e.value) and e.value > 0 for e in ea.Scalars("train/grad_norm"))
    assert len(ea.Scalars("test/loss")) == 2                        # one per epoch
    assert [e.step for e in ea.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]  # 6 steps/epoch, log_interval=2
    grid = ea.Images("samples/prior")[-1]
    assert grid.width > 8 * 28 and grid.height > 8 * 28             # 64 samples in an 8x8 grid
    for tag in IMAGES:
        assert [e.step for e in ea.Images(tag)] == [6, 12], tag      # every epoch
    usage, means = ea.Images("latents/usage")[-1], ea.Images("latents/class_means")[-1]
    assert (usage.width, usage.height) == (10 * 30 + 2, 30 * 30 + 2)  # 30 variables x 10 classes, 28 px tiles
    assert (means.width, means.height) == (10 * 30 + 2, 10 * 30 + 2)  # the 10 (eval.traversal_rows) top-KL variables
    assert "_hparams_/experiment" in ea.PluginTagToContent("hparams")
    test_losses = [e.value for e in ea.Scalars("test/loss")]
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["config"]["hard"] is True and ckpt["config"]["temperature"] == 1.0
        assert {"shuffle", "noise", "eval"} <= set(ckpt["rng"])
        if name == "last.pt":
            assert ckpt["step"] == 12 and ckpt["epoch"] == 2
        else:  # the epoch with the lowest test loss
            assert ckpt["epoch"] == 1 + test_losses.index(min(test_losses))
            assert ckpt["test_loss"] == pytest.approx(min(test_losses))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert math.isfinite(metrics["test_loss"]) and "hard=true" in metrics["overrides"]
    assert metrics["train_seconds"] > 0 and metrics["build_seconds"] >= 0
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert "epoch 2/2" in (run_dir / "train.log").read_text()


def test_tau_follows_the_global_step_across_epochs(tiny_data, tmp_path):
    # anneal every 2 steps at a visible rate; the logged temperature must keep falling into epoch 2
    run_dir = tmp_path / "run"
    train_in_process(tiny_data, run_dir, "epochs=2", "anneal_rate=0.05", "anneal_interval=2", "temp_min=0.1")
    taus = [(e.step, e.value) for e in events(run_dir).Scalars("train/temperature")]
    for step, value in taus:
        # logged after `step` steps, during which the last update was at step - 1 rounded down to the interval
        t = (step - 1) - (step - 1) % 2
        assert value == pytest.approx(max(0.1, math.exp(-0.05 * t)), rel=1e-6)
    assert taus[-1][1] < taus[2][1] < taus[0][1]


def test_resume_continues_from_the_saved_step(hard_run, tiny_data, tmp_path):
    run_dir, _ = hard_run
    # copy the finished 2-epoch run and extend it to 3 epochs
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    train_in_process(tiny_data, tmp_path / "r2", f"resume={copy / 'checkpoints' / 'last.pt'}", "epochs=3")
    ckpt = torch.load(copy / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 18 and ckpt["epoch"] == 3
    assert ckpt["config"]["hard"] is True            # the run's own settings, not the defaults
    steps = scalar_steps(copy, "train/loss")
    assert steps == sorted(set(steps)) == list(range(2, 19, 2))    # no duplicated or missing steps
    assert scalar_steps(copy, "test/loss") == [6, 12, 18]


@pytest.mark.parametrize("estimator", ["gumbel", "st_gumbel", "st", "annealed_st", "sf", "rloo", "muprop",
                                       "gumbel_rao", "reinmax", "exact"])
def test_every_estimator_trains_through_train_py(tiny_data, tmp_path, estimator):
    # exact enumerates K^N codes: a small code space (4^3 = 64) keeps it a test.
    small = ["latent_dim=3", "categorical_dim=4"] if estimator == "exact" else []
    metrics = train_in_process(tiny_data, tmp_path / "run", f"estimator={estimator}", *small)
    assert math.isfinite(metrics["test_loss"]) and math.isfinite(metrics["test_elbo_discrete"])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["estimator"] == estimator
    if estimator in ("sf", "muprop"):  # the moving-average baseline goes into the checkpoint (exact resume)
        assert ckpt["estimator"]["baseline"].dim() == 0 and bool(ckpt["estimator"]["initialised"])


@pytest.mark.parametrize("estimator", ["sf", "rloo"])
def test_resume_is_bit_exact_for_an_estimator_with_state(tiny_data, tmp_path, estimator):
    # sf keeps a moving-average baseline, rloo draws several samples per image: both must continue exactly.
    train_in_process(tiny_data, tmp_path / "whole", f"estimator={estimator}", "epochs=2")
    train_in_process(tiny_data, tmp_path / "split", f"estimator={estimator}", "epochs=1")
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    train_in_process(tiny_data, tmp_path / "r2", f"resume={last}", "epochs=2")
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["step"] == whole["step"] == 12
    assert all(torch.equal(whole["model"][k], resumed["model"][k]) for k in whole["model"])
    assert all(torch.equal(whole["estimator"][k], resumed["estimator"][k]) for k in whole["estimator"])


def test_a_closed_stdout_costs_no_result(tiny_data, tmp_path):
    """`python train.py | head -1`: the reader leaves; the run goes on, quietly, and writes everything."""
    import os
    import subprocess
    import sys

    from support import REPO, subprocess_env

    run_dir = tmp_path / "run"
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "train.py", *tiny_overrides(tiny_data, run_dir)], cwd=REPO,
                              stdout=write, stderr=subprocess.PIPE, text=True, env=subprocess_env(), timeout=240)
    finally:
        os.close(write)
    assert proc.returncode == 0, proc.stderr
    assert "Logging error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert (run_dir / "metrics.json").is_file() and "done: test loss" in (run_dir / "train.log").read_text()


def test_checkpoints_record_the_md5s_of_the_test_files(hard_run, tiny_data):
    from idx import md5_sums

    run_dir, _ = hard_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    sums = md5_sums(tiny_data / "MNIST" / "raw")
    assert ckpt["data_md5"] == {k: sums[k] for k in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
