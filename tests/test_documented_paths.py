"""Paths the README promises, run through train.py (in process): exact resume with binarized data and a learned
prior, the importance-weighted bound at the end of training, and the paper preset's values."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from support import compose_train, train_in_process
from test_train import events


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


@pytest.mark.parametrize("binarize", ["dynamic", "static"])
def test_resume_mid_epoch_is_bitwise_identical(tiny_data, tmp_path, monkeypatch, binarize):
    """Stopped by SIGTERM at step 9 (epoch 2, step 3 of 6; between two train/* scalars), resumed, it ends exactly
    as the run that was never stopped: weights, learned prior, Adam's state, logged values."""
    settings = ("epochs=2", "prior=learned", f"data.binarize={binarize}", "data.binarize_seed=3",
                "anneal_interval=2", "anneal_rate=0.05")
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


def test_paper_preset_values():
    """configs/experiment/paper.yaml is the setting of Jang et al. (2017), section 4.2; the README's table of
    results is only reproducible with exactly these values."""
    cfg = compose_train("experiment=paper")
    assert (cfg.latent_dim, cfg.categorical_dim, cfg.prior) == (20, 10, "learned")
    assert cfg.data.binarize == "static" and cfg.data.binarize_seed == 0
    assert (cfg.temperature, cfg.temp_min, cfg.anneal_rate, cfg.anneal_interval) == (1.0, 0.5, 1e-4, 1000)
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (100, 100, 1e-3)
    assert cfg.hard is False and cfg.estimator == "gumbel"
    # the documented variants: ST Gumbel-softmax on top of the preset, and the command line still wins
    cfg = compose_train("experiment=paper", "hard=true", "epochs=3")
    assert cfg.hard is True and cfg.epochs == 3 and cfg.latent_dim == 20 and cfg.prior == "learned"
