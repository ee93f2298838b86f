"""The categorical VAE: an encoder to latent logits, a decoder to Bernoulli pixel logits.

Two networks, chosen with the `model` config group and built by `build_model` (the one place any command
constructs a model):
  mlp   the network of Jang, Gu & Poole (2017): encoder H*W-512-256-(N*K), decoder (N*K)-256-512-H*W (the default);
  conv  a small convolutional encoder/decoder (two stride-2 convolutions each way around a 256-unit layer).
Both take flat images [B, H*W] in [0, 1] and return logits of the same shape, so the losses, estimators and
metrics never see which one they train. The image shape (H, W) comes from the data.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from vae.core.gumbel import gumbel_softmax

IMAGE_SHAPE = (28, 28)  # MNIST's; a checkpoint written before image shapes were recorded is of this shape
IMAGE_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]


class CategoricalVAE(nn.Module):
    """The MLP VAE. Subclasses replace `encoder` and `decoder`; the prior and the interface stay."""

    def __init__(self, latent_dim: int, categorical_dim: int, prior: str = "uniform",
                 image_shape: Sequence[int] = IMAGE_SHAPE, hidden: Sequence[int] = (512, 256)):
        super().__init__()
        self.latent_dim, self.categorical_dim = latent_dim, categorical_dim
        self.image_shape = tuple(int(s) for s in image_shape)
        self.pixels = self.image_shape[0] * self.image_shape[1]
        self.encoder, self.decoder = self.networks(latent_dim * categorical_dim, hidden)
        # A learned prior p(z) = prod_i Categorical(softmax(prior_logits[i])) as in the paper; the uniform
        # prior is the same with the logits pinned at zero (a buffer, not trained).
        prior_logits = torch.zeros(latent_dim, categorical_dim)
        if prior == "learned":
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)

    def networks(self, code: int, hidden: Sequence[int]) -> Tuple[nn.Module, nn.Module]:
        # The encoder ends in a Linear: logits are unconstrained. (The popular port puts a ReLU here, which
        # clips every negative logit to 0 and so forbids q(y|x) from putting less than uniform mass anywhere.)
        widths = [self.pixels, *hidden, code]
        encoder, decoder = [], []
        for a, b in zip(widths[:-1], widths[1:]):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        for a, b in zip(widths[::-1][:-1], widths[::-1][1:]):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        self.activation_floats = 2 * sum(hidden)  # per image in the decoder (the IW bound's memory estimate)
        return nn.Sequential(*encoder[:-1]), nn.Sequential(*decoder[:-1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H*W] in [0, 1] -> logits of q(y|x), [B, latent_dim, categorical_dim]."""
        return self.encoder(x).view(-1, self.latent_dim, self.categorical_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., latent_dim, categorical_dim] (one-hot or relaxed) -> Bernoulli logits [..., H*W]."""
        return self.decoder(z.flatten(-2))

    def log_prior(self) -> torch.Tensor:
        """log p(z) per variable and class, [latent_dim, categorical_dim]."""
        return F.log_softmax(self.prior_logits, dim=-1)

    def forward(self, x: torch.Tensor, tau, hard: bool = False, generator=None):
        logits = self.encode(x)
        z = gumbel_softmax(logits, tau, hard=hard, generator=generator)
        return self.decode(z), logits


def _conv_size(n: int) -> int:
    return (n + 2 * 1 - 4) // 2 + 1  # a 4x4 convolution, stride 2, padding 1: halves an even size


class _ConvDecoder(nn.Module):
    """(N*K) -> hidden -> C2 x h2 x w2 -> two transposed stride-2 convolutions -> H*W logits. The transposed
    convolutions are told the exact sizes to reach (`output_size`), so odd image sizes come back whole."""

    def __init__(self, code: int, hidden: int, channels: Sequence[int], sizes: Sequence[Tuple[int, int]]):
        super().__init__()
        (c1, c2), self.sizes = channels, list(sizes)
        h2, w2 = self.sizes[2]
        self.fc = nn.Sequential(nn.Linear(code, hidden), nn.ReLU(), nn.Linear(hidden, c2 * h2 * w2), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1)
        self.c2 = c2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        (h, w), (h1, w1), (h2, w2) = self.sizes
        y = self.fc(z.reshape(-1, z.shape[-1])).view(-1, self.c2, h2, w2)
        y = F.relu(self.up1(y, output_size=[h1, w1]))
        return self.up2(y, output_size=[h, w]).reshape(*lead, h * w)


class ConvCategoricalVAE(CategoricalVAE):
    """Encoder: two 4x4 stride-2 convolutions (1 -> C1 -> C2 channels, ReLU), a `hidden`-unit layer, the logits.
    Decoder: the mirror image. It sees neighbouring pixels as neighbours; on 28x28 images it has 1.8 M weights to
    the MLP's 1.2 M (most of them in the two layers next to the 64 x 7 x 7 feature map)."""

    channels = (32, 64)

    def networks(self, code: int, hidden: Sequence[int]):
        c1, c2 = channels = self.channels
        h, w = self.image_shape
        sizes = [(h, w), (_conv_size(h), _conv_size(w))]
        sizes.append((_conv_size(sizes[1][0]), _conv_size(sizes[1][1])))
        width = hidden[0]
        encoder = nn.Sequential(
            nn.Unflatten(1, (1, h, w)),
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(c2 * sizes[2][0] * sizes[2][1], width), nn.ReLU(),
            nn.Linear(width, code),
        )
        self.activation_floats = 2 * width + 2 * c2 * sizes[2][0] * sizes[2][1] + 2 * c1 * sizes[1][0] * sizes[1][1]
        return encoder, _ConvDecoder(code, width, channels, sizes)


# The model registry: `model.name` -> class. Config choices and messages derive from it.
MODELS: Dict[str, type] = {"mlp": CategoricalVAE, "conv": ConvCategoricalVAE}


def build_model(cfg, image_shape: Sequence[int] = IMAGE_SHAPE) -> CategoricalVAE:
    """The model a run's config describes (`latent_dim`, `categorical_dim`, `prior`, the `model` group), for images
    of `image_shape`. A config without a `model` group (written before it existed) is the MLP."""
    spec = cfg.get("model") or {"name": "mlp", "hidden": [512, 256]}
    cls = MODELS[spec["name"]]
    return cls(int(cfg["latent_dim"]), int(cfg["categorical_dim"]), cfg.get("prior", "uniform") or "uniform",
               image_shape=tuple(image_shape), hidden=tuple(spec["hidden"]))
