"""A small Python API for notebooks and scripts: load a trained model and use it, without Hydra.

    from vae.api import load
    m = load("outputs/2026-12-06/12-00-00/checkpoints/best.pt")   # a checkpoint, or an export (vae.api.export)
    x = m.test_images(16)                     # uint8 [16, H, W] from the run's own test set
    logits = m.encode(x)                      # [16, N, K] logits of q(z|x)
    codes = m.argmax_code(x)                  # [16, N] class of each variable
    means = m.decode(codes)                   # [16, H, W] Bernoulli means p(x|z) of one-hot codes
    samples = m.sample(64, seed=0)            # [64, H, W] decoded draws from the prior p(z)
    elbo = m.elbo(x, seed=0)                  # [16] discrete -ELBO per image, nats
    bound = m.iw_bound(x, k=1000, seed=0)     # [16] importance-weighted bound on -log p(x), nats
    path = m.interpolate(x[0], x[1], steps=8) # [8, H, W] from one image's code to the other's

Images go in as uint8 grey levels [B, H, W] (as the datasets hold them) or floats in [0, 1] ([B, H, W] or flat
[B, H*W]); images come out as float tensors [B, H, W] in [0, 1]. Every random draw takes a `seed`, so a notebook
cell gives the same numbers when run again. Scoring is exactly `python -m vae.evaluate`'s (vae/core/metrics.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from vae.core import metrics
from vae.training.checkpoint import EXPORT_FORMAT
from vae.core.gumbel import one_hot_argmax, sample_gumbel

Images = Union[torch.Tensor, "numpy.ndarray"]  # noqa: F821


class Model:
    """A trained categorical VAE with its run's settings. `model` is the torch module, `config` the run's config
    (a plain dict), `tau` the temperature it ended at, `estimator` the gradient estimator it was trained with."""

    def __init__(self, model, config: dict, tau: float, source: Path, epoch: int, step: int,
                 device: Union[str, torch.device] = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config, self.tau, self.source, self.epoch, self.step = config, tau, source, epoch, step
        self.estimator = "st_gumbel" if config.get("hard") else config.get("estimator", "gumbel")
        self.image_shape = tuple(model.image_shape)
        self.latent_dim, self.categorical_dim = model.latent_dim, model.categorical_dim

    def __repr__(self) -> str:
        h, w = self.image_shape
        return (f"Model({self.source}: {self.config.get('model', {}).get('name', 'mlp')}, {self.latent_dim} x "
                f"{self.categorical_dim} code, {h}x{w} images, {self.estimator}, epoch {self.epoch})")

    # -- images in and out --------------------------------------------------------------------------------------

    def _flat(self, x: Images) -> torch.Tensor:
        """Images as the model reads them, float [B, H*W] in [0, 1]. A wrong size or value range is an error here:
        reshaped or scaled silently it would score nonsense (49 images of 32 x 32 hold as many pixels as 64 of 28 x
        28; grey levels as floats are 255 times too bright)."""
        x = torch.as_tensor(x)
        h, w = self.image_shape
        if tuple(x.shape[-2:]) != (h, w) and not (x.dim() <= 2 and x.shape[-1:] == (h * w,)):
            raise ValueError(f"images of shape {tuple(x.shape)} do not fit this model's {h} x {w}: pass "
                             f"[B, {h}, {w}], one image [{h}, {w}] or flat [B, {h * w}]")
        if x.dtype == torch.uint8:
            x = x.float() * (1.0 / 255)  # as DeviceSplit.batch scales: the trainer's and evaluate's very inputs
        elif x.dtype == torch.bool:
            x = x.float()
        elif not x.is_floating_point():
            raise ValueError(f"images of dtype {x.dtype}: pass uint8 grey levels (e.g. x.astype(np.uint8)) or floats "
                             "in [0, 1]")
        x = x.to(self.device, torch.float32).reshape(-1, h * w)
        if x.numel() and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise ValueError(f"float images must hold values in [0, 1] (found {x.min().item():g} to "
                             f"{x.max().item():g}); divide grey levels by 255, or pass them as uint8")
        return x

    def _images(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(*flat.shape[:-1], *self.image_shape).cpu()

    def test_images(self, n: Optional[int] = None, data_root: Optional[str] = None) -> torch.Tensor:
        """The first `n` images of the run's own test set (all when None), uint8 [n, H, W], as the run saw them
        (the same static binarization)."""
        from omegaconf import OmegaConf

        from vae.settings.config import DataConfig
        from vae.data.device_data import scoring_test_split

        data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), self.config["data"])
        if data_root is not None:
            data_cfg.root = data_root
        split = scoring_test_split(data_cfg, torch.device("cpu"))
        n = split.n if n is None else min(n, split.n)
        x = split.batch(torch.arange(n))
        return (x * 255).round().to(torch.uint8).reshape(n, *self.image_shape)

    # -- the model ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, x: Images) -> torch.Tensor:
        """Logits of q(z|x), [B, latent_dim, categorical_dim]."""
        return self.model.encode(self._flat(x)).cpu()

    @torch.no_grad()
    def argmax_code(self, x: Images) -> torch.Tensor:
        """The most probable class of each variable, [B, latent_dim] (the code TensorBoard's pictures decode)."""
        return self.model.encode(self._flat(x)).argmax(-1).cpu()

    def _one_hot(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes).to(self.device)
        n, k = self.latent_dim, self.categorical_dim
        if codes.is_floating_point() and codes.dim() >= 2 and tuple(codes.shape[-2:]) == (n, k):
            return codes  # one-hot or relaxed codes as they are
        if codes.is_floating_point() or codes.dim() == 0 or codes.shape[-1] != n:
            raise ValueError(f"codes of shape {tuple(codes.shape)} ({codes.dtype}): pass classes as integers [B, {n}] "
                             f"or one-hot (or relaxed) codes as floats [B, {n}, {k}]")
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(f"classes must lie in [0, {k - 1}] (found {codes.min().item()} to {codes.max().item()})")
        return torch.nn.functional.one_hot(codes.long(), k).float()

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Bernoulli means [B, H, W] of p(x|z) for codes given as classes [B, latent_dim] or as (one-hot or relaxed)
        codes [B, latent_dim, categorical_dim]."""
        return self._images(torch.sigmoid(self.model.decode(self._one_hot(codes))))

    @torch.no_grad()
    def reconstruct(self, x: Images) -> torch.Tensor:
        """Bernoulli means [B, H, W] decoded from each image's argmax code (the definition every picture uses)."""
        return self._images(torch.sigmoid(self.model.decode(one_hot_argmax(self.model.encode(self._flat(x))))))

    @torch.no_grad()
    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        """Bernoulli means [n, H, W] of n codes drawn from the prior p(z) (exact categorical draws)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        g = torch.Generator(device=self.device).manual_seed(seed)
        noise = sample_gumbel((n, self.latent_dim, self.categorical_dim), generator=g, device=self.device)
        return self._images(torch.sigmoid(self.model.decode(one_hot_argmax(self.model.log_prior() + noise))))

    @torch.no_grad()
    def interpolate(self, a: Images, b: Images, steps: int = 8) -> torch.Tensor:
        """Images [steps, H, W] along a discrete path from a's argmax code to b's: variable after variable (in
        order of index) switches from a's class to b's, so every step is a code the model can emit."""
        codes = [self.argmax_code(v) for v in (a, b)]
        if any(len(c) != 1 for c in codes):
            raise ValueError(f"interpolate takes two single images, not batches of {len(codes[0])} and "
                             f"{len(codes[1])}: pass x[i] and x[j]")
        return self.decode(path_codes(codes[0][0], codes[1][0], steps))

    # -- scores (nats per image, lower is better) ---------------------------------------------------------------

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def elbo(self, x: Images, seed: int = 0) -> torch.Tensor:
        """The discrete negative ELBO per image [B]: -log p(x|z) with one exact sample z ~ q(z|x), plus the
        analytic KL(q(z|x) || p(z)) (vae.core.metrics.batch_terms' `elbo_discrete`)."""
        terms = metrics.batch_terms(self.model, self._flat(x), tau=self.tau, hard=True,
                                    generator=self._generator(seed))
        return terms["elbo_discrete"].cpu()

    def iw_bound(self, x: Images, k: int = 1000, seed: int = 0, chunk: int = 100) -> torch.Tensor:
        """The k-sample importance-weighted bound on -log p(x) per image [B] (Burda et al. 2016)."""
        return metrics.iw_bound_batch(self.model, self._flat(x), k=k, chunk=chunk,
                                      generator=self._generator(seed)).cpu()

    # -- export -------------------------------------------------------------------------------------------------

    def export(self, path: Union[str, Path]) -> Path:
        """Write the weights and settings only (no optimizer state, no random streams): a file of about a third of
        a checkpoint's size that vae.evaluate, vae.sample and `load` accept; training cannot resume from it."""
        from vae.common.atomic import atomic_write

        state = {"format": EXPORT_FORMAT, "model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                 "image_shape": list(self.image_shape), "config": self.config, "tau": self.tau, "epoch": self.epoch,
                 "epoch_step": 0, "step": self.step, "torch_version": str(torch.__version__)}
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f), "export")
        return path


