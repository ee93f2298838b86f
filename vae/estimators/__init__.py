"""Gradient estimators for the encoder of the categorical VAE: one object per estimator, one interface.

    est = make_estimator("rloo", samples=2, baseline_decay=0.9, device=device)
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

docs/estimators.md explains each one and how to compare them (`python -m vae.gradients`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from vae.errors import UserError
from vae.estimators.base import Estimator
from vae.estimators.exact import MAX_CODES, Exact
from vae.estimators.relaxed import ST, AnnealedST, Gumbel, GumbelRao, ReinMax, STGumbel
from vae.estimators.score_function import RLOO, SF, MuProp

__all__ = ["NAMES", "Estimator", "check_settings", "default_samples", "make_estimator"]

_CLASSES = {cls.name: cls for cls in (Gumbel, STGumbel, ST, AnnealedST, SF, RLOO, MuProp, GumbelRao, ReinMax, Exact)}
NAMES = tuple(_CLASSES)

# Samples per image where an estimator takes several. RLOO needs two for a baseline at all, and each one more costs
# a decoder pass; Gumbel-Rao's extra samples cost only softmaxes, and 10 is the smallest k of Paulus et al. 2021.
_DEFAULT_SAMPLES = {"rloo": 2, "gumbel_rao": 10}
MULTI_SAMPLE = tuple(_DEFAULT_SAMPLES)


def default_samples(name: str) -> int:
    """`estimator_samples` when none is given: rloo 2, gumbel_rao 10, every other estimator 1."""
    return _DEFAULT_SAMPLES.get(name, 1)


def check_settings(name, samples, latent_dim, categorical_dim, baseline_decay) -> None:
    """Raise a one-line UserError naming the setting, its value and the fix, for any setting the estimator refuses.

    `samples` is `estimator_samples`; None means default_samples(name).
    """
    if name not in _CLASSES:
        raise UserError(f"estimator={name!r} is not allowed: one of {', '.join(NAMES)} "
                        "(set it on the command line, e.g. estimator=st_gumbel)")
    samples = default_samples(name) if samples is None else samples
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"estimator_samples={samples!r} is not allowed: must be an integer >= 1 "
                        f"(e.g. estimator_samples={default_samples(name)})")
    if name == "rloo" and samples < 2:
        raise UserError(f"estimator_samples={samples} is not allowed with estimator=rloo: each sample's baseline is "
                        "the mean of the image's other samples, so it needs >= 2 (e.g. estimator_samples=2)")
    if name not in MULTI_SAMPLE and samples != 1:
        raise UserError(f"estimator_samples={samples} is not allowed with estimator={name}: it draws one sample per "
                        f"image and would ignore it; set estimator_samples=1 (only {' and '.join(MULTI_SAMPLE)} "
                        "take several)")
    if name == "exact":
        codes = categorical_dim ** latent_dim
        if codes > MAX_CODES:
            raise UserError(f"estimator=exact enumerates K^N = {categorical_dim}^{latent_dim} = {_big(codes)} codes; "
                            f"that is more than {MAX_CODES} it will sum over: use latent_dim/categorical_dim with "
                            f"K^N <= {MAX_CODES} (e.g. latent_dim=4 categorical_dim=4) or another estimator")
    if not (isinstance(baseline_decay, (int, float)) and math.isfinite(baseline_decay)
            and 0 <= baseline_decay < 1):
        raise UserError(f"baseline_decay={baseline_decay!r} is not allowed: must be a number in [0, 1) "
                        "(0 = the last batch's mean; e.g. baseline_decay=0.9)")


def _big(n: int) -> str:
    return str(n) if n < 10**12 else f"{n:.3g}"


def make_estimator(name: str, *, samples: Optional[int], baseline_decay: float, device) -> Estimator:
    """The estimator `name` with settings that check_settings accepts (samples None = default_samples(name)); its
    state, if any, lives on `device`."""
    check_settings(name, samples, 1, 2, baseline_decay)  # the code-space size is the model's, checked with it
    samples = default_samples(name) if samples is None else samples
    return _CLASSES[name](samples=samples, baseline_decay=baseline_decay, device=torch.device(device))
