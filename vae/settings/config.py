"""train.py's typed config schema, each setting declared with its rule (vae/settings/rules.py): the values alone, no
files, no devices (those are vae/settings/checks.py).

Hydra composes `configs/config.yaml` on top of the `Config` dataclass below, so an unknown key or a wrong
type (`temperature=abc`) fails at composition time; `validate_ranges` checks every value against its rule, then
what relates settings to each other, one line for the first that fails. Hydra lets `+key=` add, and `~key` delete,
keys even so: vae/settings/schema.py finds both, for every command.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vae.common.errors import UserError
from vae.core.schedule import LR_SCHEDULES
from vae.settings.rules import (DEVICE, IMAGES, SEED, THREADS, Rule, check, check_schema, each_of, fraction_or_count,
                                 integer, number, one_of, setting)
from vae.settings.schema import undeclared_settings

REPO_DIR = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_DIR / "configs"

# `${repo_dir:}` lets the YAML say "<repo>/data" without a hard-coded absolute path.
OmegaConf.register_new_resolver("repo_dir", lambda: str(REPO_DIR), replace=True)


def run_suffix(override_dirname: str, max_len: int = 64) -> str:
    """`_<overrides>` to append to a single run's directory name, or "" when there are none.

    Hydra's override_dirname grows with every override (seven settings already make over 100 characters, and
    TensorBoard lists runs by directory). Past `max_len`, whole overrides are kept while they fit and the rest become
    `+` and 8 hex digits of the full string's SHA-1: still readable, and different overrides still give
    different names; the full list is in the run's .hydra/overrides.yaml. A `/` (a path in a value) would nest
    the run one directory deeper: it becomes `-`.
    """
    if not override_dirname:
        return ""
    name = override_dirname.replace("/", "-")
    if len(name) <= max_len:
        return "_" + name
    digest = "+" + hashlib.sha1(override_dirname.encode()).hexdigest()[:8]
    kept = ""
    # Split between overrides only: a comma followed by a closing bracket belongs to a list or dict value.
    for item in re.split(r",(?![^\[{]*[\]}])", name):
        longer = f"{kept},{item}" if kept else item
        if len(longer) > max_len - len(digest):
            break
        kept = longer
    return "_" + (kept or name[:max_len - len(digest)]) + digest


# `${run_suffix:${hydra.job.override_dirname}}`: a run directory that says what the run changed.
OmegaConf.register_new_resolver("run_suffix", run_suffix, replace=True)


def _train_help(*, _root_) -> str:
    """`${train_help:}`: the page of `python train.py --help` (configs/hydra/help/train.yaml), for the config it
    was asked with. Hydra fills `$NAME`s into it: a `$` of ours is doubled."""
    from vae.settings.usage import help_page

    return help_page(_root_).replace("$", "$$")


OmegaConf.register_new_resolver("train_help", _train_help, replace=True)

BINARIZE = ("none", "dynamic", "static")
PRIORS = ("uniform", "learned")
SOURCES = ("local", "torchvision", "registry", "system", "synthetic")


def _registry(module: str, name: str):
    """A registry's names, read when a value is checked (the registries import this module's neighbours)."""
    import importlib

    return lambda: tuple(getattr(importlib.import_module(module), name))


def _group_hint(group: str, module: str, name: str) -> Rule:
    names = _registry(module, name)
    return Rule(lambda v: v in names(), lambda: f"one of {', '.join(names())} (choose with {group}={'|'.join(names())})")


def _hidden_ok(hidden) -> bool:
    return 1 <= len(hidden) <= 8 and all(isinstance(h, int) and 1 <= h <= 65536 for h in hidden)


def _betas_ok(betas) -> bool:
    return len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)


@dataclass
class DataConfig:
    name: str = setting("mnist", _group_hint("data", "vae.data", "DATASET_NAMES"))
    root: str = "${repo_dir:}/data"
    download: bool = True
    # Where to look for the files, in order: local = <root>/<Name>/raw, torchvision = its own download,
    # registry = the package-registry mirror (MNIST only), system = `system_path` (e.g. a Debian package).
    sources: List[str] = setting(rule=each_of(SOURCES), factory=lambda: ["local", "torchvision", "registry"])
    system_path: Optional[str] = None
    # false = your own files (e.g. tiny test data): skip the official MD5s; the IDX structure is still checked.
    verify: bool = True
    binarize: str = setting("none", one_of(BINARIZE))
    # Static binarization is a property of the dataset, not of a run: its seed is separate from `seed`
    # so that runs with different seeds are scored on the same binary test set.
    binarize_seed: int = setting(0, SEED)
    # data=array | data=folder: the .npy/.npz file or the folder of images (vae/data/arrays.py).
    path: Optional[str] = None
    # The name the dataset is shown under (null = MNIST, Fashion-MNIST, or your file's or folder's name).
    title: Optional[str] = None
    # Images held out of the training set for model selection (best.pt) and the val/* curves: a fraction below 1,
    # else a count; 0 = none (best.pt then follows the test loss, as before this split existed).
    val_size: float = setting(5000, fraction_or_count(zero_ok=True))
    # Your own data without a test split: the part drawn as the test set (a fraction below 1, else a count).
    test_size: float = setting(0.1, fraction_or_count(zero_ok=False))
    # Seeds the validation (and own-data test) draw: like binarize_seed, a property of the data, not of a run.
    split_seed: int = setting(0, SEED)


@dataclass
class ModelConfig:
    # mlp (the default: Jang et al.'s network) | conv (vae/core/model.py; configs/model/).
    name: str = setting("mlp", _group_hint("model", "vae.core.model", "MODELS"))
    hidden: List[int] = setting(rule=Rule(_hidden_ok, "a list of 1 to 8 layer widths in [1, 65536], e.g. "
                                                      "model.hidden=[512,256]"), factory=lambda: [512, 256])


@dataclass
class OptimizerConfig:
    # adam (the default: fused Adam, Kingma & Ba 2015) | radam (Liu et al. 2020: ReinMax's MNIST-VAE scripts).
    # The learning rate is the top-level `lr`; the rest are torch.optim's arguments, with its defaults.
    name: str = setting("adam", _group_hint("optimizer", "vae.core.optim", "OPTIMIZERS"))
    betas: List[float] = setting(rule=Rule(_betas_ok, "two numbers in [0, 1), e.g. optimizer.betas=[0.9,0.999]"),
                                 factory=lambda: [0.9, 0.999])
    eps: float = setting(1e-8, number(above=0))
    weight_decay: float = setting(0.0, number(at_least=0))


@dataclass
class TrackerConfig:
    # none (TensorBoard alone) | mlflow (vae/training/tracking.py; docs/tracking.md).
    name: str = setting("none", _group_hint("tracker", "vae.training.tracking", "TRACKERS"))
    # A folder (MLflow's file store) or an MLflow tracking URI; shared by every run, so that one UI shows them all.
    tracking_uri: str = "${repo_dir:}/outputs/mlruns"
    experiment: str = "gumbel-vae"


@dataclass
class EvalConfig:
    # k of the importance-weighted bound logged at the end of training (0 = skip; the paper uses 1000).
    iw_samples: int = setting(0, integer(0, note="0 = off"))
    # Importance samples evaluated at once per image: bounds memory whatever k is.
    iw_chunk: int = setting(100, integer(1))
    # Images per evaluation batch.
    batch_size: int = setting(1000, integer(1))
    # A latent variable counts as active (latents/active) when its mean KL exceeds this many nats per image.
    active_kl: float = setting(0.01, number(at_least=0, note="nats"))
    # Latent variables (those of highest KL) shown as rows of the latents/traversal and latents/class_means images.
    traversal_rows: int = setting(10, integer(1))


@dataclass
class Config:
    latent_dim: int = setting(30, integer(1))
    categorical_dim: int = setting(10, integer(2))
    temperature: float = setting(1.0, number(above=0))
    temp_min: float = setting(0.5, number(above=0))
    anneal_rate: float = setting(3e-5, number(at_least=0, note="0 keeps the temperature fixed"))
    anneal_interval: int = setting(100, integer(1, note="steps"))
    hard: bool = False
    # The gradient estimator (docs/estimators.md); `hard=true` is the alias of estimator=st_gumbel.
    estimator: str = setting("gumbel", one_of(_registry("vae.estimators", "ESTIMATORS")))
    # Samples per image for rloo and gumbel_rao (null = the estimator's own default).
    estimator_samples: Optional[int] = None
    # Decay of the moving-average baseline of the score-function estimators.
    baseline_decay: float = 0.9
    # The estimator's own settings that have no top-level key (e.g. +estimator_args.scale=2): each estimator class
    # declares the ones it takes, with their defaults (vae/estimators/); any other is refused.
    estimator_args: Dict[str, Any] = field(default_factory=dict)
    prior: str = setting("uniform", one_of(PRIORS))
    batch_size: int = setting(100, integer(1))
    epochs: int = setting(10, integer(0))
    lr: float = setting(1e-3, number(above=0))
    # constant | cosine: half a cosine from `lr` to 0 over the run's steps (vae/core/schedule.py).
    lr_schedule: str = setting("constant", one_of(LR_SCHEDULES))
    seed: int = setting(0, SEED)
    device: str = setting("auto", DEVICE)
    # null = pick per device: on for CUDA, off for CPU (where compile time outweighs the gain on a short run).
    compile: Optional[bool] = None
    cuda_graph: Optional[bool] = None
    # compile=null on CUDA compiles only a run of at least this many training steps (shorter ones finish sooner
    # with the CUDA graph alone: docs/speed.md).
    compile_min_steps: int = setting(100000, integer(0))
    tf32: bool = True
    # Flush subnormal floats to zero on the CPU (null = on for CPU runs; docs/speed.md).
    flush_denormal: Optional[bool] = None
    # CPU threads for PyTorch (null = its default, one per core).
    threads: Optional[int] = setting(None, THREADS)
    log_interval: int = setting(100, integer(1, note="steps"))
    # train/grad_snr (vae/training/snr.py) every this many steps, from snr_samples gradient estimates (0 = off).
    snr_interval: int = setting(0, integer(0, note="steps; 0 = off"))
    snr_samples: int = setting(16, integer(2, note="a spread needs two"))
    recon_images: int = setting(8, IMAGES)
    prior_samples: int = setting(64, IMAGES)
    resume: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)


ConfigStore.instance().store(name="base_config", node=Config)

# Settings that fix the shapes of the parameters: a checkpoint only fits a model built with the same ones.
ARCHITECTURE_KEYS = ("latent_dim", "categorical_dim", "prior", "model.name", "model.hidden")
# Settings that decide which images a run trains and is tested on: a resumed run keeps them (its test losses, and
# the choice of best.pt, compare losses on its own data). data.root and the sources only say where the files are.
DATA_KEYS = ("data.name", "data.path", "data.binarize", "data.binarize_seed", "data.val_size", "data.test_size",
             "data.split_seed")

# latent_dim x categorical_dim: the two layers that touch the code have 256 weights per unit each (with Adam's
# moments, 16 bytes per weight): 2^20 units are 8 GiB before any activation, far beyond any useful model here.
MAX_CODE_UNITS = 2**20


def check_device_name(name: Any) -> None:
    """`device` is spelled as resolve_device understands it (whether that device exists is resolve_device's job)."""
    DEVICE.check("device", name)


def check_seed(seed: Any, key: str = "seed") -> None:
    SEED.check(key, seed)


def check_code_size(latent_dim: int, categorical_dim: int) -> None:
    code = latent_dim * categorical_dim
    if code > MAX_CODE_UNITS:
        raise UserError(f"latent_dim={latent_dim} x categorical_dim={categorical_dim} = {code} code units is "
                        f"too large: at most {MAX_CODE_UNITS} (the layers next to the code hold 256 weights per unit); "
                        "lower latent_dim or categorical_dim")


def validate_ranges(cfg: DictConfig, schema: type = Config) -> None:
    """Every setting against its rule (declared beside it above), then what relates settings to each other. Values
    alone: no file system, no devices."""
    undeclared = undeclared_settings(cfg)
    if undeclared:
        raise UserError(undeclared)
    check_schema(cfg, schema)
    check(cfg.temp_min <= cfg.temperature, "temp_min", cfg.temp_min,
          f"must be <= temperature ({cfg.temperature}), the floor of the annealing schedule")
    check_code_size(cfg.latent_dim, cfg.categorical_dim)
    from vae.data import OWN_DATA

    if cfg.data.name in OWN_DATA and (OmegaConf.is_missing(cfg.data, "path") or not cfg.data.path):
        raise UserError(f"data={cfg.data.name} reads {OWN_DATA[cfg.data.name]}: add data.path=<path>")
    from vae.estimators import check_settings, config_settings  # each estimator's own settings, declared with it

    check(not cfg.hard or cfg.estimator in ("gumbel", "st_gumbel"), "hard", cfg.hard,
          f"hard=true is the alias of estimator=st_gumbel and cannot be combined with estimator={cfg.estimator}; "
          "drop hard=true")
    check_settings(estimator_name(cfg), config_settings(estimator_name(cfg), cfg), cfg.latent_dim, cfg.categorical_dim)


def estimator_name(cfg: DictConfig) -> str:
    """The estimator a run uses: `hard=true` (the historical switch) means straight-through Gumbel-softmax."""
    return "st_gumbel" if cfg.hard else cfg.estimator
