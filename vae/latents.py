"""What the categorical latents are doing: code usage on the test set, a latent traversal, their TensorBoard tags.

For N variables of K classes and q(z_n|x) the encoder's posterior:

    aggregate posterior   q̄(z_n) = mean_x q(z_n|x)
    perplexity_n          = exp(H[q̄(z_n)])                  1 (one class for every image) .. K (all classes used)
    kl_per_variable_n     = mean_x KL(q(z_n|x) || p(z_n))   0 (the variable carries nothing: posterior collapse)
    confidence            = mean_{x,n} max_k q(z_n=k|x)     1/K (uniform posteriors) .. 1 (one-hot posteriors)

A useful variable has a high perplexity *and* a high KL: it picks different classes for different images
(perplexity) and is sure of its pick for each one (KL up to log K). A variable with KL ~ 0 is ignored by the
decoder; one with perplexity ~ 1 says the same thing about every image.

Nothing here imports TensorBoard: `log_latents` takes the writer, so the module stays cheap to import.
"""
import re
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from vae.loss import kl_categorical

# A variable counts as active when its mean KL exceeds this many nats per image. 0.01 is Burda et al.'s (2016)
# active-unit threshold, there on the variance of a Gaussian unit's posterior mean; for a categorical variable
# the KL is the direct measure: it is 0 exactly when q(z_n|x) = p(z_n) for every image.
ACTIVE_KL = 0.01


@torch.no_grad()
def code_usage(model, split, *, batch_size: int, threshold: float = ACTIVE_KL,
               generator: Optional[torch.Generator] = None) -> Dict[str, object]:
    """Code-usage statistics of `model` on `split`, in one pass (see the module docstring for the formulas).

    Returns 'perplexity' [N] and 'kl_per_variable' [N] (float64 CPU tensors; KL in nats per image),
    'perplexity_mean' (float), 'active' (int: variables whose KL > threshold) and 'confidence' (float).
    `generator` is read only by a dynamically binarized split (pass the trainer's eval generator so that the
    global random stream is left alone).

    The sums stay on the device in float64; the only host sync is the final copy of 2N + 1 numbers.
    """
    n_var, k = model.latent_dim, model.categorical_dim
    q_sum = torch.zeros(n_var, k, dtype=torch.float64, device=split.device)
    kl_sum = torch.zeros(n_var, dtype=torch.float64, device=split.device)
    confidence_sum = torch.zeros((), dtype=torch.float64, device=split.device)
    log_prior = model.log_prior()
    for x in split.batches(batch_size, generator):
        logits = model.encode(x)
        q = F.softmax(logits, dim=-1)
        q_sum += q.double().sum(0)
        # kl_categorical sums over its last two dims: a singleton dim before K makes it one KL per variable.
        kl_sum += kl_categorical(logits.unsqueeze(-2), log_prior.unsqueeze(-2)).double().sum(0)
        confidence_sum += q.amax(-1).double().sum()
    q_bar = q_sum / split.n
    # xlogy: a class no image uses contributes 0 * log 0 = 0, not NaN.
    perplexity = torch.exp(-torch.special.xlogy(q_bar, q_bar).sum(-1))
    host = torch.cat([perplexity, kl_sum / split.n, (confidence_sum / (split.n * n_var)).view(1)]).cpu()
    perplexity, kl = host[:n_var], host[n_var:2 * n_var]
    return {"perplexity": perplexity, "perplexity_mean": perplexity.mean().item(), "kl_per_variable": kl,
            "active": int((kl > threshold).sum()), "confidence": host[-1].item()}


@torch.no_grad()
def traversal_codes(model, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """One-hot codes [R, K, N, K]: x's argmax code with variable rows[r] set to class k, at [r, k]."""
    k = model.categorical_dim
    base = F.one_hot(model.encode(x.view(1, -1))[0].argmax(-1), k)        # [N, K]
    codes = base.expand(len(rows), k, *base.shape).clone()
    classes = torch.arange(k, device=base.device)
    codes[torch.arange(len(rows), device=base.device)[:, None], classes, rows[:, None]] = F.one_hot(classes, k)
    return codes.to(x.dtype)


@torch.no_grad()
def traversal_grid(model, x: torch.Tensor, kl_per_variable: torch.Tensor, *, max_rows: int = 10) -> torch.Tensor:
    """A [3, H, W] image for one test digit x [784]: row r = the variable with the r-th highest KL (decreasing),
    column k = the decoding (sigmoid of the decoder's logits) of x's argmax code with that variable set to class k.

    The top-KL variables are the ones the decoder listens to; low-KL rows would be K identical pictures.
    Ties in KL keep the variables' order (a stable sort), so the rows of a collapsed model don't shuffle.
    """
    # torchvision takes seconds to import: only pay for it when a grid is drawn.
    from torchvision.utils import make_grid

    device = next(model.parameters()).device
    order = torch.sort(kl_per_variable.detach().cpu(), descending=True, stable=True).indices
    rows = order[:max_rows].to(device)
    codes = traversal_codes(model, x.to(device), rows)
    images = torch.sigmoid(model.decode(codes.flatten(0, 1)))                 # [R * K, 784]
    # Same look as vae.tensorboard.image_grid (2 px white padding), one row per variable.
    return make_grid(images.reshape(-1, 1, *model.image_shape).clamp(0, 1).cpu(), nrow=model.categorical_dim, padding=2,
                     pad_value=1.0)


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


def log_latents(writer, stats: dict, grid: torch.Tensor, step: int) -> None:
    """Write `code_usage` statistics and a `traversal_grid` image at `step`.

    The per-variable perplexities go to their own tag, `latents/perplexity_per_variable`: TensorBoard files each
    tag under the plugin of its first event, so a histogram written under the scalar's tag `latents/perplexity`
    would be read as a broken scalar (docs/dashboard.md has the details).
    """
    writer.add_scalar("latents/perplexity", stats["perplexity_mean"], step)
    writer.add_histogram("latents/perplexity_per_variable", stats["perplexity"], step)
    writer.add_scalar("latents/active", stats["active"], step)
    writer.add_scalar("latents/confidence", stats["confidence"], step)
    writer.add_histogram("latents/kl_per_variable", stats["kl_per_variable"], step)
    writer.add_image("latents/traversal", grid, step)
