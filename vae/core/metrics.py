"""Evaluation math: the relaxed and the discrete negative ELBO, and the importance-weighted bound, in nats per image.

The model trained with Gumbel-softmax samples is, at test time, a *discrete* latent-variable model
p(x, z) = p(x|z) p(z) with one-hot z, so it is scored with exact categorical samples z ~ q(z|x):

    discrete -ELBO(x) = E_q[-log p(x|z)] + KL(q(z|x) || p(z))                     (one sample, analytic KL)
    IW bound (k)      = -log (1/k) sum_i w_i,   w_i = p(x, z_i) / q(z_i|x),  z_i ~ q(z|x)
                                                                        (Burda et al. 2016, eq. 8)

The IW bound is an upper bound on -log p(x) that tightens as k grows and equals the discrete -ELBO in
expectation at k = 1. The relaxed -ELBO at temperature tau is what training optimises; it is no bound on
-log p(x) of the discrete model and is reported only to compare with the training curves.

Every function here leaves the generator state reproducible: one seed gives the same numbers on a rerun.
"""
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from vae.core.gumbel import gumbel_softmax, sample_categorical
from vae.core.loss import bce_per_image, negative_elbo

# The order of the per-image terms in the on-device accumulator of `evaluate_split`.
SPLIT_METRICS = ("loss", "bce", "kl", "elbo_discrete")


@torch.no_grad()
def batch_terms(model, x: torch.Tensor, *, tau, hard: bool,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Per-image terms [B] of `evaluate_split` for one batch x [B, 784].

    The generator is read twice, in this order: Gumbel noise for the relaxed sample, then Gumbel noise for the
    exact one-hot sample (tests reproduce both by re-seeding).
    """
    logits = model.encode(x)
    log_prior = model.log_prior()
    y = gumbel_softmax(logits, tau, hard=hard, generator=generator)
    loss, bce, kl = negative_elbo(model.decode(y), x, logits, log_prior)
    # Same analytic KL; only the reconstruction term changes: a one-hot z as the discrete model sees it.
    z = sample_categorical(logits, generator=generator)
    elbo_discrete = bce_per_image(model.decode(z), x) + kl
    return {"loss": loss, "bce": bce, "kl": kl, "elbo_discrete": elbo_discrete}


@torch.no_grad()
def evaluate_split(model, split, *, tau, hard: bool, generator: torch.Generator, batch_size: int) -> dict:
    """Means per image over the split, in nats: 'loss', 'bce', 'kl' = the relaxed negative ELBO at temperature
    tau with Gumbel-softmax samples (straight-through one-hot samples when hard), what training optimises;
    'elbo_discrete' = the discrete negative ELBO, -log p(x|z) with one-hot z ~ q(z|x) plus the analytic KL.

    Sums accumulate on the device in float64 (10^4 images x ~100 nats would lose digits in float32); the only
    host sync is the final `.tolist()`.
    """
    sums = torch.zeros(len(SPLIT_METRICS), dtype=torch.float64, device=split.device)
    for x in split.batches(batch_size, generator):
        terms = batch_terms(model, x, tau=tau, hard=hard, generator=generator)
        sums += torch.stack([terms[name].sum() for name in SPLIT_METRICS]).double()
    means = (sums / split.n).tolist()
    return dict(zip(SPLIT_METRICS, means))


@torch.no_grad()
def log_weights(model, x: torch.Tensor, k: int, *, generator: Optional[torch.Generator] = None,
                logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log w_i = log p(x, z_i) - log q(z_i|x) for k exact samples z_i ~ q(z|x), shape [k, B].

        log p(x, z) = -BCE(x, decode(z)) + sum_n log p(z_n),   log q(z|x) = sum_n log q(z_n|x)

    The noise is drawn sample-major ([k, B, N, K]), so on the CPU k = a + b samples read the same random
    stream as a call for a samples followed by one for b: chunking leaves the estimate unchanged.
    """
    if logits is None:
        logits = model.encode(x)
    log_q = F.log_softmax(logits, dim=-1)                                   # [B, N, K]
    z = sample_categorical(logits.expand(k, *logits.shape), generator=generator)  # [k, B, N, K] one-hot
    # Gather by index rather than sum(z * log q): 0 * (-inf) would be NaN where a class has underflowed.
    idx = z.argmax(dim=-1, keepdim=True)                                    # [k, B, N, 1]
    log_q_z = log_q.expand_as(z).gather(-1, idx).sum(dim=(-2, -1))          # [k, B]
    log_prior_z = model.log_prior().expand_as(z).gather(-1, idx).sum(dim=(-2, -1))
    log_px_z = -bce_per_image(model.decode(z), x.expand(k, *x.shape))       # [k, B]
    return log_px_z + log_prior_z - log_q_z


@torch.no_grad()
def iw_bound_batch(model, x: torch.Tensor, *, k: int, chunk: int, generator: Optional[torch.Generator] = None,
                   should_stop: Optional[Callable[[], bool]] = None) -> Optional[torch.Tensor]:
    """The k-sample IW bound -log (1/k) sum_i w_i per image, [B], drawing `chunk` samples at a time.

    Memory is O(chunk * B) whatever k: each chunk's log-weights are folded into a running logsumexp,
    lse <- log(exp(lse) + sum_chunk exp(log w)) = logaddexp(lse, logsumexp(chunk)), which is stable because
    both operands are themselves log-sum-exps. None if `should_stop()` turned true between two chunks.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    logits = model.encode(x)  # once per image batch, not once per chunk
    lse = torch.full((x.shape[0],), -math.inf, dtype=logits.dtype, device=logits.device)
    for start in range(0, k, chunk):
        if should_stop is not None and should_stop():
            return None
        log_w = log_weights(model, x, min(chunk, k - start), generator=generator, logits=logits)
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
    return -(lse - math.log(k))


@torch.no_grad()
def iw_bound(model, split, *, k: int, chunk: int, batch_size: int, generator: torch.Generator,
             progress: Optional[Callable[[int], object]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> Optional[float]:
    """The k-sample IW bound, mean over the split in nats per image (one host sync at the end).

    `progress(n)`, if given, is called after each image batch with the number of images just done (the
    increment, as tqdm's `update` takes it). `should_stop()`, if given, is asked between chunks of samples
    (Ctrl-C / SIGTERM): once it is true the bound is abandoned and None returned, so that a stop takes seconds
    whatever k is (a mean over part of the test set would be no bound on the whole of it).
    """
    total = torch.zeros((), dtype=torch.float64, device=split.device)
    for x in split.batches(batch_size, generator):
        bound = iw_bound_batch(model, x, k=k, chunk=chunk, generator=generator, should_stop=should_stop)
        if bound is None:
            return None
        total += bound.double().sum()
        if progress is not None:
            progress(x.shape[0])
    return total.item() / split.n
