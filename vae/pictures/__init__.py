"""Every picture of a model, drawn once for TensorBoard (vae/training/tensorboard.py) and `python -m vae.evaluate` alike.

Each function returns one [3, H, W] float image in [0, 1]: image tiles of H x W pixels on a grid with 2 px of
white padding, one tile per picture. TensorBoard shows it as it is; vae.evaluate saves it as a PNG (`save_png`).

Decoded pictures are Bernoulli means, sigmoid of the decoder's logits, decoded from one-hot codes: the discrete
model that the test bounds score. One definition of each:

    reconstruction of x    decode(argmax code), the code z_n = argmax_k q(z_n = k|x) for every variable n:
                           the encoder's most likely code, so the same x gives the same picture every time (no
                           sampling noise from one epoch, or one evaluation, to the next)
    prior sample           decode(argmax_k (log p(z_n = k) + g_nk)), Gumbel noise g (the Gumbel-max trick): an
                           exact sample of the prior, the same picture for the same noise
    traversal              x's argmax code with one variable set to each class in turn
    usage map              the aggregate posterior q̄(z_n = k) = mean over test images of q(z_n = k|x)
    class means            the mean test image among those whose argmax code has z_n = k

The image shape (H, W) comes from the model (`model.image_shape`, 28 x 28 when a model does not say) or, for
pictures drawn from images alone, from the `image_shape` argument.

torchvision takes seconds to import: it is imported when a picture is first drawn, not before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from vae.core.gumbel import one_hot_argmax

DEFAULT_IMAGE_SHAPE = (28, 28)  # MNIST's, for models and callers that do not say
PADDING = 2                     # white pixels between tiles and around the grid
BLANK = 1.0                     # a tile with nothing to show is white, the colour of the padding: a hole in the grid

ImageShape = Tuple[int, int]


def image_shape_of(model, image_shape: Optional[ImageShape] = None) -> ImageShape:
    """`image_shape` when given, else the model's own, else 28 x 28."""
    if image_shape is not None:
        return tuple(image_shape)
    return tuple(getattr(model, "image_shape", DEFAULT_IMAGE_SHAPE))


def image_grid(x: torch.Tensor, nrow: int = 8, image_shape: ImageShape = DEFAULT_IMAGE_SHAPE) -> torch.Tensor:
    """Flat images [B, H * W] in [0, 1] -> one [3, H', W'] grid, `nrow` images per row."""
    from torchvision.utils import make_grid

    return make_grid(x.detach().reshape(-1, 1, *image_shape).clamp(0, 1).cpu(), nrow=nrow, padding=PADDING,
                     pad_value=1.0)


