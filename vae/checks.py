"""Start-up checks that look beyond the values: the file system, the devices, a checkpoint to resume.

The trainer runs `validate` from a Hydra callback (`on_run_start`), before Hydra creates the run directory, so a
bad setting leaves nothing behind; the values' own ranges are vae/config.py's `validate_ranges`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae.config import validate_ranges
from vae.errors import UserError, exit_with


def check_writable(path: Path, key: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory: we will create the rest."""
    p = Path(path).absolute()
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if not p.is_dir() or not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{key}={str(path)!r} is not writable ({p} is not a writable directory); "
                        f"choose another with {key}=<dir> or fix its permissions")


def resolve_device(name: str):
    """`auto` picks CUDA when present. Asking for CUDA on a machine without one is an error, not a fallback:
    silently training on the CPU would turn minutes into hours."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} but no CUDA GPU is visible to PyTorch; use device=cpu or device=auto "
                            "(or check the driver / `docker run --gpus all`)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                            f"use device=cuda:0..{torch.cuda.device_count() - 1}")
    return device


def validate(cfg: DictConfig, output_dir: Optional[str] = None, overrides: Optional[List[str]] = None,
             check_resume: bool = True) -> None:
    """Everything that can be checked before a run writes its first byte.

    `overrides` are the command line's (hydra.overrides.task): with `resume=`, they decide which settings may
    differ from the checkpoint's.
    """
    validate_ranges(cfg)
    resolve_device(cfg.device)
    check_writable(Path(cfg.data.root), "data.root")
    if output_dir is not None:
        check_writable(Path(output_dir), "hydra.run.dir")
    if check_resume and cfg.resume is not None:
        from vae.checkpoint import check_model_state, load_checkpoint, resume_config
        from vae.model import CategoricalVAE

        ckpt = load_checkpoint(cfg.resume, key="resume")
        resumed = resume_config(cfg, ckpt, overrides)
        validate(resumed, check_resume=False)
        model = CategoricalVAE(resumed.latent_dim, resumed.categorical_dim, resumed.prior)
        check_model_state(ckpt, model.state_dict(), cfg.resume)


class ValidateOnStart(Callback):
    """Hydra calls this before it creates the run directory, so a bad setting leaves nothing behind."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._validate(config, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Per-job values are only known inside each job; train.py validates those again.
        self._validate(config, config.hydra.sweep.dir)

    @staticmethod
    def _validate(config: DictConfig, output_dir: str) -> None:
        task_cfg = OmegaConf.masked_copy(config, [k for k in config.keys() if k != "hydra"])
        try:
            validate_ranges(task_cfg)
            # Threads and the subnormal flush before the first parallel op (a resume check below builds a model):
            # worker threads copy the flush flag only from the thread that starts them.
            from vae.engine import configure_device

            configure_device(resolve_device(task_cfg.device), task_cfg.tf32, task_cfg.threads,
                             task_cfg.flush_denormal)
            validate(task_cfg, output_dir, list(config.hydra.overrides.task))
        except UserError as e:
            exit_with(e)
