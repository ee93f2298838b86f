"""vae/training/trainer.py through train.py on tiny data: model selection on the validation split, the optimizer group,
the model group, and your own data end to end (train, evaluate, sample, resume).

Also: vae/training/trainer.py: a loss that explodes, to NaN or to huge finite values, is divergence, and saves nothing."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from support import compose_train, run_script, train_in_process
from vae.common.errors import TrainingDiverged
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
