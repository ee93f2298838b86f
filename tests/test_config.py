"""Every config composes; every bad setting ends with one clear line, a non-zero exit and nothing written."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from support import run_train, tiny_overrides
from vae.training.plan import check_run
from vae.settings.config import CONFIG_DIR
from vae.common.errors import UserError


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_match_the_reference_setup():
    cfg = composed()
    expected = dict(latent_dim=30, categorical_dim=10, temperature=1.0, temp_min=0.5, anneal_rate=3e-5,
                    anneal_interval=100, hard=False, batch_size=100, epochs=10, lr=1e-3, device="auto", prior="uniform")
    assert {k: cfg[k] for k in expected} == expected
    assert cfg.data.name == "mnist" and cfg.data.root.endswith("/data") and cfg.data.binarize == "none"
    check_run(cfg)


@pytest.mark.parametrize("overrides", [["data=fashion_mnist"], ["experiment=paper"], ["experiment=paper", "hard=true"]])
def test_every_config_composes(overrides):
    check_run(composed(*overrides))


BAD = [
    ("temperature=0", "temperature"), ("temperature=-1", "temperature"), ("temperature=nan", "temperature"),
    ("temp_min=0", "temp_min"), ("temp_min=2.0", "temp_min"), ("anneal_rate=-1e-5", "anneal_rate"),
    ("anneal_interval=0", "anneal_interval"), ("latent_dim=0", "latent_dim"), ("categorical_dim=1", "categorical_dim"),
    ("batch_size=0", "batch_size"), ("epochs=-1", "epochs"), ("lr=0", "lr"), ("lr=-0.1", "lr"),
    ("log_interval=0", "log_interval"), ("prior=gaussian", "prior"), ("device=tpu", "device"),
    ("data.binarize=sometimes", "data.binarize"), ("data.sources=[local,ftp]", "data.sources"),
    ("eval.iw_samples=-1", "eval.iw_samples"), ("eval.iw_chunk=0", "eval.iw_chunk"),
]


@pytest.mark.parametrize("override,key", BAD)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, key):
    with pytest.raises(UserError) as e:
        check_run(composed(override))
    message = str(e.value)
    assert message.startswith(f"{key}=") and "\n" not in message
    assert "allowed" in message or "must" in message or "one of" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu():
    with pytest.raises(UserError, match="device='cuda'.*no CUDA GPU.*device=cpu"):
        check_run(composed("device=cuda"))


def assert_clean_failure(proc, run_dir, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not run_dir.exists(), "a rejected run must not write its directory"


@pytest.mark.parametrize("override,needles", [
    ("temperature=0", ["error: temperature=0.0", "> 0"]),
    ("temperature=abc", ["temperature=abc", "could not be converted"]),
    ("no_such_key=1", ["no_such_key"]),
    ("temp_min=3", ["error: temp_min=3.0", "<= temperature"]),
])
def test_bad_settings_on_the_command_line(tiny_data, tmp_path, override, needles):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_overrides(tiny_data, run_dir, override))
    assert_clean_failure(proc, run_dir, *needles)


def test_bad_files_on_the_command_line(tiny_data, tmp_path):
    """One subprocess per case would be slow; these share the tiny data and check the same contract."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("hello")
    run_dir = tmp_path / "run"
    cases = [
        ([f"resume={tmp_path / 'missing.pt'}"], ["resume=", "no such file"]),
        ([f"resume={not_ckpt}"], ["not a", "checkpoint"]),
        ([f"hydra.run.dir={blocker / 'run'}"], ["hydra.run.dir", "not writable"]),
        ([f"data.root={blocker / 'data'}"], ["data.root", "not writable"]),
    ]
    for extra, needles in cases:
        args = tiny_overrides(tiny_data, run_dir, *extra)
        if extra[0].startswith("hydra.run.dir"):
            args = [a for a in args if not a.startswith("hydra.run.dir=")] + extra
        proc = run_train(args)
        assert_clean_failure(proc, run_dir, *needles)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_bad_checkpoints(tiny_data, tmp_path):
    run_dir = tmp_path / "good"
    assert run_train(tiny_overrides(tiny_data, run_dir, "epochs=1", "latent_dim=4")).returncode == 0
    last = run_dir / "checkpoints" / "last.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["latent_dim"] = 6  # the weights stay those of latent_dim=4
    torch.save(ckpt, foreign)
    new_dir = tmp_path / "new"
    for extra, needles in [
        ([f"resume={truncated}"], ["truncated.pt", "not a readable checkpoint"]),
        ([f"resume={foreign}"], ["foreign.pt", "do not fit the architecture"]),
        ([f"resume={last}", "latent_dim=6", "categorical_dim=3"],
         ["different architecture", "latent_dim=4 in the checkpoint but latent_dim=6 here", "categorical_dim"]),
    ]:
        proc = run_train([*extra, f"hydra.run.dir={new_dir}"])
        assert_clean_failure(proc, new_dir, *needles)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_readme_documents_every_setting():
    from dataclasses import fields

    from support import REPO
    from vae.settings.config import Config, DataConfig, EvalConfig

    readme = (REPO / "README.md").read_text()
    keys = [f.name for f in fields(Config) if f.name not in ("data", "eval")]
    keys += [f"data.{f.name}" for f in fields(DataConfig)] + [f"eval.{f.name}" for f in fields(EvalConfig)]
    assert [k for k in keys if f"| `{k}` |" not in readme] == []