def path_codes(za: torch.Tensor, zb: torch.Tensor, steps: int) -> torch.Tensor:
    """[steps, N] class codes from za to zb: at step j the first round(j / (steps - 1) * D) of the D variables that
    differ take zb's class."""
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if za.shape != zb.shape or za.dim() != 1:
        raise ValueError(f"two codes of one shape [N] expected, got {tuple(za.shape)} and {tuple(zb.shape)}")
    differ = (za != zb).nonzero().flatten()
    out = za.repeat(steps, 1)
    for j in range(steps):
        switched = differ[:round(j / (steps - 1) * len(differ))]
        out[j, switched] = zb[switched]
    return out


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu", key: str = "path") -> Model:
    """A model from a train.py checkpoint (last.pt, best.pt) or an export, checked as every command checks it; a
    bad file is a one-line `vae.common.errors.UserError` naming `key` (the setting a command line passed it as)."""
    from omegaconf import OmegaConf

    from vae.training.checkpoint import load_checkpoint, model_from_checkpoint, saved_config

    path = Path(path).expanduser()
    ckpt = load_checkpoint(path, key=key, resume=False)
    model = model_from_checkpoint(ckpt, path, key=key)
    config = OmegaConf.to_container(saved_config(ckpt), resolve=True)
    return Model(model, config, float(ckpt["tau"]), path, int(ckpt["epoch"]), int(ckpt["step"]), device)
