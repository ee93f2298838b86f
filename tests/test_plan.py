"""vae/training/plan.py: one plan per run. The checkpoint is read once, the settings are checked once, a resume in place
keeps the whole run in its directory, and checkpoints written before the newer settings existed still resume.
ValidateOnStart turns an unexpected failure of the checks into one line too."""
from __future__ import annotations

import json

import pytest
import torch

from support import compose_train, run_train, tiny_overrides, train_in_process, validate_on_start


def test_a_resumed_run_reads_its_checkpoint_once_and_checks_its_settings_once(tiny_data, tmp_path, monkeypatch):
    """As `python train.py resume=...` runs: Hydra's start-up callback makes the plan, train.py takes it."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    import train as train_script
    import vae.settings.config
    from vae.training.plan import ValidateOnStart

    train_in_process(tiny_data, tmp_path / "run", "epochs=1")
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    loads, checks = [], []
    real_load, real_validate = torch.load, vae.settings.config.validate_ranges
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(vae.settings.config, "validate_ranges", lambda cfg: checks.append(1) or real_validate(cfg))
    cfg = compose_train("debug=tiny", f"data.root={tiny_data}", f"resume={last}", "epochs=2",
                        f"hydra.run.dir={tmp_path / 'new'}", run_dir=tmp_path / "new")
    ValidateOnStart().on_run_start(cfg)  # before Hydra creates the run directory
    assert cfg.hydra.run.dir == str((tmp_path / "run").resolve())  # Hydra's directory moved into the run
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir  # as Hydra's run_job sets it
    HydraConfig.instance().set_config(cfg)
    threads = torch.get_num_threads()
    try:
        train_script.train(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    finally:
        HydraConfig.instance().cfg = None
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    assert [str(p) for p in loads] == [str(last)] and len(checks) == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["resumes"]
    assert not (tmp_path / "new").exists()


def test_a_resume_in_place_keeps_its_log_and_hydra_files_in_the_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    first = run_train(tiny_overrides(tiny_data, run, "epochs=1"))
    assert first.returncode == 0, first.stderr
    # No hydra.run.dir: Hydra would make a new outputs/<date>/<time> directory; the plan moves it into the run.
    second = run_train([f"resume={run / 'checkpoints' / 'last.pt'}", "epochs=2", f"data.root={tiny_data}"])
    assert second.returncode == 0, second.stderr
    log = (run / "train.log").read_text()
    assert "epoch 1/1" in log and "epoch 2/2" in log and "(resumed in place)" in log
    resumes = list((run / ".hydra" / "resumes").iterdir())
    assert len(resumes) == 1 and "epochs=2" in (resumes[0] / "overrides.yaml").read_text()
    assert "epochs=2" not in (run / ".hydra" / "overrides.yaml").read_text()  # the run's own command line stays


def strip_to_old_format(path):
    """A checkpoint as the reference version wrote it: none of the keys and settings added since."""
    ckpt = torch.load(path, weights_only=True)
    for key in ("image_shape", "val_loss", "best_val_loss"):
        ckpt.pop(key, None)
    config = ckpt["config"]
    for key in ("model", "optimizer", "snr_interval", "snr_samples", "estimator_args", "tracker"):
        config.pop(key, None)
    for key in ("path", "title", "val_size", "test_size", "split_seed"):
        config["data"].pop(key, None)
    torch.save(ckpt, path)


def test_checkpoints_of_the_reference_version_evaluate_and_resume(tiny_data, tmp_path):
    from vae.api import load

    straight = train_in_process(tiny_data, tmp_path / "a", "epochs=2")
    train_in_process(tiny_data, tmp_path / "b", "epochs=1")
    strip_to_old_format(tmp_path / "b" / "checkpoints" / "last.pt")
    assert load(tmp_path / "b" / "checkpoints" / "last.pt").image_shape == (28, 28)
    # The old run had no validation split: the default val_size of new runs must not give it one on resume.
    resumed = train_in_process(tiny_data, tmp_path / "c", f"resume={tmp_path / 'b' / 'checkpoints' / 'last.pt'}",
                               "epochs=2")
    assert resumed["test_loss"] == straight["test_loss"] and "val_loss" not in resumed


def test_own_data_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    import numpy as np

    np.save(tmp_path / "blobs.npy", (np.random.default_rng(0).random((120, 8, 8)) > 0.5).astype(np.uint8) * 255)
    monkeypatch.chdir(tmp_path)  # as `python train.py data=array data.path=blobs.npy` from the data's folder
    train_in_process(tmp_path, tmp_path / "run", "data=array", "data.path=blobs.npy", "batch_size=20")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["config"]["data"]["path"]
    assert saved == str(tmp_path / "blobs.npy")


def test_an_estimators_own_setting_given_on_resume_is_used(tiny_data, tmp_path):
    from omegaconf import OmegaConf

    from vae.training.checkpoint import resume_config

    train_in_process(tiny_data, tmp_path / "run", "epochs=1")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    cfg = compose_train("debug=tiny", "+estimator_args.k=3", run_dir=tmp_path / "x")
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    assert resume_config(cfg, ckpt, ["+estimator_args.k=3"]).estimator_args == {"k": 3}


def test_an_unexpected_failure_in_the_start_up_checks_exits_too(tiny_data, tmp_path, capsys, monkeypatch):
    import vae.training.plan

    def broken(*a, **k):
        raise ValueError("Overflow when unpacking long long")

    monkeypatch.setattr(vae.training.plan, "make_plan", broken)
    code, lines = validate_on_start(capsys, f"data.root={tiny_data}", run_dir=tmp_path / "run")
    assert code == 1 and len(lines) == 1 and "ValueError: Overflow" in lines[0], lines