@torch.no_grad()
def reconstruct(model, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction of x [B, H * W]: Bernoulli means decoded from its argmax code, [B, H * W]."""
    return torch.sigmoid(model.decode(one_hot_argmax(model.encode(x))))


@torch.no_grad()
def reconstruction_grid(model, x: torch.Tensor, image_shape: Optional[ImageShape] = None) -> torch.Tensor:
    """The images x [B, H * W] in the top row, their reconstructions (`reconstruct`) below."""
    shape = image_shape_of(model, image_shape)
    return image_grid(torch.cat([x, reconstruct(model, x)]), nrow=len(x), image_shape=shape)


@torch.no_grad()
def prior_grid(model, noise: torch.Tensor, nrow: int = 8, image_shape: Optional[ImageShape] = None) -> torch.Tensor:
    """Samples of the prior, one per Gumbel noise draw in `noise` [S, N, K], decoded; `nrow` per row."""
    codes = one_hot_argmax(model.log_prior() + noise)
    return image_grid(torch.sigmoid(model.decode(codes)), nrow=nrow, image_shape=image_shape_of(model, image_shape))


def top_kl_variables(kl_per_variable: torch.Tensor, max_rows: int) -> torch.Tensor:
    """The (up to) max_rows variables of highest KL, decreasing. Ties keep the variables' order (a stable sort), so
    the rows of a collapsed model don't shuffle."""
    return torch.sort(kl_per_variable.detach().cpu(), descending=True, stable=True).indices[:max_rows]


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
def traversal_grid(model, x: torch.Tensor, kl_per_variable: torch.Tensor, *, max_rows: int = 10,
                   image_shape: Optional[ImageShape] = None) -> torch.Tensor:
    """One image x [H * W]: row r = the variable with the r-th highest KL (decreasing), column k = x's argmax code
    with that variable set to class k, decoded. The top-KL variables are the ones the decoder listens to; low-KL
    rows would be K identical pictures."""
    device = next(model.parameters()).device
    rows = top_kl_variables(kl_per_variable, max_rows).to(device)
    codes = traversal_codes(model, x.to(device), rows)
    images = torch.sigmoid(model.decode(codes.flatten(0, 1)))                 # [R * K, H * W]
    return image_grid(images, nrow=model.categorical_dim, image_shape=image_shape_of(model, image_shape))


def usage_map(usage: torch.Tensor, image_shape: ImageShape = DEFAULT_IMAGE_SHAPE) -> torch.Tensor:
    """The aggregate posterior q̄(z_n = k) [N, K] as a heat map: row n = variable n, column k = class k, one tile of
    image_shape each, so that its columns line up with those of the traversal and the class means.

    A tile's grey level is min(1, K q̄ / 2): mid grey is a class used as often as under a uniform code (1/K),
    black a class no image uses, white a class used twice its share or more. A fixed scale, so that epochs and
    runs with the same K compare tile to tile.
    """
    n_var, k = usage.shape
    level = (usage.detach().float().cpu() * (k / 2)).clamp(0, 1)
    tiles = level.reshape(n_var * k, 1).expand(-1, image_shape[0] * image_shape[1])
    return image_grid(tiles, nrow=k, image_shape=image_shape)


def class_means_grid(class_means: torch.Tensor, class_counts: torch.Tensor, kl_per_variable: torch.Tensor, *,
                     max_rows: int = 10, image_shape: ImageShape = DEFAULT_IMAGE_SHAPE) -> torch.Tensor:
    """Row r = the variable with the r-th highest KL (as in `traversal_grid`), column k = the mean test image
    class_means[n, k] [H * W] of the images whose argmax code has z_n = k; a blank (white) tile where no image has
    (class_counts[n, k] = 0). A variable the decoder uses shows K different mean images."""
    rows = top_kl_variables(kl_per_variable, max_rows)
    means = class_means.detach().float().cpu()[rows]                            # [R, K, H * W]
    empty = (class_counts.detach().cpu()[rows] == 0).unsqueeze(-1)              # [R, K, 1]
    tiles = torch.where(empty, torch.full_like(means, BLANK), means)
    return image_grid(tiles.flatten(0, 1), nrow=class_means.shape[1], image_shape=image_shape)


def latent_pictures(model, x: torch.Tensor, stats: dict, *, max_rows: int = 10,
                    image_shape: Optional[ImageShape] = None) -> dict:
    """The pictures of the code, by name: 'traversal' (of the image x [H * W]), 'usage' and 'class_means' (from
    vae.pictures.latents.code_usage's `stats`). TensorBoard writes them as latents/<name>, vae.evaluate as <stem>.<name>.png."""
    shape = image_shape_of(model, image_shape)
    kl = stats["kl_per_variable"]
    return {"traversal": traversal_grid(model, x, kl, max_rows=max_rows, image_shape=shape),
            "usage": usage_map(stats["usage"], image_shape=shape),
            "class_means": class_means_grid(stats["class_means"], stats["class_counts"], kl, max_rows=max_rows,
                                            image_shape=shape)}


def save_png(picture: torch.Tensor, path: Path) -> None:
    """Write a picture [3, H, W] as a PNG, atomically (a reader never sees half a file)."""
    from torchvision.utils import save_image

    from vae.common.atomic import atomic_write

    atomic_write(Path(path), lambda f: save_image(picture, f, format="png"), "image")
