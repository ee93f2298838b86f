"""Checkpoints: plain dicts that `torch.load(..., weights_only=True)` accepts, written atomically.

A checkpoint is written to a temporary file in the same directory, fsynced, then `os.replace`d over the old
one, so a crash or `kill -9` at any moment leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from vae.atomic import atomic_write, remove_stray_temporaries
from vae.config import ARCHITECTURE_KEYS, Config
from vae.errors import UserError

FORMAT = "gumbel-vae/1"
_ABSENT = object()
log = logging.getLogger("train")
REQUIRED_KEYS = ("format", "model", "optimizer", "epoch", "epoch_step", "step", "tau", "rng", "config")


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise UserError(f"could not write checkpoint {path}: {e.strerror or e} (free disk space or fix permissions "
                        f"of {path.parent}); the previous checkpoint there is intact") from e


def load_checkpoint(path, key: str = "resume") -> Dict[str, Any]:
    """Load and sanity-check a checkpoint; every failure is one actionable line naming `key` and the file."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r}: no such file; pass the path of a checkpoint, "
                        f"e.g. {key}=outputs/<date>/<time>/checkpoints/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError) as e:
        kind = "truncated or corrupt" if zipfile.is_zipfile(path) or path.stat().st_size > 0 else "empty"
        raise UserError(f"{key}={str(path)!r} is not a readable checkpoint ({kind}: {str(e).splitlines()[0][:120]}); "
                        "use another file, e.g. checkpoints/best.pt of the same run") from e
    except Exception as e:  # weights_only refuses pickles holding anything but plain data
        raise UserError(f"{key}={str(path)!r} is not a gumbel-vae checkpoint ({type(e).__name__}); "
                        "pass a last.pt or best.pt written by train.py") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{key}={str(path)!r} is not a gumbel-vae checkpoint (format {FORMAT!r} expected); "
                        "pass a last.pt or best.pt written by train.py")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{key}={str(path)!r} lacks {', '.join(missing)}; it was not written by this train.py")
    return ckpt


def architecture_mismatch(a: DictConfig, b: Dict[str, Any], keys: Iterable[str]) -> list:
    return [f"{k}={b.get(k)!r} in the checkpoint but {k}={a[k]!r} here" for k in keys if a[k] != b.get(k)]


def resume_config(cfg: DictConfig, ckpt: Dict[str, Any], overrides: Optional[Iterable[str]] = None) -> DictConfig:
    """The config a resumed run continues with: the checkpoint's own, plus what this command line overrides.

    `python train.py resume=last.pt` must continue *that* run (its `hard`, `temperature`, data settings...), not
    the defaults; `resume=last.pt epochs=20` may extend it. Settings that shape the parameters may not change.
    """
    merged = OmegaConf.merge(OmegaConf.structured(Config), ckpt["config"])
    for item in overrides or ():
        key = item.lstrip("+~").split("=", 1)[0]
        # Config groups that are not keys (experiment=..., hparams_search=...) were expanded into the keys
        # the command line also carries; hydra.* settings do not belong to the run.
        if key.startswith("hydra.") or key == "resume" or OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
            continue
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    merged.resume = cfg.resume
    differ = architecture_mismatch(merged, ckpt["config"], ARCHITECTURE_KEYS)
    if differ:
        raise UserError(f"resume={cfg.resume!r} has a different architecture: {'; '.join(differ)}. "
                        "Drop those overrides to continue the run, or start a new run without resume=")
    return merged


def check_model_state(ckpt: Dict[str, Any], model_state: Dict[str, torch.Tensor], path) -> None:
    """The checkpoint's weights must fit the model its own config describes (a tampered or foreign file may not)."""
    saved = ckpt["model"]
    wrong = [k for k in model_state if k not in saved or tuple(saved[k].shape) != tuple(model_state[k].shape)]
    extra = [k for k in saved if k not in model_state]
    if wrong or extra:
        detail = ", ".join(f"{k} {tuple(saved[k].shape) if k in saved else 'missing'} vs {tuple(model_state[k].shape)}"
                           for k in wrong[:3]) or f"unexpected {', '.join(extra[:3])}"
        raise UserError(f"{path}: its weights do not fit the architecture its config describes ({detail}); "
                        "the file is damaged or not from this train.py")


class RunCheckpoints:
    """A trainer callback: `last.pt` after every epoch, `best.pt` after an epoch with a new lowest test loss."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.last = self.dir / "last.pt"
        for stray in remove_stray_temporaries(self.dir):
            log.info("removed %s, left by a run killed while saving", stray.name)

    def save(self, trainer, name: str = "last.pt") -> None:
        save_checkpoint(trainer.checkpoint(), self.dir / name)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        self.save(trainer, "last.pt")
        if is_best:
            self.save(trainer, "best.pt")
