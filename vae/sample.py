"""Pictures and arrays from a trained model: prior samples, reconstructions, interpolations.

    python -m vae.sample checkpoint=outputs/<date>/<time>/checkpoints/best.pt      # or an export
    python -m vae.sample checkpoint=... n=100 seed=1 pair=[3,7] steps=12 out=/tmp/pictures

Writes into `out` (default: `<checkpoint stem>.samples/` beside the checkpoint) one PNG grid and one `.npy` array
(float32 [n, H, W] Bernoulli means in [0, 1]) of each:
  prior            n codes drawn from the prior p(z), decoded;
  reconstructions  the first `recon` test images (top row) above their reconstructions from the argmax code;
  interpolation    `steps` codes on a discrete path from test image pair[0]'s argmax code to pair[1]'s (variable
                   after variable switches class; vae.api.path_codes), decoded.
Seeded: the same command draws the same pictures. Settings: configs/sample.yaml (schema `SampleConfig`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vae.common.atomic import atomic_write
from vae.settings.config import CONFIG_DIR
from vae.settings.rules import DEVICE, MAX_IMAGES, SEED, Rule, check_schema, integer, setting
from vae.common.errors import UserError, entry_point

log = logging.getLogger("sample")


@dataclass
class SampleConfig:
    checkpoint: Optional[str] = None
    n: int = setting(64, integer(1, MAX_IMAGES))     # prior samples
    nrow: int = setting(8, integer(1, MAX_IMAGES))   # images per row of the prior grid
    recon: int = setting(8, integer(1, MAX_IMAGES))  # test images above their reconstructions
    # test images whose codes are interpolated
    pair: List[int] = setting(rule=Rule(lambda p: len(p) == 2 and all(isinstance(i, int) and i >= 0 for i in p),
                                        "two test image indices, e.g. pair=[0,1]"), factory=lambda: [0, 1])
    steps: int = setting(10, integer(2, MAX_IMAGES))  # images on the interpolation path, ends included
    seed: int = setting(0, SEED)
    out: Optional[str] = None         # null = <checkpoint stem>.samples/ beside the checkpoint
    data_root: Optional[str] = None   # null = the run's own data.root
    device: str = setting("cpu", DEVICE)


ConfigStore.instance().store(name="sample_schema", node=SampleConfig)


def validate(cfg: DictConfig) -> None:
    if not cfg.checkpoint:
        raise UserError("checkpoint= is required: python -m vae.sample checkpoint=<run>/checkpoints/best.pt")
    check_schema(cfg, SampleConfig)


def grid(images: torch.Tensor, nrow: int) -> "PIL.Image.Image":  # noqa: F821
    from PIL import Image
    from torchvision.utils import make_grid

    g = make_grid(images[:, None].clamp(0, 1), nrow=nrow, padding=2, pad_value=1.0)
    return Image.fromarray((g[0] * 255).round().to(torch.uint8).numpy())


def save(out: Path, name: str, images: torch.Tensor, nrow: int) -> List[str]:
    png, npy = out / f"{name}.png", out / f"{name}.npy"
    atomic_write(npy, lambda f: np.save(f, images.numpy().astype(np.float32)), "array")
    atomic_write(png, lambda f: grid(images, nrow).save(f, format="png"), "picture")
    return [str(png), str(npy)]


def sample(cfg: DictConfig) -> List[str]:
    from vae.api import load
    from vae.settings.checks import check_writable, resolve_device

    validate(cfg)
    m = load(cfg.checkpoint, resolve_device(cfg.device), key="checkpoint")
    path = Path(cfg.checkpoint).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else path.with_name(path.stem + ".samples")
    check_writable(out, "out")
    x = m.test_images(max(cfg.recon, *cfg.pair) + 1, data_root=cfg.data_root)
    if max(cfg.pair) >= len(x):
        raise UserError(f"pair={list(cfg.pair)}: the test set has only {len(x)} images; choose indices from 0 to "
                        f"{len(x) - 1}")
    out.mkdir(parents=True, exist_ok=True)
    written = save(out, "prior", m.sample(cfg.n, seed=cfg.seed), cfg.nrow)
    recon = x[:cfg.recon].float() / 255
    written += save(out, "reconstructions", torch.cat([recon, m.reconstruct(x[:cfg.recon])]), cfg.recon)
    written += save(out, "interpolation", m.interpolate(x[cfg.pair[0]], x[cfg.pair[1]], cfg.steps), cfg.steps)
    log.info("%r: wrote %s", m, ", ".join(Path(w).name for w in written))
    print(f"wrote {len(written)} files to {out}")
    return written


@hydra.main(config_path=str(CONFIG_DIR), config_name="sample", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
