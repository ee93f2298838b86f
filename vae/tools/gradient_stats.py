"""Statistics of an estimator's gradient estimates on one batch, streamed: memory does not grow with their number.

Every estimate is first a gradient with respect to the encoder's logits, delta [B*N*K] (`logit_gradient_chunks`).
Two definitions are computed from the same estimates:

  ours     g = J^T delta, the gradient of the whole loss (reconstruction and KL) with respect to the encoder's
           parameters (J = d logits / d parameters). Inner products g.h = delta^T M eta with M = J J^T, the
           encoder's Gram matrix (`encoder_gram`): no parameter-sized vector per estimate.
  reinmax  as Liu et al. (2023) measure it (their mnist_vae `analyze_gradient`): delta minus the KL's gradient, i.e.
           the gradient of the reconstruction term alone, with respect to the logits themselves.

The reference is the exact gradient (summing over all K^N codes) or, where that is out of reach, the mean of many
independent rloo estimates: unbiased, with a standard error measured from its own spread.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional

import torch

from vae.core.gumbel import sample_gumbel
from vae.core.loss import kl_categorical

# Copies of the batch pushed through one estimator call (their images together), and the noise draws per call
# (copies x images x an estimator's samples per image): 32768 keeps rloo's and gumbel_rao's defaults at the full
# 2048 rows and bounds a call whatever estimator_samples is.
ROWS_PER_CALL = 2048
DRAWS_PER_CALL = 32768
# Columns of the Gram matrix formed at once; each needs a parameter-sized vector (537,360 floats for a 4 x 4 code)
# and the encoder's activations of the batch, so fewer are formed together for large batches.
COLUMNS_AT_ONCE = 32
COLUMN_BLOCK_BYTES = 2**30
ENCODER_UNITS = 512 + 256  # the encoder's hidden units (vae/core/model.py): activations per image, besides the logits
DECODER_UNITS = 256 + 512 + 784
_TINY = torch.finfo(torch.float64).tiny


def draws_per_image(estimator) -> int:
    """Noise draws per image and sample: the leading dimension of [k, B, N, K] noise (rloo, gumbel_rao), else 1."""
    shape = estimator.noise_shape(1, 1, 2)
    return shape[0] if len(shape) == 4 else 1


def copies_per_call(batch_size: int, draws: int) -> int:
    return max(1, min(ROWS_PER_CALL // batch_size, DRAWS_PER_CALL // (batch_size * draws)))


class _GivenLogits:
    """The model with its encoder's output replaced by a given tensor, so that one backward pass through an estimator
    gives the gradient with respect to the logits of every copy of the batch separately."""

    def __init__(self, model, logits):
        self.model, self.logits = model, logits

    def encode(self, x):
        return self.logits

    def decode(self, z):
        return self.model.decode(z)

    def log_prior(self):
        return self.model.log_prior()


def logit_gradient_chunks(model, x, estimator, tau: torch.Tensor, generator, samples: int) -> Iterator[torch.Tensor]:
    """`samples` estimates of d(batch-mean surrogate)/d(logits of the batch), in chunks [r, B*N*K].

    The batch is repeated r times in one estimator call, each copy with its own noise, and one backward pass gives
    the gradient with respect to each copy's logits.
    """
    with torch.no_grad():
        logits = model.encode(x)
    B, N, K = logits.shape
    per_call = copies_per_call(B, draws_per_image(estimator))
    for start in range(0, samples, per_call):
        r = min(per_call, samples - start)
        copies = logits.repeat(r, 1, 1).requires_grad_()
        noise = sample_gumbel(estimator.noise_shape(r * B, N, K), generator=generator, device=x.device)
        surrogate = estimator.batch_loss(_GivenLogits(model, copies), x.repeat(r, 1), noise, tau)[0]
        (delta,) = torch.autograd.grad(surrogate, copies)
        yield delta.reshape(r, B * N * K) * r  # the surrogate averages r*B images, one estimate B


def logits_gradients(model, x, estimator, tau: torch.Tensor, generator, samples: int) -> torch.Tensor:
    """All `samples` estimates at once, [samples, B*N*K] (tests, and the single exact gradient)."""
    return torch.cat(list(logit_gradient_chunks(model, x, estimator, tau, generator, samples)))


def kl_logits_gradient(model, x) -> torch.Tensor:
    """d(batch-mean KL(q || p))/d(logits), [B*N*K]: every estimator adds this same analytic term to its surrogate."""
    logits = model.encode(x).detach().requires_grad_()
    (grad,) = torch.autograd.grad(kl_categorical(logits, model.log_prior().detach()).mean(), logits)
    return grad.flatten()


def gram_columns(batch_size: int, encoder_params: int) -> int:
    """Gram columns formed at once: each holds a parameter-sized vector and the batch's encoder activations."""
    per_column = 4 * (2 * encoder_params + 4 * batch_size * ENCODER_UNITS)
    return max(1, min(COLUMNS_AT_ONCE, COLUMN_BLOCK_BYTES // per_column))


def encoder_gram(model, x) -> torch.Tensor:
    """M = J J^T, J = d(logits of the batch)/d(encoder parameters) [B*N*K, P], in float64.

    An estimate's encoder gradient is g = J^T delta, delta its gradient with respect to the logits, and every number
    reported is made of inner products g.h = delta^T M eta: with M in hand, no parameter-sized vector is formed per
    estimate. Column by column, M e = J (J^T e): a vector-Jacobian product, then a Jacobian-vector product; the unit
    vectors e are made a block at a time (a whole identity matrix would be as large as M).
    """
    import warnings

    params = {k: v.detach() for k, v in model.encoder.named_parameters()}

    def logits_of(p):  # model.encode(x), flattened, as a function of the encoder's parameters
        return torch.func.functional_call(model.encoder, p, (x,)).flatten()

    _, vjp = torch.func.vjp(logits_of, params)

    def column(e):
        (v,) = vjp(e)
        return torch.func.jvp(logits_of, (params,), (v,))[1]

    D = logits_of(params).numel()
    step = gram_columns(len(x), sum(p.numel() for p in params.values()))
    gram = torch.empty(D, D, dtype=torch.float64, device=x.device)
    with warnings.catch_warnings():  # torch.func.jvp uses torch.jit.script internally, and torch 2.14 warns about it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        for start in range(0, D, step):
            stop = min(start + step, D)
            block = torch.zeros(stop - start, D, device=x.device)
            block[torch.arange(stop - start), torch.arange(start, stop)] = 1
            gram[start:stop] = torch.func.vmap(column)(block)
    return gram


class Moments:
    """Running sums over estimates delta_i (rows of logit gradients), for both definitions.

    Sums of squares are taken around a pivot (the first chunk's mean), so that the spread of estimates close to each
    other is not lost to cancellation. `gram` None: the parameter-space sums are skipped (definition=reinmax).
    `reference` (logits, the whole loss): E[cos(g_i, g_ref)] is summed too.
    """

    def __init__(self, gram: Optional[torch.Tensor], reference: Optional[torch.Tensor] = None):
        self.gram, self.reference = gram, reference
        self.n, self.total = 0, None
        self.param_sq = self.logit_sq = self.cosines = 0.0
        self.pivot = self.gram_pivot = self.gram_reference = None
        if gram is not None and reference is not None:
            self.gram_reference = gram @ reference
            self.reference_norm = (reference @ self.gram_reference).clamp_min(0).sqrt()

    def add(self, rows: torch.Tensor) -> None:
        d = rows.double()
        if self.pivot is None:
            self.pivot, self.total = d.mean(dim=0), torch.zeros_like(d[0])
            self.gram_pivot = None if self.gram is None else self.pivot @ self.gram
        self.n += len(d)
        self.total += d.sum(dim=0)
        s = d - self.pivot
        self.logit_sq += (s * s).sum().item()
        if self.gram is not None:
            gd = d @ self.gram
            self.param_sq += ((gd - self.gram_pivot) * s).sum().item()
            if self.gram_reference is not None:
                norms = ((gd * d).sum(dim=-1).clamp_min(0).sqrt() * self.reference_norm)
                self.cosines += ((d @ self.gram_reference) / norms.clamp_min(torch.finfo(d.dtype).tiny)).sum().item()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.n

    def param_norm(self, v: torch.Tensor) -> float:
        return (v @ self.gram @ v).clamp_min(0).sqrt().item()

    def param_spread(self) -> float:
        """Sum over the parameters of the sample variance of g: E|g - E[g]|^2, with n - 1."""
        m = self.mean - self.pivot
        return max(self.param_sq - self.n * (m @ self.gram @ m).item(), 0.0) / (self.n - 1)

    def logit_spread(self) -> float:
        """Sum over the logits of the sample variance of delta (the KL's gradient, a constant, drops out), n - 1."""
        m = self.mean - self.pivot
        return max(self.logit_sq - self.n * (m @ m).item(), 0.0) / (self.n - 1)


def summarize(chunks, gram: Optional[torch.Tensor], reference: Optional[torch.Tensor] = None) -> Moments:
    moments = Moments(gram, reference)
    for rows in chunks:
        moments.add(rows)
    return moments


def ours(m: Moments, reference: torch.Tensor, reference_se: Optional[float] = None) -> Dict[str, float]:
    """Encoder-parameter gradient of the whole loss. Against the exact g* (reference_se None): bias
    |E[g] - g*| / |g*|, std sqrt(E|g - E[g]|^2) / |g*|, cosine E[cos(g, g*)]. Against an estimated reference r, of
    standard error reference_se |r|: the same under est_ names (divided by |r|), est_noise the bias that sampling
    error alone gives (the estimates' and the reference's), and rel_std sqrt(E|g - E[g]|^2) / |E[g]|, which needs no
    reference."""
    ref_norm = m.param_norm(reference)
    spread = m.param_spread() ** 0.5
    stats = {"bias": m.param_norm(m.mean - reference) / ref_norm, "std": spread / ref_norm,
             "cosine": m.cosines / m.n}
    if reference_se is None:
        return stats
    return {"est_bias": stats["bias"], "est_noise": (stats["std"] ** 2 / m.n + reference_se ** 2) ** 0.5,
            "est_std": stats["std"], "est_cosine": stats["cosine"],
            "rel_std": spread / max(m.param_norm(m.mean), _TINY)}


def reinmax(m: Moments, reference: torch.Tensor, kl_grad: torch.Tensor,
            reference_se: Optional[float] = None) -> Dict[str, float]:
    """ReinMax's definition (Liu et al. 2023): g the gradient of the reconstruction term with respect to the logits,
    g* the reference's. reinmax_bias |E[g] - g*| / |g*|, reinmax_cos cos(E[g], g*) (of the mean, not a mean of
    cosines), reinmax_rel_std |std(g)| / |E[g]| with the per-coordinate std over the n estimates (divided by n, as
    their code does); reinmax_noise sqrt(E|g - E[g]|^2 / n) / |g*|, the bias sampling error alone gives. Against an
    estimated reference (of standard error reference_se |g*|): reinmax_est_bias, reinmax_est_noise (the reference's
    error included) and reinmax_est_cos."""
    g, g_star = m.mean - kl_grad, reference - kl_grad
    g_norm, star_norm = g.norm().item(), g_star.norm().item()
    pop_std = (m.logit_spread() * (m.n - 1) / m.n) ** 0.5
    noise = (m.logit_spread() / m.n) ** 0.5 / star_norm
    prefix = "reinmax_" if reference_se is None else "reinmax_est_"
    return {f"{prefix}bias": (g - g_star).norm().item() / star_norm,
            f"{prefix}noise": noise if reference_se is None else (noise ** 2 + reference_se ** 2) ** 0.5,
            "reinmax_rel_std": pop_std / max(g_norm, _TINY),
            f"{prefix}cos": (g @ g_star).item() / max(g_norm * star_norm, _TINY)}


def reference_summary(m: Moments, kl_grad: torch.Tensor, estimator: str) -> Dict:
    """What an estimated reference r (the mean of m.n estimates) is: its norms and standard errors relative to them,
    in parameter space (when the Gram matrix was formed) and in ReinMax's definition."""
    info = {"estimator": estimator, "estimates": m.n, "estimated": True}
    if m.gram is not None:
        info["norm"] = m.param_norm(m.mean)
        info["rel_se"] = (m.param_spread() / m.n) ** 0.5 / max(info["norm"], _TINY)
    info["reinmax_norm"] = (m.mean - kl_grad).norm().item()
    info["reinmax_rel_se"] = (m.logit_spread() / m.n) ** 0.5 / max(info["reinmax_norm"], _TINY)
    return info


def compare(estimates: torch.Tensor, exact: torch.Tensor, gram: torch.Tensor) -> Dict[str, float]:
    """bias, std and cosine of the encoder gradients J^T delta of the estimates delta [S, D] against J^T delta*."""
    exact = exact.double()
    return ours(summarize([estimates], gram, exact), exact)
