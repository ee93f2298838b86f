"""Every config composes; every bad setting ends with one clear line, a non-zero exit and nothing written."""
from __future__ import annotations

import re

import pytest
import torch
from hydra import compose, initialize_config_dir

from support import compose_train, run_train, tiny_overrides
from vae.training.plan import check_run
from vae.settings.config import CONFIG_DIR, run_suffix
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
    ("lr_schedule=linear", "lr_schedule"),
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


# --- a single run's directory names its overrides: outputs/<date>/<time>_<overrides>, short and without paths

def hydra_run_dir(*overrides) -> str:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.run.dir


def test_run_dir_carries_the_overrides_but_no_paths():
    plain = hydra_run_dir()
    assert re.search(r"/outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d$", plain), plain  # no trailing "_"
    named = hydra_run_dir("temperature=2.0", "hard=true", "data.root=/scratch/data", "device=cpu", "data=fashion_mnist")
    # Hydra sorts the overrides; paths and plumbing (data.root, device, ...) stay out of the name.
    assert re.search(r"/\d\d-\d\d-\d\d_data=fashion_mnist,hard=true,temperature=2.0$", named), named


def test_short_suffixes_are_the_overrides_themselves():
    assert run_suffix("") == ""
    assert run_suffix("hard=true") == "_hard=true"
    assert run_suffix("data.system_path=/usr/share/mnist") == "_data.system_path=-usr-share-mnist"  # no nesting


def test_long_suffixes_keep_whole_overrides_and_a_hash_of_all():
    long = "anneal_rate=1e-4,categorical_dim=5,data.sources=[local,registry],hard=true,latent_dim=20,temperature=2.0"
    suffix = run_suffix(long, max_len=64)
    assert len(suffix) <= 1 + 64
    # Whole overrides only: the comma inside the list value is no place to cut ("...,data.sources=[local" fits).
    assert re.fullmatch(r"_anneal_rate=1e-4,categorical_dim=5\+[0-9a-f]{8}", suffix), suffix
    assert run_suffix(long, max_len=75).startswith("_anneal_rate=1e-4,categorical_dim=5,data.sources=[local,registry]+")
    # Runs that differ only past the cut still get different directories; the same overrides the same name.
    assert run_suffix(long.replace("2.0", "3.0")) != suffix and run_suffix(long) == suffix
    # One override longer than the limit is cut inside.
    assert re.fullmatch(r"_x{55}\+[0-9a-f]{8}", run_suffix("x" * 100, max_len=64))


def test_a_long_command_line_gives_a_bounded_directory_name():
    name = hydra_run_dir("anneal_rate=1e-4", "categorical_dim=5", "latent_dim=20", "temp_min=0.3", "temperature=2.0",
                         "hard=true", "prior=learned", "lr=3e-4").rsplit("/", 1)[1]
    assert len(name) <= len("12-00-00_") + 64 and re.search(r"\+[0-9a-f]{8}$", name), name
