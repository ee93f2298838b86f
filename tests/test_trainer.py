"""vae/training/trainer.py through train.py on tiny data: model selection on the validation split, the optimizer group,
the model group, and your own data end to end (train, evaluate, sample, resume).

Also: vae/training/trainer.py: a loss that explodes, to NaN or to huge finite values, is divergence, and saves nothing.
A C++ compiler that fails costs compile=true a warning, never the run. The step consumes the scheduled temperature."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import vae.training.trainer
from support import compose_train, run_script, run_train, tiny_overrides, train_in_process
from vae.common.errors import TrainingDiverged
from vae.core.schedule import temperature_at
from vae.training.engine import TrainStep
from vae.training.trainer import Trainer, training_sizes


def best_epoch(run_dir):
    return torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["epoch"]


@pytest.fixture
def adversarial_test_set(monkeypatch):
    """Test losses that get worse every epoch and validation losses that get better, whatever the model does:
    choosing best.pt by the test loss keeps epoch 1, by the validation loss the last epoch."""
    import vae.training.trainer

    real = vae.training.trainer.metrics.evaluate_split
    calls = []

    def evaluate_split(model, split, **kw):
        result = real(model, split, **kw)
        if split.n == 100:  # the tiny test set (the validation split has 60 images)
            calls.append("test")
            result = {**result, "loss": 1000.0 + len(calls)}
        else:
            calls.append("val")
            result = {**result, "loss": 1000.0 - len(calls)}
        return result

    monkeypatch.setattr(vae.training.trainer.metrics, "evaluate_split", evaluate_split)
    return calls


def test_best_pt_is_chosen_on_the_validation_split_not_the_test_set(tiny_data, tmp_path, adversarial_test_set):
    m = train_in_process(tiny_data, tmp_path / "val", "epochs=3", "data.val_size=60")
    assert "val" in adversarial_test_set and m["best_val_loss"] <= m["val_loss"]
    assert best_epoch(tmp_path / "val") == 3  # the validation loss fell; the test loss only rose


def test_without_a_validation_split_best_pt_follows_the_test_loss(tiny_data, tmp_path, adversarial_test_set):
    """The same adversarial test set decides when there is no validation split: the test above can fail."""
    m = train_in_process(tiny_data, tmp_path / "noval", "epochs=3", "data.val_size=0")
    assert best_epoch(tmp_path / "noval") == 1 and "val_loss" not in m


def test_radam_trains_resumes_bit_exactly_and_is_kept_on_resume(tiny_data, tmp_path):
    from vae.common.errors import UserError

    args = ("optimizer=radam", "estimator=reinmax", "temperature=1.3", "temp_min=1.3", "lr=5e-4")
    straight = train_in_process(tiny_data, tmp_path / "a", *args, "epochs=2")
    train_in_process(tiny_data, tmp_path / "b", *args, "epochs=1")
    resumed = train_in_process(tiny_data, tmp_path / "b2", f"resume={tmp_path / 'b' / 'checkpoints' / 'last.pt'}",
                               "epochs=2")
    assert resumed["test_loss"] == straight["test_loss"]
    wa, wb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(wa["model"][k], wb["model"][k]) for k in wa["model"])
    assert "exp_avg" in wa["optimizer"]["state"][0]
    with pytest.raises(UserError, match="another optimizer"):
        train_in_process(tiny_data, tmp_path / "c", f"resume={tmp_path / 'b' / 'checkpoints' / 'last.pt'}",
                         "optimizer=adam", "epochs=3")


def test_cosine_lr_schedule_reaches_the_optimizer_and_is_logged(tiny_data, tmp_path):
    """(Its bit-exact resume mid-epoch: tests/test_train.py test_resume_mid_epoch_is_bitwise_identical.)"""
    from tb_events import steps_on_disk
    from vae.core.schedule import lr_at

    args = ("lr_schedule=cosine", "lr=2e-3", "log_interval=1")
    straight = train_in_process(tiny_data, tmp_path / "a", *args, "epochs=2")
    constant = train_in_process(tiny_data, tmp_path / "k", "lr=2e-3", "epochs=2")
    assert straight["test_loss"] != constant["test_loss"]  # the schedule reached the optimizer
    last = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)
    total = last["step"]
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(
        lr_at(total - 1, lr=2e-3, schedule="cosine", total_steps=total))  # the last step's, near 0
    assert steps_on_disk(tmp_path / "a", "train/lr") == list(range(1, total + 1))
    assert steps_on_disk(tmp_path / "k", "train/lr") == []  # a constant lr is the `lr` setting itself


def test_conv_model_trains_and_resumes_bit_exactly(tiny_data, tmp_path):
    straight = train_in_process(tiny_data, tmp_path / "a", "model=conv", "epochs=2")
    train_in_process(tiny_data, tmp_path / "b", "model=conv", "epochs=1")
    resumed = train_in_process(tiny_data, tmp_path / "b2", f"resume={tmp_path / 'b' / 'checkpoints' / 'last.pt'}",
                               "epochs=2")
    assert resumed["test_loss"] == straight["test_loss"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["epochs"] == 2


@pytest.fixture
def own_data(tmp_path):
    """A 32 x 32 .npy and a folder of 20 x 24 PNGs in two class subfolders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    np.save(tmp_path / "blobs.npy", (rng.random((240, 32, 32)) > 0.7).astype(np.float32))
    for i in range(150):
        d = tmp_path / "glyphs" / "ab"[i % 2]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(d / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("data, path, title, shape", [("array", "blobs.npy", "blobs", (32, 32)),
                                                       ("folder", "glyphs", "glyphs", (20, 24))])
def test_own_data_trains_evaluates_samples_and_resumes_with_its_own_name(own_data, tmp_path, data, path, title,
                                                                          shape, caplog):
    from vae.api import load

    caplog.set_level(logging.INFO, logger="train")
    run = tmp_path / f"run-{data}"
    args = (f"data={data}", f"data.path={own_data / path}", "data.val_size=0.2", "batch_size=20")
    m = train_in_process(own_data, run, *args, "epochs=1")
    assert f"{title}: " in caplog.text and f"images of {shape[0]}x{shape[1]}" in caplog.text
    model = load(run / "checkpoints" / "last.pt")
    assert model.image_shape == shape and model.sample(3).shape == (3, *shape)
    x = model.test_images(4)
    assert x.shape == (4, *shape) and model.elbo(x).shape == (4,)
    scored = run_script([f"checkpoint={run / 'checkpoints' / 'last.pt'}", "iw_samples=5", "batch_size=50",
                         "device=cpu", "threads=1"], script="vae.evaluate")
    assert scored.returncode == 0, scored.stderr[-2000:]
    result = json.loads((run / "checkpoints" / "last.metrics.json").read_text())
    assert result["n_images"] == len(model.test_images()) and (run / "checkpoints" / "last.usage.png").is_file()
    resumed = train_in_process(own_data, tmp_path / "x", f"resume={run / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert resumed["epochs"] == 2 and m["epochs"] == 1


@pytest.fixture
def run_dir(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(tiny_data, run_dir)
    return run_dir


def saved(run_dir):
    return (run_dir / "checkpoints" / "last.pt").read_bytes(), (run_dir / "metrics.json").read_bytes()


def test_a_training_loss_exploding_to_huge_finite_values_is_divergence(tiny_data, run_dir, monkeypatch):
    before = saved(run_dir)
    build = Trainer._build_step

    def exploding(self):  # every step's loss, bce and kl x 1e35: about 5e37, finite in float32
        build(self)
        step = self.step_fn
        self.step_fn = lambda *a: (lambda stats, norm: (stats * 1e35, norm))(*step(*a))

    monkeypatch.setattr(Trainer, "_build_step", exploding)
    with pytest.raises(TrainingDiverged, match=r"exploded past 1e\+10 nats at step 7 \(epoch 2"):
        train_in_process(tiny_data, run_dir, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert saved(run_dir) == before


def test_a_test_loss_exploding_to_huge_finite_values_is_divergence(tiny_data, run_dir, monkeypatch):
    before = saved(run_dir)
    monkeypatch.setattr(Trainer, "test", lambda self, split: {"loss": 1e35, "bce": 1e35, "kl": 1.0,
                                                              "elbo_discrete": 1e35})
    with pytest.raises(TrainingDiverged, match=r"exploded past 1e\+10 nats in epoch 2"):
        train_in_process(tiny_data, run_dir, f"resume={run_dir / 'checkpoints' / 'last.pt'}", "epochs=2")
    assert saved(run_dir) == before


@pytest.mark.parametrize("overrides, first", [
    ([], "batch_size=100"),
    (["estimator=rloo", "estimator_samples=100000"], "estimator_samples=100000 (estimator=rloo's samples per image)"),
    (["estimator=gumbel_rao"], "estimator_samples=10 (estimator=gumbel_rao's samples per image)"),
    (["estimator=exact", "latent_dim=4", "categorical_dim=4"], "the K^N = 4^4 codes of estimator=exact"),
])
def test_an_out_of_memory_hint_names_what_sizes_the_step_first(overrides, first):
    cfg = compose_train(*overrides)
    assert training_sizes(cfg).startswith(first)


def test_a_compiler_that_fails_falls_back_to_eager(tiny_data, tmp_path):
    # torch.compile on a CPU needs a C++ compiler; a broken one must cost a warning, never the run. (A fresh
    # Inductor cache, or a cached kernel from an earlier run would hide the broken compiler.)
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, "epochs=1", "compile=true"),
                     env_extra={"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stderr
    assert "compile=true failed here" in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "last.pt").is_file()


# --- the temperature the training step consumes, not the one the log reports ---------------------------------------
#
# `train/temperature` and `state.tau` are Python floats; the step reads `Trainer.tau_t`, a 0-d device tensor (a
# compiled function or a captured CUDA graph keeps reading the tensor it was given). If that tensor stopped being
# updated, training would run at tau=1.0 while every logged number followed the schedule. So these tests record the
# value the step receives, at each step, through train.py (in process), across an epoch boundary and a resume.

# tau_t = max(0.1, exp(-0.2 t)), t rounded down to a multiple of 5: it moves at steps 5, 10 and 15 (to the floor).
# Epochs have 6 steps (300 images, batch 50). Run 1 trains 2 epochs (steps 0-11), crossing the epoch boundary at
# step 6 mid-interval; the resumed run trains steps 12-17. Step 12 is mid-interval as well, so the schedule does
# not move there: the step reads the tensor as the checkpoint restored it (with anneal_interval=1 every step
# would refill it and a resume that left it at 1.0 would go unseen).
SCHEDULE = dict(temperature=1.0, temp_min=0.1, anneal_rate=0.2, anneal_interval=5)
OVERRIDES = [f"{k}={v}" for k, v in SCHEDULE.items()]
EXPECTED = [temperature_at(t, **SCHEDULE) for t in range(18)]


class SpyStep(TrainStep):
    """The trainer's step, recording the tau value each training step hands to the loss (and the step's loss).

    Eager and compile: the loss function is wrapped *outside* the compiled region after construction (compile's
    warm-up step, at tau=1, is not recorded), so the record is the tensor the compiled loss reads. CUDA graph: the
    captured graph reads `static_tau`; it is read back after each replay."""

    seen: list = []
    losses: list = []

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        inner = self.loss_fn

        def loss_fn(model, x, noise, tau):
            SpyStep.seen.append(tau.item())
            return inner(model, x, noise, tau)

        self.loss_fn = loss_fn

    def __call__(self, idx, tau, grad_norm=False):
        stats, norm = super().__call__(idx, tau, grad_norm)
        if self.graph is not None:  # the replay ran the captured body, not loss_fn
            SpyStep.seen.append(self.static_tau.item())
        SpyStep.losses.append(stats[0].item())
        return stats, norm


def taus_consumed(data_root, tmp_path, monkeypatch, *mode):
    """Train 2 epochs, resume to 3; the tau each of the 18 steps received, per run."""
    monkeypatch.setattr(vae.training.trainer, "TrainStep", SpyStep)
    monkeypatch.setattr(SpyStep, "seen", [])
    monkeypatch.setattr(SpyStep, "losses", [])
    run = tmp_path / "run"
    m = train_in_process(data_root, run, "epochs=2", *OVERRIDES, *mode)
    assert m["step"] == 12
    first = list(SpyStep.seen)
    SpyStep.seen.clear()
    SpyStep.losses.clear()
    m = train_in_process(data_root, tmp_path / "again", f"resume={run / 'checkpoints' / 'last.pt'}", "epochs=3",
                         *mode)
    assert m["step"] == 18 and m["tau"] == pytest.approx(EXPECTED[17])
    return first, list(SpyStep.seen)


def check(first, resumed):
    # float32 tensors: compare at float32 precision
    assert first == pytest.approx(EXPECTED[:12], rel=1e-6), "the step did not receive the scheduled tau"
    assert resumed == pytest.approx(EXPECTED[12:], rel=1e-6), "after resume, the step did not receive the scheduled tau"
    assert len(set(round(t, 6) for t in first + resumed)) == 4  # 1.0, e^-1, e^-2 and the 0.1 floor: it did move


def test_eager_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch):
    check(*taus_consumed(tiny_data, tmp_path, monkeypatch, "compile=false"))


@pytest.mark.slow  # compiling the loss on a 2-core CPU: ~50 s with a cold Inductor cache, ~12 s with a warm one
def test_compiled_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch):
    first, resumed = taus_consumed(tiny_data, tmp_path, monkeypatch, "compile=true")
    check(first, resumed)


def straight_losses(data_root, run_dir, monkeypatch, *extra):
    """Per-step losses of steps 12-17 of an uninterrupted 3-epoch run, as the trainer's step returns them; and the
    taus that run's (not captured) step received."""
    monkeypatch.setattr(vae.training.trainer, "TrainStep", SpyStep)
    monkeypatch.setattr(SpyStep, "seen", [])
    monkeypatch.setattr(SpyStep, "losses", [])
    train_in_process(data_root, run_dir, "epochs=3", *OVERRIDES, *extra)
    return torch.tensor(SpyStep.losses, dtype=torch.float64)[12:], list(SpyStep.seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True], ids=["cuda_graph", "compile+cuda_graph"])
