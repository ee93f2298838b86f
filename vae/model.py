"""The categorical VAE: an MLP encoder to latent logits, an MLP decoder to Bernoulli pixel logits."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vae.gumbel import gumbel_softmax

IMAGE_PIXELS = 28 * 28


class CategoricalVAE(nn.Module):
    def __init__(self, latent_dim: int, categorical_dim: int, prior: str = "uniform"):
        super().__init__()
        self.latent_dim, self.categorical_dim = latent_dim, categorical_dim
        code = latent_dim * categorical_dim
        # The encoder ends in a Linear: logits are unconstrained. (The popular port puts a ReLU here, which
        # clips every negative logit to 0 and so forbids q(y|x) from putting less than uniform mass anywhere.)
        self.encoder = nn.Sequential(
            nn.Linear(IMAGE_PIXELS, 512), nn.ReLU(),
            nn.Linear(512, 256), nn.ReLU(),
            nn.Linear(256, code),
        )
        self.decoder = nn.Sequential(
            nn.Linear(code, 256), nn.ReLU(),
            nn.Linear(256, 512), nn.ReLU(),
            nn.Linear(512, IMAGE_PIXELS),
        )
        # A learned prior p(z) = prod_i Categorical(softmax(prior_logits[i])) as in the paper; the uniform
        # prior is the same with the logits pinned at zero (a buffer, not trained).
        prior_logits = torch.zeros(latent_dim, categorical_dim)
        if prior == "learned":
            self.prior_logits = nn.Parameter(prior_logits)
        else:
            self.register_buffer("prior_logits", prior_logits)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 784] in [0, 1] -> logits of q(y|x), [B, latent_dim, categorical_dim]."""
        return self.encoder(x).view(-1, self.latent_dim, self.categorical_dim)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., latent_dim, categorical_dim] (one-hot or relaxed) -> Bernoulli logits [..., 784]."""
        return self.decoder(z.flatten(-2))

    def log_prior(self) -> torch.Tensor:
        """log p(z) per variable and class, [latent_dim, categorical_dim]."""
        return F.log_softmax(self.prior_logits, dim=-1)

    def forward(self, x: torch.Tensor, tau, hard: bool = False, generator=None):
        logits = self.encode(x)
        z = gumbel_softmax(logits, tau, hard=hard, generator=generator)
        return self.decode(z), logits
