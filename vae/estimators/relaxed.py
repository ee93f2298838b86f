"""Pathwise estimators: the decoder's gradient with respect to the code is carried back to the logits through a
differentiable stand-in for the sample. All but `gumbel` show the decoder the exact one-hot sample and differ only
in the stand-in whose Jacobian they borrow; they are biased, with less variance than the score-function family.

Each is `code(logits, noise, tau)` inside the same batch loss:

    logits = encode(x);  z = code(logits, noise, tau);  -ELBO = BCE(x, decode(z)) + KL(q || p)

For gumbel and st_gumbel this is, operation for operation, the trainer's original `batch_loss`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vae.estimators.base import Estimator, check_samples, sample_codes
from vae.core.gumbel import gumbel_softmax, one_hot_argmax, straight_through
from vae.core.loss import negative_elbo


class _Pathwise(Estimator):
    def code(self, logits: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_loss(self, model, x, noise, tau):
        logits = model.encode(x)
        z = self.code(logits, noise, tau)
        loss, bce, kl = negative_elbo(model.decode(z), x, logits, model.log_prior())
        loss = loss.mean()
        # The surrogate is the loss itself: backpropagation through the stand-in is the whole estimator.
        return loss, loss, bce.mean(), kl.mean()


class Gumbel(_Pathwise):
    """Gumbel-softmax (Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017): the decoder sees the relaxed sample
    y = softmax((logits + g) / tau); the gradient is the exact gradient of this *relaxed* objective, a biased
    estimate of the discrete one's. The logged loss is the relaxed negative ELBO."""

    name, one_hot, uses_tau = "gumbel", False, True

    def code(self, logits, noise, tau):
        return gumbel_softmax(logits, tau, hard=False, noise=noise)


class STGumbel(_Pathwise):
    """Straight-through Gumbel-softmax (Jang et al. 2017, "ST Gumbel-Softmax"): forward the exact one-hot
    argmax(logits + g), a sample of q; backward the Jacobian of softmax((logits + g) / tau) (the trainer's
    `hard=true`)."""

    name, uses_tau = "st_gumbel", True

    def code(self, logits, noise, tau):
        return gumbel_softmax(logits, tau, hard=True, noise=noise)


class ST(_Pathwise):
    """Straight-through (Bengio, Leonard & Courville 2013): forward a one-hot sample z ~ q (Gumbel-max); backward
    as if z were the mean softmax(logits): d loss/d logits = J_softmax(logits)^T d loss/dz. No temperature."""

    name = "st"

    def code(self, logits, noise, tau):
        return straight_through(F.softmax(logits, dim=-1), sample_codes(logits, noise))


class AnnealedST(_Pathwise):
    """Slope-annealed straight-through (Chung, Ahn & Bengio 2016; "Annealed ST" in Jang et al. 2017, Table 1):
    forward a one-hot sample z ~ q; backward through softmax(logits / tau), whose slope 1/tau grows as the
    trainer anneals tau down. tau = 1 is plain `st`."""

    name, uses_tau = "annealed_st", True

    def code(self, logits, noise, tau):
        return straight_through(F.softmax(logits / tau, dim=-1), sample_codes(logits, noise))


def conditional_gumbel(log_p: torch.Tensor, D: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Perturbed log-probabilities v = log_p + G with G ~ Gumbel conditioned on argmax(v) = D (Paulus et al. 2021,
    appendix; Maddison, Tarlow & Minka 2014 for the top-down construction).

    log_p [..., K] normalised (logsumexp 0), D one-hot [..., K], g standard Gumbel noise [k, ..., K]. The maximum
    of independent Gumbels with locations log_p is Gumbel(logsumexp log_p) = Gumbel(0), independent of where it
    falls, so the winner's value is g at class D; each other class is a Gumbel with location log_p_j truncated to
    lie below it: -log(exp(-v_max) + exp(-(log_p_j + g_j))), written with logaddexp to stay finite.
    """
    top = (g * D).sum(dim=-1, keepdim=True)
    below = -torch.logaddexp(-top, -(log_p + g))
    return torch.where(D.bool(), top, below)


class GumbelRao(_Pathwise):
    """Gumbel-Rao (Paulus, Maddison & Krause 2021): ST Gumbel-softmax Rao-Blackwellised over the noise given the
    sample. Forward the one-hot D = argmax(logits + g); backward the Jacobian of
    (1/k) sum_i softmax((logits + G_i) / tau), G_i ~ Gumbel | argmax(logits + G) = D, a Monte Carlo estimate of
    E[softmax-Jacobian | D]. Same expectation as st_gumbel at the same tau, never more variance.

    Noise [k, B, N, K]: slice 0 is the unconditional draw that picks D, and is itself a draw of G | D, so it is
    reused as G_1; slices 1..k-1 are turned into G_2..G_k by `conditional_gumbel`. With k = 1 this is st_gumbel.

    The G_i are treated as noise: no gradient flows through their dependence on the logits. Paulus et al. write
    the total derivative through G_i; but only with G_i held fixed is the conditional expectation of this
    estimator that of st_gumbel (a point nshepperd's gumbel-rao-pytorch also makes), which is what
    Rao-Blackwellisation promises.
    """

    name, uses_tau = "gumbel_rao", True
    # k, the samples per image: the extra ones cost only softmaxes, and 10 is the smallest k of Paulus et al. 2021.
    settings = {"samples": 10}

    @classmethod
    def check_settings(cls, settings, latent_dim, categorical_dim):
        check_samples(settings["samples"], cls.settings["samples"])

    def noise_shape(self, batch_size, latent_dim, categorical_dim):
        return (self.samples, batch_size, latent_dim, categorical_dim)

    def code(self, logits, noise, tau):
        first = F.softmax((logits + noise[0]) / tau, dim=-1)
        D = one_hot_argmax(first)  # as st_gumbel picks it, so that k = 1 reproduces st_gumbel exactly
        log_p = F.log_softmax(logits.detach(), dim=-1)
        G = conditional_gumbel(log_p, D, noise[1:]) - log_p  # softmax is shift-invariant: logits + G will do
        rest = F.softmax((logits + G) / tau, dim=-1)
        soft = torch.cat([first.unsqueeze(0), rest]).mean(dim=0)
        return straight_through(soft, D)


class ReinMax(_Pathwise):
    """ReinMax (Liu et al. 2023, "Bridging Discrete and Backpropagation: Straight-Through and Beyond"): forward a
    one-hot sample D ~ q; backward Heun's method where ST is forward Euler (the paper's reading of ST),

        d loss/d logits = 2 J(pi_1)^T g - 1/2 J(pi_0)^T g,   J(p) = diag(p) - p p^T,   g = d loss/dD,
        pi_0 = softmax(logits),   pi_1 = (D + softmax(logits / tau)) / 2,

    as the authors' code computes it: tau only moves the point pi_1, no 1/tau factor. They recommend tau >= 1
    (their code refuses less).
    """

    name, uses_tau = "reinmax", True

    def code(self, logits, noise, tau):
        D = sample_codes(logits, noise)
        pi_0 = F.softmax(logits, dim=-1)
        pi_1 = (D + F.softmax(logits.detach() / tau, dim=-1)) / 2
        # Value pi_1 (> 0 where D is), gradient the softmax Jacobian at pi_1: a softmax of logits shifted by a constant.
        pi_1 = F.softmax(logits + (pi_1.log() - logits).detach(), dim=-1)
        return straight_through(2 * pi_1 - pi_0 / 2, D)