def test_captured_step_receives_the_scheduled_tau(tiny_data, tmp_path, monkeypatch, compile):
    mode = ("device=cuda", "cuda_graph=true", f"compile={str(compile).lower()}")
    first, resumed = taus_consumed(tiny_data, tmp_path, monkeypatch, *mode)
    check(first, resumed)
    captured = torch.tensor(SpyStep.losses, dtype=torch.float64)  # the resumed run's 6 replays (steps 12-17)
    # A side effect of the temperature the replays computed with, not of the spy: their losses are those of the same
    # step not captured (same generators, same draws) at the scheduled tau, much closer than to that
    # step held at tau=1.0.
    uncaptured = ("device=cuda", "cuda_graph=false", f"compile={str(compile).lower()}")
    reference, taus = straight_losses(tiny_data, tmp_path / "reference", monkeypatch, *uncaptured)
    assert taus == pytest.approx(EXPECTED, rel=1e-6)
    at_one, taus = straight_losses(tiny_data, tmp_path / "tau1", monkeypatch, *uncaptured, "temp_min=1.0")
    assert set(taus) == {1.0}
    effect, deviation = (at_one - reference).abs().max().item(), (captured - reference).abs().max().item()
    assert deviation < effect / 10, (deviation, effect, captured.tolist(), reference.tolist())
