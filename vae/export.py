"""A weights-only file from a checkpoint: the model and the run's settings, without Adam's state or the random
streams (about a third of the size). vae.evaluate, vae.sample and vae.api.load accept it; train.py cannot resume
from it.

    python -m vae.export checkpoint=outputs/<date>/<time>/checkpoints/best.pt [out=model.pt]

`out` defaults to `<checkpoint stem>.export.pt` beside the checkpoint. Settings: configs/export.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vae.settings.config import CONFIG_DIR
from vae.common.errors import UserError, entry_point


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = None
    out: Optional[str] = None


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def export(cfg: DictConfig) -> Path:
    from vae.api import load
    from vae.settings.checks import check_writable

    if not cfg.checkpoint:
        raise UserError("checkpoint= is required: python -m vae.export checkpoint=<run>/checkpoints/best.pt")
    path = Path(cfg.checkpoint).expanduser()
    out = Path(cfg.out).expanduser() if cfg.out else path.with_name(path.stem + ".export.pt")
    if out.resolve() == path.resolve():
        raise UserError(f"out={str(out)!r} is the checkpoint itself; choose another file")
    if out.is_dir():
        raise UserError(f"out={str(out)!r} is a directory; name the file to write, e.g. out={str(out / 'model.pt')!r}")
    check_writable(out.parent, "out")
    written = load(path, key="checkpoint").export(out)
    print(f"wrote {written} ({written.stat().st_size / 1e6:.1f} MB; the checkpoint: "
          f"{path.stat().st_size / 1e6:.1f} MB)")
    return written


@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
