"""Score-function (REINFORCE) estimators: unbiased, whatever the decoder, at the price of variance.

With f(z) = -log p(x|z) (the BCE at a one-hot sample z ~ q(z|x)) and the analytic KL,

    grad E_q[f(z)] + grad KL = E_q[(f(z) - b) grad log q(z|x)] + grad KL

for any baseline b that does not depend on z. Each surrogate below is built so that its *value* is the logged
discrete negative ELBO, f(z) + KL, and its gradient is the estimator's: the REINFORCE term enters as
signal * (log q - log q.detach()), zero in value. The decoder's gradient is ordinary backpropagation through f at
the sampled code (an unbiased estimate of its own gradient), the learned prior's that of the KL.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vae.common.errors import UserError
from vae.estimators.base import Estimator, MovingAverageBaseline, check_samples, log_q, sample_codes, score
from vae.core.loss import bce_per_image, kl_categorical


def reconstruction(model, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """f(z) = -log p(x|z) per image for codes z [..., B, N, K] (several samples of one batch at once): [..., B]."""
    x_logits = model.decode(z)
    return bce_per_image(x_logits, x.expand_as(x_logits))


def sampled_terms(model, x: torch.Tensor, noise: torch.Tensor):
    """(logits, one-hot codes z ~ q(z|x) drawn from the noise, f(z) = -log p(x|z), the analytic KL): what every
    score-function estimator here starts from; z is [k, B, N, K] for noise with a leading sample dimension."""
    logits = model.encode(x)
    z = sample_codes(logits, noise)
    return logits, z, reconstruction(model, z, x), kl_categorical(logits, model.log_prior())


class _WithBaseline(Estimator):
    """An estimator whose state is a MovingAverageBaseline (checkpointed with the run)."""

    settings = {"baseline_decay": 0.9}  # the reasons for 0.9: docs/estimators.md, Settings

    @classmethod
    def check_settings(cls, settings, latent_dim, categorical_dim):
        MovingAverageBaseline.check_decay(settings["baseline_decay"])

    def __init__(self, *, baseline_decay, device=None):
        super().__init__(device=device)
        self.baseline = MovingAverageBaseline(baseline_decay, device)

    def state_dict(self):
        return self.baseline.state_dict()

    def load_state_dict(self, state):
        self.baseline.load_state_dict(state)


class SF(_WithBaseline):
    """REINFORCE (Williams 1992) with a moving-average baseline: encoder gradient
    (f(z) - b) grad log q(z|x) per image, one sample z ~ q, plus grad KL.

    b is an exponential moving average of the batch-mean f over past batches (`baseline_decay`), leave-one-out
    within the first batch (see MovingAverageBaseline): it removes the overall level of f, not each image's.
    """

    name = "sf"

    def batch_loss(self, model, x, noise, tau):
        logits, z, f, kl = sampled_terms(model, x, noise)
        loss = f + kl
        signal = f.detach() - self.baseline(f)
        surrogate = loss + signal * score(log_q(logits, z))
        return surrogate.mean(), loss.mean(), f.mean(), kl.mean()


class RLOO(Estimator):
    """REINFORCE leave-one-out (Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE samples, get a baseline for
    free!"): k >= 2 samples per image, each one's baseline the mean f of the other k - 1:

        (1/k) sum_i (f(z_i) - (1/(k-1)) sum_{j != i} f(z_j)) grad log q(z_i|x)  +  grad KL.

    The decoder's gradient and the logged loss are the means over the k samples. Noise [k, B, N, K].
    """

    name = "rloo"
    # k: two is the fewest that give a baseline at all, and each one more costs a decoder pass.
    settings = {"samples": 2}

    @classmethod
    def check_settings(cls, settings, latent_dim, categorical_dim):
        k = settings["samples"]
        check_samples(k, 2)
        if k < 2:
            raise UserError(f"estimator_samples={k} is not allowed with estimator=rloo: each sample's baseline is "
                            "the mean of the image's other samples, so it needs >= 2 (e.g. estimator_samples=2)")

    def noise_shape(self, batch_size, latent_dim, categorical_dim):
        return (self.samples, batch_size, latent_dim, categorical_dim)

    def batch_loss(self, model, x, noise, tau):
        k = noise.shape[0]
        logits, z, f, kl = sampled_terms(model, x, noise)        # z [k, B, N, K], f [k, B], kl [B]
        loss = f + kl
        others = (f.detach().sum(dim=0) - f.detach()) / (k - 1)
        surrogate = loss + (f.detach() - others) * score(log_q(logits, z))
        return surrogate.mean(), loss.mean(), f.mean(), kl.mean()


def taylor_terms(model, mu: torch.Tensor, x: torch.Tensor):
    """f at the mean-field code mu and its gradient df/dmu, per image, with the decoder's weights held fixed
    (they are no part of MuProp's control variate): ([B], [B, N, K]), both detached."""
    with torch.enable_grad():
        mu = mu.detach().requires_grad_(True)
        f_mu = reconstruction(model, mu, x)
        # The images are independent, so the gradient of the sum holds each image's own gradient.
        (grad,) = torch.autograd.grad(f_mu.sum(), mu)
    return f_mu.detach(), grad.detach()


class MuProp(_WithBaseline):
    """MuProp (Gu, Levine, Sutskever & Mnih 2016): REINFORCE with the first-order Taylor expansion of f around the
    mean-field code mu = E_q[z] = softmax(logits) as control variate, its expectation added back analytically:

        (f(z) - f(mu) - f'(mu).(z - mu) - b) grad log q(z|x)  +  f'(mu) . d mu/d logits  +  grad KL.

    Unbiased because E_q[z] = mu, so E_q[f'(mu).(z - mu) grad log q] = f'(mu) . grad E_q[z] = f'(mu) . d mu. Gu et
    al. also centre what is left of the signal with a baseline, as NVIL does; here it is sf's moving average b.
    """

    name = "muprop"

    def batch_loss(self, model, x, noise, tau):
        logits, z, f, kl = sampled_terms(model, x, noise)
        loss = f + kl
        mu = F.softmax(logits, dim=-1)
        f_mu, grad_mu = taylor_terms(model, mu, x)
        residual = f.detach() - f_mu - (grad_mu * (z - mu.detach())).sum(dim=(-2, -1))
        signal = residual - self.baseline(residual)
        linear = (grad_mu * mu).sum(dim=(-2, -1))  # its gradient: f'(mu) . d mu/d logits; zero in value below
        surrogate = loss + signal * score(log_q(logits, z)) + (linear - linear.detach())
        return surrogate.mean(), loss.mean(), f.mean(), kl.mean()
