"""End-to-end runs of train.py on tiny generated data: in process, or as a real process where one is needed (Hydra's
own files, the log, signals). Also the paths the README promises (exact resume, the importance-weighted bound at the
end of training) and how a run ends when it must stop (a signal, a non-finite loss, out of memory)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from idx import make_tiny_dataset
from support import (REPO, copy_run, interrupt_during, logged_past, long_overrides, run_train, subprocess_env,
                     tiny_overrides, train_in_process)
from vae.common.errors import UserError
from vae.training import checkpoint as ckpt_io

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


# --- paths the README promises, run in process ---------------------------------------------------------------

def stop_after(monkeypatch, step: int, sig=signal.SIGTERM) -> None:
    """Make the next in-process run receive `sig` once it has taken `step` steps: train.py's own handler (StopFlag)
    then stops it after that step, saves a checkpoint and exits with 128 + sig, as `kill -TERM` would make it."""
    import train as train_script

    class SignalAfter(train_script.ProgressBar):
        def on_step(self, trainer):
            super().on_step(trainer)
            if trainer.state.step == step:
                # without train.py's handler the signal would end pytest itself
                assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.SIG_IGN, None), "no handler for the signal"
                os.kill(os.getpid(), sig)

    monkeypatch.setattr(train_script, "ProgressBar", SignalAfter)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def scalars(run_dir, tag):
    return [(e.step, e.value) for e in events(run_dir).Scalars(tag)]


@pytest.mark.parametrize("binarize, lr_schedule", [("dynamic", "constant"), ("static", "cosine")])
def test_resume_mid_epoch_is_bitwise_identical(tiny_data, tmp_path, monkeypatch, binarize, lr_schedule):
    """Stopped by SIGTERM at step 9 (epoch 2, step 3 of 6; between two train/* scalars), resumed, it ends exactly
    as the run that was never stopped: weights, learned prior, Adam's state (its learning rate), logged values."""
    settings = ("epochs=2", "prior=learned", f"data.binarize={binarize}", "data.binarize_seed=3",
                "anneal_interval=2", "anneal_rate=0.05", f"lr_schedule={lr_schedule}")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train_in_process(tiny_data, straight, *settings)

    stop_after(monkeypatch, 9)
    with pytest.raises(SystemExit) as stopped:
        train_in_process(tiny_data, broken, *settings)
    assert stopped.value.code == 143
    monkeypatch.undo()
    ckpt = load(broken / "checkpoints" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["epoch_step"]) == (9, 1, 3)
    assert ckpt["interval_sums"].abs().sum() > 0  # a half-done train/* interval is carried over

    train_in_process(tiny_data, tmp_path / "unused", f"resume={broken / 'checkpoints' / 'last.pt'}")
    a, b = load(straight / "checkpoints" / "last.pt"), load(broken / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    assert a["config"]["data"]["binarize"] == b["config"]["data"]["binarize"] == binarize
    assert not torch.equal(a["model"]["prior_logits"], torch.zeros_like(a["model"]["prior_logits"]))  # learned
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(b["optimizer"]["state"][i][k], v), (i, k)
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    for name, state in a["rng"].items():
        assert torch.equal(b["rng"][name], state), name
    for tag in ("train/loss", "train/temperature", "test/loss", "test/elbo_discrete"):
        assert scalars(straight, tag) == scalars(broken, tag), tag


@torch.no_grad()
def exact_nll(model, x) -> float:
    """-log p(x) = -log sum_z p(x|z) p(z), mean over the images x [B, 784], by enumerating every code (few here).
    From the formulas, not from vae.core.metrics: log p(x|z) = sum_pixels x l - softplus(l) for decoder logits l."""
    import itertools

    import torch.nn.functional as F

    n, k = model.latent_dim, model.categorical_dim
    codes = torch.stack([F.one_hot(torch.tensor(c), k) for c in itertools.product(range(k), repeat=n)]).float()
    logits = model.decode(codes)[:, None, :]                                    # [codes, 1, 784]
    log_px_z = (x * logits - F.softplus(logits)).sum(-1)                        # [codes, B]
    log_pz = (codes * model.log_prior()).sum((-2, -1))[:, None]                 # [codes, 1]
    return -torch.logsumexp(log_px_z + log_pz, 0).double().mean().item()


def test_iw_bound_at_the_end_of_training(tiny_data, tmp_path):
    from omegaconf import OmegaConf

    from vae.evaluate import EvaluateConfig, build_model, data_config, evaluate, load_test_split

    run_dir = tmp_path / "run"
    # 2 variables of 3 classes: 9 codes, so -log p(x) of the trained model is known exactly
    m = train_in_process(tiny_data, run_dir, "epochs=1", "latent_dim=2", "categorical_dim=3", "prior=learned",
                         "eval.iw_samples=20", "eval.iw_chunk=8")
    iw, elbo = m["test_iw_bound"], m["test_elbo_discrete"]
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = load(last)
    test = load_test_split(data_config(ckpt, last, None), torch.device("cpu"))
    nll = exact_nll(build_model(ckpt, last), torch.cat(list(test.batches(100))))
    # -log p(x) <= E[IW bound, k=20] <= discrete -ELBO. Over 100 images the estimates' noise is a small fraction
    # of a nat; a missing log k would put the bound log 20 = 3.0 nats low, below -log p(x).
    assert math.isfinite(iw) and nll - 0.2 < iw <= elbo + 0.5, (nll, iw, elbo)
    logged = scalars(run_dir, "test/iw_bound")
    assert logged == [(m["step"], pytest.approx(iw, rel=1e-6))]
    # The number `python -m vae.evaluate` gives for the final checkpoint with the same k, chunk, batches and seed.
    again = evaluate(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(last), "iw_samples": 20, "iw_chunk": 8, "batch_size": 50, "seed": 0, "device": "cpu"}))
    assert again["metrics"]["iw_bound"] == iw
    assert again["metrics"]["loss"] == m["test_loss"] and again["metrics"]["elbo_discrete"] == elbo


# --- signals, a non-finite loss, out of memory: a run that must stop keeps what is done --------------------------

@pytest.fixture(scope="module")
def long_data(tmp_path_factory):
    """Enough images for 500 steps per epoch at batch_size=4: time to land a signal mid-epoch."""
    root = tmp_path_factory.mktemp("long")
    make_tiny_dataset(root, n_train=2000, n_test=40, seed=1)
    return root


def model_of(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_sigterm_mid_epoch_then_resume_is_bitwise_identical(long_data, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    proc = run_train(long_overrides(long_data, straight, "epochs=4"))
    assert proc.returncode == 0, proc.stderr

    proc = interrupt_during(long_overrides(long_data, broken, "epochs=4"), "epoch 1/4", signal.SIGTERM,
                            ready=logged_past(broken, 500))
    assert proc.returncode == 143, proc.stdout
    assert "resume=" in proc.stdout and "SIGTERM" in proc.stdout
    ckpt = torch.load(broken / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])

    proc = run_train([f"resume={broken / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={tmp_path / 'again'}"])
    assert proc.returncode == 0, proc.stderr
    a, b = model_of(straight / "checkpoints" / "last.pt"), model_of(broken / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # TensorBoard: the same scalar steps as the uninterrupted run, none twice
    assert scalar_steps(broken, "train/loss") == scalar_steps(straight, "train/loss")
    assert scalar_steps(broken, "test/loss") == scalar_steps(straight, "test/loss")


def test_ctrl_c_saves_and_exits_130(long_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = interrupt_during(long_overrides(long_data, run_dir, "epochs=3"), "epoch 1/3", signal.SIGINT,
                            ready=logged_past(run_dir, 500))
    assert proc.returncode == 130, proc.stdout
    assert "Traceback" not in proc.stdout
    ckpt = ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] > 0
    # Saved on the signal, mid-epoch 2: the epoch-1 checkpoint (step 500, epoch_step 0), written before the
    # signal, would satisfy the check above on its own.
    assert ckpt["epoch"] == 1 and 0 < ckpt["epoch_step"] < 500, (ckpt["epoch"], ckpt["epoch_step"])
    assert ckpt["step"] == 500 + ckpt["epoch_step"] and ckpt["step"] % 500 != 0
    # the event file was flushed and closed: the scalars written before the signal are readable
    assert scalar_steps(run_dir, "train/loss")


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    assert run_train(tiny_overrides(tiny_data, run_dir, "epochs=1")).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    proc = run_train([f"resume={last}", "epochs=3", "lr=1e30", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert "NaN" in message and "at step" in message and "lr" in message and "temp_min" in message
    assert "Traceback" not in proc.stderr
    assert last.read_bytes() == before
    assert torch.isfinite(torch.cat([v.flatten().float() for v in model_of(last).values()])).all()


CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 102400000000 bytes. Error code 12 (Cannot allocate memory)")


def test_out_of_memory_names_the_settings_that_size_it(tiny_data, tmp_path, monkeypatch):
    from vae.core import metrics
    from vae.training.trainer import Trainer

    def no_memory(*a, **k):
        raise RuntimeError(CPU_OOM)

    monkeypatch.setattr(metrics, "iw_bound", no_memory)
    with pytest.raises(UserError, match=r"out of memory in the importance-weighted bound.*eval.batch_size=50 x "
                                        r"eval.iw_chunk=100"):
        train_in_process(tiny_data, tmp_path / "iw", "eval.iw_samples=10")
    monkeypatch.setattr(Trainer, "fit", no_memory)
    with pytest.raises(UserError, match=r"out of memory while training.*batch_size=50.*latent_dim x categorical_dim"):
        train_in_process(tiny_data, tmp_path / "fit")


def test_sigterm_during_the_final_iw_bound_stops_at_once_and_keeps_what_is_done(tiny_data, tmp_path):
    # k=200000 on 100 test images takes minutes here; the stop must take seconds.
    run_dir = tmp_path / "run"
    args = tiny_overrides(tiny_data, run_dir, "epochs=1", "eval.iw_samples=200000")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, env=subprocess_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = []
    for line in proc.stdout:
        out.append(line)
        if "epoch 1/1 |" in line:  # the last log line before the bound
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rest, _ = proc.communicate(timeout=120)
    output = "".join(out) + rest
    assert time.monotonic() - t0 < 15, output
    assert proc.returncode == 143, output
    assert "Traceback" not in output
    assert "python -m vae.evaluate checkpoint=" in output
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test_loss" in metrics and "test_iw_bound" not in metrics
    assert "SIGTERM" in metrics["stopped"]
    assert ckpt_io.load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_resuming_a_finished_run_reports_its_own_numbers_and_keeps_its_metrics(finished_run, tiny_data, tmp_path,
                                                                               caplog):
    from omegaconf import OmegaConf

    import train as train_script
    from support import compose_train
    from hydra.core.hydra_config import HydraConfig
    from vae.evaluate import EvaluateConfig, evaluate

    run_dir = copy_run(finished_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)
    assert saved["tau"] < 1.0  # annealed: a test pass at the schedule's start would differ
    before = (run_dir / "metrics.json").read_text()
    original = json.loads(before)

    cfg = compose_train("debug=tiny", f"data.root={tiny_data}", f"hydra.run.dir={tmp_path / 'r2'}", f"resume={last}",
                        run_dir=tmp_path / "r2")
    HydraConfig.instance().set_config(cfg)
    try:
        with caplog.at_level("INFO", logger="train"):
            loss = train_script.train(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    finally:
        HydraConfig.instance().cfg = None
    assert loss == original["test_loss"]                      # the saved tau, the saved weights: the same number
    assert (run_dir / "metrics.json").read_text() == before  # its overrides and timings are the run's own
    assert "metrics.json kept as it was" in caplog.text
    # ... and vae.evaluate scores the same checkpoint the same way (same batches, same seed)
    result = evaluate(OmegaConf.merge(OmegaConf.structured(EvaluateConfig), {
        "checkpoint": str(last), "device": "cpu", "batch_size": 50, "iw_samples": 2}))
    assert result["tau"] == saved["tau"] and result["metrics"]["loss"] == pytest.approx(loss, rel=1e-6)


def test_divergence_before_the_first_checkpoint_says_none_was_written(tiny_data, tmp_path):
    from vae.common.errors import TrainingDiverged

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train_in_process(tiny_data, run_dir, "lr=1e30")
    assert str(e.value).endswith("no checkpoint had been written yet") and "was kept" not in str(e.value)
    assert not (run_dir / "checkpoints" / "last.pt").exists()
