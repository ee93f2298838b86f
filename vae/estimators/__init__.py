"""Gradient estimators for the encoder of the categorical VAE: one object per estimator, one interface.

    est = make_estimator("rloo", {"samples": 4}, device)   # its own settings; those left out take its defaults
    noise = sample_gumbel(est.noise_shape(B, N, K), generator=noise_generator, device=device)
    surrogate, loss, bce, kl = est.batch_loss(model, x, noise, tau)
    surrogate.backward()        # the estimator's gradient for every parameter

Every estimator takes all of its randomness from `noise`, standard Gumbel noise drawn by the caller outside any
compiled region, so eager, compiled and CUDA-graph runs see the same random stream. The decoder is always trained
by ordinary backpropagation through the reconstruction at the code it was shown, a learned prior through the
analytic KL; the estimators differ only in how the gradient reaches the encoder's logits:

  gumbel       Gumbel-softmax, relaxed code (Jang et al. 2017; Maddison et al. 2017)        relaxed.py
  st_gumbel    straight-through Gumbel-softmax (Jang et al. 2017)                            relaxed.py
  st           straight-through (Bengio et al. 2013)                                         relaxed.py
  annealed_st  slope-annealed straight-through (Chung et al. 2017)                           relaxed.py
  gumbel_rao   Rao-Blackwellised ST Gumbel-softmax (Paulus et al. 2021)                      relaxed.py
  reinmax      second-order straight-through (Liu et al. 2023)                               relaxed.py
  sf           REINFORCE with a moving-average baseline (Williams 1992)                      score_function.py
  rloo         REINFORCE leave-one-out (Kool et al. 2019)                                    score_function.py
  muprop       Taylor control variate around the mean-field code (Gu et al. 2016)            score_function.py
  exact        E_q over all K^N codes, exact gradient (small models only)                    exact.py

A new estimator is a subclass of `Estimator` (the contract: vae/estimators/base.py) and one line that registers it:
an entry in ESTIMATORS below, or `register(MyEstimator)`. The config check, make_estimator and vae.gradients read
ESTIMATORS when they run, and the README's table of `estimator=` names it (a test checks).

docs/estimators.md explains each one and how to compare them (`python -m vae.gradients`).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Type

import torch

from vae.common.errors import UserError
from vae.estimators.base import CONFIG_KEYS, Estimator, MovingAverageBaseline, check_samples, config_key
from vae.estimators.exact import Exact
from vae.estimators.relaxed import ST, AnnealedST, Gumbel, GumbelRao, ReinMax, STGumbel
from vae.estimators.score_function import RLOO, SF, MuProp

__all__ = ["ESTIMATORS", "Estimator", "check_settings", "config_settings", "default_samples", "make_estimator",
           "register", "takes_samples"]

# The registry: `estimator=` name -> class, in the order of the tables and error messages.
ESTIMATORS: Dict[str, Type[Estimator]] = {
    cls.name: cls for cls in (Gumbel, STGumbel, ST, AnnealedST, SF, RLOO, MuProp, GumbelRao, ReinMax, Exact)}


def register(cls: Type[Estimator]) -> Type[Estimator]:
    """Add an estimator class to ESTIMATORS under its `name`; returns it, so that it also serves as a decorator."""
    if not cls.name or ESTIMATORS.get(cls.name, cls) is not cls:
        raise ValueError(f"an estimator needs a name of its own: {cls.name!r} is "
                         f"{'taken by ' + ESTIMATORS[cls.name].__qualname__ if cls.name else 'empty'}")
    ESTIMATORS[cls.name] = cls
    return cls


def estimator_class(name: str) -> Type[Estimator]:
    if name not in ESTIMATORS:
        raise UserError(f"estimator={name!r} is not allowed: one of {', '.join(ESTIMATORS)} "
                        "(set it on the command line, e.g. estimator=st_gumbel)")
    return ESTIMATORS[name]


def default_samples(name: str) -> int:
    """Samples per image when `estimator_samples` is null: the estimator's own default, 1 if it draws one."""
    return estimator_class(name).settings.get("samples", 1)


def takes_samples(name: str) -> bool:
    """Whether `estimator_samples` reaches this estimator (the others draw one sample per image)."""
    return "samples" in estimator_class(name).settings


def config_settings(name: str, cfg: Mapping) -> Dict[str, Any]:
    """The settings that a config's keys give estimator `name`: `estimator_samples` and `baseline_decay` where it
    takes them, `estimator_args` (where the config has it) for the rest; defaults are left to check_settings.

    A top-level key the estimator does not take must still hold a value an estimator could: estimator_samples null
    or 1 (a larger one would be ignored), baseline_decay in [0, 1). One line for each refusal.
    """
    cls = estimator_class(name)
    args = dict(cfg.get("estimator_args") or {})
    for setting, key in CONFIG_KEYS.items():
        if setting in args:
            raise UserError(f"estimator_args.{setting}={args[setting]!r} is not allowed: {setting} has a key of its "
                            f"own, set {key}={args[setting]} instead")
    given = {setting: cfg.get(key) for setting, key in CONFIG_KEYS.items()}
    if given["samples"] is not None and "samples" not in cls.settings:
        check_samples(given["samples"], 1)
        if given["samples"] != 1:
            several = [n for n, c in ESTIMATORS.items() if "samples" in c.settings]
            raise UserError(f"estimator_samples={given['samples']} is not allowed with estimator={name}: it draws one "
                            f"sample per image and would ignore it; set estimator_samples=1 (only "
                            f"{' and '.join(several)} take several)")
    if given["baseline_decay"] is not None and "baseline_decay" not in cls.settings:
        MovingAverageBaseline.check_decay(given["baseline_decay"])
    return {**{k: v for k, v in given.items() if k in cls.settings and v is not None}, **args}


def check_settings(name: str, settings: Mapping[str, Any], latent_dim: int, categorical_dim: int) -> Dict[str, Any]:
    """All the settings of estimator `name`, its defaults updated by `settings` (setting name -> value), for a code
    of latent_dim variables of categorical_dim classes: a one-line UserError for a name it does not take or a
    value it refuses (the class's check_settings)."""
    cls = estimator_class(name)
    for key, value in settings.items():
        if key not in cls.settings:
            takes = ", ".join(f"{config_key(k)} (default {v!r})" for k, v in cls.settings.items())
            raise UserError(f"{config_key(key)}={value!r} is not allowed with estimator={name}: it takes "
                            f"{takes or 'no settings of its own'}")
    full = {**cls.settings, **settings}
    cls.check_settings(full, latent_dim, categorical_dim)
    return full


def make_estimator(name: str, settings: Mapping[str, Any], device) -> Estimator:
    """The estimator `name` with `settings` (setting name -> value; those left out take the class's defaults),
    checked by check_settings; its state, if any, lives on `device`."""
    full = check_settings(name, settings, 1, 2)  # the code-space size is the model's, checked with it
    return ESTIMATORS[name](device=torch.device(device), **full)
