"""What the categorical latents are doing: code usage on the test set and its TensorBoard tags (the pictures of the
code are drawn by vae/pictures/__init__.py).

For N variables of K classes and q(z_n|x) the encoder's posterior:

    aggregate posterior   q̄(z_n) = mean_x q(z_n|x)                    (the usage map: a row per variable)
    perplexity_n          = exp(H[q̄(z_n)])                  1 (one class for every image) .. K (all classes used)
    kl_per_variable_n     = mean_x KL(q(z_n|x) || p(z_n))   0 (the variable carries nothing: posterior collapse)
    confidence            = mean_{x,n} max_k q(z_n=k|x)     1/K (uniform posteriors) .. 1 (one-hot posteriors)
    class mean_{n,k}      = mean of the images x whose argmax code has z_n = k    (a picture of what class k says)

A useful variable has a high perplexity *and* a high KL: it picks different classes for different images
(perplexity) and is sure of its pick for each one (KL up to log K). A variable with KL ~ 0 is ignored by the
decoder; one with perplexity ~ 1 says the same thing about every image.

Nothing here imports TensorBoard: `log_latents` takes the writer, so the module stays cheap to import.
"""
import re
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from vae.core.loss import kl_categorical

# A variable counts as active when its mean KL exceeds this many nats per image. 0.01 is Burda et al.'s (2016)
# active-unit threshold, there on the variance of a Gaussian unit's posterior mean; for a categorical variable
# the KL is the direct measure: it is 0 exactly when q(z_n|x) = p(z_n) for every image.
ACTIVE_KL = 0.01


@torch.no_grad()
def code_usage(model, split, *, batch_size: int, threshold: float = ACTIVE_KL,
               generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Code-usage statistics of `model` on `split`, in one pass (see the module docstring for the formulas).

    Returns 'perplexity' [N] and 'kl_per_variable' [N] (float64 CPU tensors; KL in nats per image),
    'perplexity_mean' (float), 'active' (int: variables whose KL > threshold), 'confidence' (float), and for the
    pictures of vae/pictures/__init__.py: 'usage' [N, K] (the aggregate posterior q̄(z_n = k), float64), 'class_counts'
    [N, K] (images whose argmax code has z_n = k, int64) and 'class_means' [N, K, pixels] (their mean image, as
    the encoder saw it; 0 where no image has that class). `generator` is read only by a dynamically binarized
    split (pass the trainer's eval generator so that the global random stream is left alone).

    The sums stay on the device (float64 but for the image sums, exact in float32 for binary images); the only
    host sync is the final copy of them all.
    """
    n_var, k = model.latent_dim, model.categorical_dim
    q_sum = torch.zeros(n_var, k, dtype=torch.float64, device=split.device)
    kl_sum = torch.zeros(n_var, dtype=torch.float64, device=split.device)
    confidence_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    count_sum = torch.zeros(n_var * k, dtype=torch.float64, device=split.device)
    image_sum = None  # [N * K, pixels], shaped by the first batch
    log_prior = model.log_prior()
    for x in split.batches(batch_size, generator):
        logits = model.encode(x)
        q = F.softmax(logits, dim=-1)
        q_sum += q.double().sum(0)
        # kl_categorical sums over its last two dims: a singleton dim before K makes it one KL per variable.
        kl_sum += kl_categorical(logits.unsqueeze(-2), log_prior.unsqueeze(-2)).double().sum(0)
        confidence_sum += q.amax(-1).double().sum()
        # Sum of the images per (variable, argmax class): one matmul of the one-hot codes with the batch.
        codes = F.one_hot(logits.argmax(-1), k).flatten(1).to(x.dtype)     # [B, N * K]
        count_sum += codes.double().sum(0)
        batch_sum = codes.T @ x                                             # [N * K, pixels]
        image_sum = batch_sum if image_sum is None else image_sum + batch_sum
    q_bar = q_sum / split.n
    # xlogy: a class no image uses contributes 0 * log 0 = 0, not NaN.
    perplexity = torch.exp(-torch.special.xlogy(q_bar, q_bar).sum(-1))
    class_means = image_sum.double() / count_sum.clamp(min=1).unsqueeze(-1)
    host = torch.cat([perplexity, kl_sum / split.n, (confidence_sum / (split.n * n_var)).view(1), q_bar.flatten(),
                      count_sum, class_means.flatten()]).cpu()
    perplexity, kl = host[:n_var], host[n_var:2 * n_var]
    rest = host[2 * n_var + 1:]
    usage, counts, means = rest[:n_var * k], rest[n_var * k:2 * n_var * k], rest[2 * n_var * k:]
    return {"perplexity": perplexity, "perplexity_mean": perplexity.mean().item(), "kl_per_variable": kl,
            "active": int((kl > threshold).sum()), "confidence": host[2 * n_var].item(),
            "usage": usage.view(n_var, k), "class_counts": counts.view(n_var, k).long(),
            "class_means": means.view(n_var, k, -1).float()}


def exact(tag: str) -> str:
    """The custom-scalars plugin reads a chart's tags as regular expressions and keeps every tag they *start*
    (re.match): 'test/loss' alone would also pull in any later 'test/loss_...'. Anchor the end."""
    return re.escape(tag) + "$"


def custom_scalars_layout() -> dict:
    """The layout for SummaryWriter.add_custom_scalars: {category: {chart title: ["Multiline", [tag regex, ...]]}}.

    Curves that are read together share one chart: the train and test loss (over-fitting shows as a gap), the
    relaxed test loss beside the two bounds on -log p(x) of the discrete model (test/iw_bound is one point, at
    the end of training), and the code-usage numbers beside the encoder's gradient norm.
    """
    def chart(*tags: str) -> list:
        return ["Multiline", [exact(t) for t in tags]]

    return {
        "losses": {
            "loss": chart("train/loss", "test/loss"),
            "bounds": chart("test/loss", "test/elbo_discrete", "test/iw_bound"),
        },
        "latents": {
            "perplexity": chart("latents/perplexity"),
            "active": chart("latents/active"),
            "confidence": chart("latents/confidence"),
            "grad_norm": chart("train/grad_norm"),
        },
    }


def log_latents(writer, stats: dict, pictures: dict, step: int) -> None:
    """Write `code_usage` statistics and the pictures of the code (vae.pictures.latent_pictures: 'traversal',
    'usage', 'class_means') as latents/<name> at `step`.

    The per-variable perplexities go to their own tag, `latents/perplexity_per_variable`: TensorBoard files each
    tag under the plugin of its first event, so a histogram written under the scalar's tag `latents/perplexity`
    would be read as a broken scalar (docs/dashboard.md has the details).
    """
    writer.add_scalar("latents/perplexity", stats["perplexity_mean"], step)
    writer.add_histogram("latents/perplexity_per_variable", stats["perplexity"], step)
    writer.add_scalar("latents/active", stats["active"], step)
    writer.add_scalar("latents/confidence", stats["confidence"], step)
    writer.add_histogram("latents/kl_per_variable", stats["kl_per_variable"], step)
    for name, picture in pictures.items():
        writer.add_image(f"latents/{name}", picture, step)
