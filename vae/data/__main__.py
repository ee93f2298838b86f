"""`python -m vae.data [data=fashion_mnist] [data.root=/x] [...]`: fetch and check the dataset files ahead of
training, with the same config and overrides as train.py."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from vae.data import FILE_NAMES, prepare
from vae.common.errors import UserError, exit_with, one_line

logger = logging.getLogger("vae.data")
USAGE = """usage: python -m vae.data [key=value ...]

Fetch and check the dataset files ahead of training, with train.py's settings and overrides, e.g.
  python -m vae.data                                   # MNIST into <repo>/data/MNIST/raw
  python -m vae.data data=fashion_mnist data.root=/x   # Fashion-MNIST into /x/FashionMNIST/raw
  python -m vae.data data.download=false data.sources=[local,system] data.system_path=/usr/share/datasets/mnist
docs/data.md lists the sources and the checks."""


def main(argv: Optional[Sequence[str]] = None, config_dir: Optional[Path] = None) -> int:
    """Compose the config like train.py does, prepare the files, and say where they are."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vae.settings.config import CONFIG_DIR, validate_ranges

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE)
        return 0
    try:
        with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        validate_ranges(cfg)
        with logging_redirect_tqdm():
            raw = prepare(cfg.data, log=logger.info, progress=None)
    except UserError as e:
        exit_with(e)
    except (HydraException, OmegaConfBaseException) as e:
        exit_with(UserError(one_line(str(e), 1000)))
    print(f"data: {len(FILE_NAMES)} files in {raw}: {', '.join(FILE_NAMES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
