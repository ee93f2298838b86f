"""Checkpoints: plain dicts that `torch.load(..., weights_only=True)` accepts, written atomically.

A checkpoint is written to a temporary file in the same directory, fsynced, then `os.replace`d over the old
one, so a crash or `kill -9` at any moment leaves either the old or the new file, never half of one.
"""
from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from vae.common.atomic import atomic_write, not_a_regular_file, remove_stray_temporaries, write_failed
from vae.settings.config import ARCHITECTURE_KEYS, DATA_KEYS, Config
from vae.training.engine import RNG_STREAMS
from vae.common.errors import UserError, describe

FORMAT_NAME = "gumbel-vae"
FORMAT = f"{FORMAT_NAME}/1"
_ABSENT = object()
log = logging.getLogger("train")
REQUIRED_KEYS = ("format", "model", "optimizer", "epoch", "epoch_step", "step", "tau", "rng", "config")
# A weights-only export (vae.api.Model.export, python -m vae.export): what scoring and sampling read, nothing more.
EXPORT_FORMAT = f"{FORMAT_NAME}-export/1"
EXPORT_KEYS = ("format", "model", "epoch", "epoch_step", "step", "tau", "config")
RESUME_KEYS = (*REQUIRED_KEYS, "test_loss", "best_test_loss", "epoch_sums", "interval_sums")  # what Trainer.load reads
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def save_checkpoint(state: Dict[str, Any], path: Path) -> None:
    """Write atomically; a failed write (disk full, whatever type it arrives as) is a one-line `WriteFailed` that
    says the previous file is intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_failed(path, e, "checkpoint") from e
    atomic_write(path, lambda f: torch.save(state, f), "checkpoint")


def load_checkpoint(path, key: str = "resume", resume: bool = True) -> Dict[str, Any]:
    """Load and check a checkpoint's whole structure (see `check_structure`); every failure is one actionable line
    naming `key` and the file, before anything of a run is written. `resume=False`: only what scoring the model
    reads (vae.evaluate), so that a checkpoint whose optimizer state is damaged can still be evaluated."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        inside = next((c for c in (path / "checkpoints" / "last.pt", path / "last.pt") if c.is_file()), None)
        hint = f"did you mean {key}={inside}?" if inside else f"pass a file, e.g. {key}=<run>/checkpoints/last.pt"
        raise UserError(f"{key}={str(path)!r} is a directory, not a checkpoint; {hint}")
    kind = not_a_regular_file(path)
    if kind:  # a FIFO would block the load forever, a device stream without end
        raise UserError(f"{key}={str(path)!r} is {kind}, not a checkpoint file; pass the path of a checkpoint, "
                        f"e.g. {key}=outputs/<date>/<time>/checkpoints/last.pt")
    if not path.is_file():
        raise UserError(f"{key}={str(path)!r}: no such file; pass the path of a checkpoint, "
                        f"e.g. {key}=outputs/<date>/<time>/checkpoints/last.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:  # the file is fine; this user may not read it (another file would be no better)
        raise UserError(f"{key}={str(path)!r} cannot be read: {e.strerror}; make it readable (e.g. chmod u+r, or ask "
                        "its owner) or run as a user who may read it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError) as e:
        kind = "truncated or corrupt" if zipfile.is_zipfile(path) or path.stat().st_size > 0 else "empty"
        raise UserError(f"{key}={str(path)!r} is not a readable checkpoint ({kind}: {str(e).splitlines()[0][:120]}); "
                        "use another file, e.g. checkpoints/best.pt of the same run") from e
    except Exception as e:  # weights_only refuses pickles holding anything but plain data
        raise UserError(f"{key}={str(path)!r} is not a gumbel-vae checkpoint ({type(e).__name__}); "
                        "pass a last.pt or best.pt written by train.py") from e
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt == EXPORT_FORMAT:
        if resume:
            raise UserError(f"{key}={str(path)!r} is a weights-only export: it holds no optimizer state or random "
                            "streams to continue from; resume from the run's checkpoints/last.pt")
        missing = [k for k in EXPORT_KEYS if k not in ckpt]
        problem = f"lacks {', '.join(missing)}" if missing else check_structure(ckpt, resume=False)
        if problem:
            raise UserError(f"{key}={str(path)!r} is a damaged export ({problem}); export the checkpoint again")
        return ckpt
    if isinstance(fmt, str) and fmt.startswith(FORMAT_NAME + "/") and fmt != FORMAT:
        raise UserError(f"{key}={str(path)!r} has format {fmt!r}, and this code reads {FORMAT!r} only: it was written "
                        "by another version of train.py; use that version (or update this one)")
    if fmt != FORMAT:
        raise UserError(f"{key}={str(path)!r} is not a gumbel-vae checkpoint (format {FORMAT!r} expected); "
                        "pass a last.pt or best.pt written by train.py")
    missing = [k for k in (RESUME_KEYS if resume else REQUIRED_KEYS) if k not in ckpt]
    if missing:
        raise UserError(f"{key}={str(path)!r} lacks {', '.join(missing)}; it was not written by this train.py")
    problem = check_structure(ckpt, resume)
    if problem:
        raise UserError(f"{key}={str(path)!r} is damaged or not from this train.py: {problem}; "
                        "use another file, e.g. checkpoints/best.pt of the same run")
    return ckpt


def check_structure(ckpt: Dict[str, Any], resume: bool = True) -> Optional[str]:
    """What is wrong with a checkpoint's structure (None if nothing): every key vae.evaluate reads and, with
    `resume`, every key `Trainer.load` and `resume_config` read, with the type and shape they expect. The weights'
    shapes against the model are `check_model_state`'s, Adam's against the model `check_optimizer_state`'s."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    config = ckpt["config"]
    if not isinstance(config, dict):
        return f"its config is a {type(config).__name__}, not a mapping"
    if resume:  # the run goes on with these settings: all of them must fit this version's schema
        try:
            OmegaConf.merge(OmegaConf.structured(Config), config)
        except Exception as e:  # an unknown key (a newer train.py?) or a value of the wrong type
            return f"its config does not fit this version's settings ({describe(e, 160)})"
    latent, classes = config.get("latent_dim"), config.get("categorical_dim")
    if not (is_int(latent) and latent >= 1 and is_int(classes) and classes >= 2):
        return f"its config has latent_dim={latent!r}, categorical_dim={classes!r}"
    model = ckpt["model"]
    if not isinstance(model, dict) or not model or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        return "its model weights are not a mapping of names to tensors"
    for key in ("epoch", "epoch_step", "step"):
        if not is_int(ckpt[key]) or ckpt[key] < 0:
            return f"{key}={ckpt[key]!r} is not an integer >= 0"
    if not is_number(ckpt["tau"]) or not math.isfinite(ckpt["tau"]) or ckpt["tau"] <= 0:
        return f"tau={ckpt['tau']!r} is not a number > 0"
    if not resume:
        return None
    for key in ("test_loss", "best_test_loss"):
        if not is_number(ckpt[key]):
            return f"{key}={ckpt[key]!r} is not a number"
    for key in ("epoch_sums", "interval_sums"):
        if not torch.is_tensor(ckpt[key]) or tuple(ckpt[key].shape) != (3,):
            return f"{key} (the running sums of loss, bce, kl) is not a tensor of 3 values"
    rng = ckpt["rng"]
    names = (*RNG_STREAMS, "shuffle_epoch_start")
    if not isinstance(rng, dict) or any(not torch.is_tensor(rng.get(n)) or rng[n].dtype != torch.uint8
                                        or rng[n].numel() == 0 for n in names):
        return f"its random-number states (rng: {', '.join(names)}) are missing or empty"
    optimizer = ckpt["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list) or not optimizer["param_groups"] \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer["param_groups"]):
        return "its optimizer state is not Adam's (state and param_groups)"
    estimator = ckpt.get("estimator", {})  # absent in files written before estimators had state
    if not isinstance(estimator, dict):
        return "its estimator state is not a mapping"
    return None


def check_optimizer_state(ckpt: Dict[str, Any], model, path) -> None:
    """Adam's saved state must fit `model`'s parameters: one entry per parameter, each moment shaped like it (an
    empty state is only right before the first step)."""
    params = list(model.parameters())
    optimizer = ckpt["optimizer"]
    ids = [i for group in optimizer["param_groups"] for i in group["params"]]
    problem = None
    if sorted(ids) != list(range(len(params))):
        problem = f"its optimizer lists {len(ids)} parameters, the model has {len(params)}"
    elif ckpt["step"] > 0:
        for i, p in enumerate(params):
            state = optimizer["state"].get(i)
            if not isinstance(state, dict) or not all(torch.is_tensor(state.get(k)) for k in ADAM_STATE):
                problem = f"its optimizer has no state for parameter {i} after {ckpt['step']} steps"
                break
            if any(tuple(state[k].shape) != tuple(p.shape) for k in ("exp_avg", "exp_avg_sq")):
                problem = f"its optimizer's moments for parameter {i} do not have the parameter's shape"
                break
    if problem:
        raise UserError(f"{path}: {problem}; the file is damaged or not from this train.py")


def architecture_mismatch(a: DictConfig, b: Dict[str, Any], keys: Iterable[str]) -> list:
    """`key=value in the checkpoint but ... here` for each (dotted) key whose value differs between a and b."""
    def saved(key):
        value = b
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return [f"{k}={saved(k)!r} in the checkpoint but {k}={OmegaConf.select(a, k)!r} here" for k in keys
            if OmegaConf.select(a, k) != saved(k)]


# What a setting added later meant in checkpoints written before it existed, where that differs from its default
# for new runs: those runs had no validation split.
LEGACY_VALUES = {"data": {"val_size": 0}}


def saved_config(ckpt: Dict[str, Any]) -> DictConfig:
    """A checkpoint's config completed by the schema: settings it predates take the value they had then."""
    config = ckpt["config"]
    legacy = {group: {k: v for k, v in values.items() if k not in (config.get(group) or {})}
              for group, values in LEGACY_VALUES.items()}
    return OmegaConf.merge(OmegaConf.structured(Config), legacy, config)


def resume_config(cfg: DictConfig, ckpt: Dict[str, Any], overrides: Optional[Iterable[str]] = None) -> DictConfig:
    """The config a resumed run continues with: the checkpoint's own, plus what this command line overrides.

    `python train.py resume=last.pt` must continue *that* run (its `hard`, `temperature`, data settings...), not
    the defaults; `resume=last.pt epochs=20` may extend it. Settings that shape the parameters may not change.
    """
    saved = OmegaConf.to_container(saved_config(ckpt))
    merged = saved_config(ckpt)
    for item in overrides or ():
        key = item.lstrip("+~").split("=", 1)[0]
        # Config groups that are not keys (experiment=..., hparams_search=...) were expanded into the keys
        # the command line also carries; hydra.* settings do not belong to the run.
        if key.startswith("hydra.") or key == "resume":
            continue
        if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
            if key.startswith("estimator_args."):  # an estimator's own setting, new on this command line
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
            continue
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), merge=False)
    merged.resume = cfg.resume
    differ = architecture_mismatch(merged, saved, ARCHITECTURE_KEYS)
    if differ:
        raise UserError(f"resume={cfg.resume!r} has a different architecture: {'; '.join(differ)}. "
                        "Drop those overrides to continue the run, or start a new run without resume=")
    # The saved moments belong to the optimizer that wrote them: another one would continue from a state it never
    # produced. Old checkpoints (no `optimizer` group) were written by Adam, which the schema's default says.
    differ = architecture_mismatch(merged, saved, ("optimizer.name",))
    if differ:
        raise UserError(f"resume={cfg.resume!r} was trained with another optimizer: {'; '.join(differ)}. Drop that "
                        "override to continue the run, or start a new run without resume=")
    # Test losses on other data would not compare with the run's own, and best.pt is chosen by comparing them.
    differ = architecture_mismatch(merged, saved, DATA_KEYS)
    if differ:
        raise UserError(f"resume={cfg.resume!r} was trained on other data: {'; '.join(differ)}. Its test losses and "
                        "best.pt compare losses on its own data: drop those overrides to continue the run, or start "
                        "a new run (e.g. from scratch) without resume=")
    return merged


def image_shape_of(ckpt: Dict[str, Any]) -> tuple:
    """The image shape a checkpoint's model was built for: recorded since own datasets exist, MNIST's before."""
    from vae.core.model import IMAGE_SHAPE

    shape = ckpt.get("image_shape", IMAGE_SHAPE)
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) and v >= 1 for v in shape)):
        raise UserError(f"the checkpoint's image_shape={shape!r} is not [H, W]; the file is damaged or not from "
                        "this train.py")
    return tuple(shape)


def model_from_checkpoint(ckpt: Dict[str, Any], path, key: str = "checkpoint"):
    """The model a checkpoint describes (its config's model group, code size and prior, its image shape), with its
    weights loaded after checking that they fit. The one way every command rebuilds a trained model."""
    from vae.core.model import build_model

    try:
        model = build_model(OmegaConf.to_container(saved_config(ckpt)), image_shape_of(ckpt))
    except UserError:
        raise
    except Exception as e:  # a config that fits no model of this version
        raise UserError(f"{key}={str(path)!r}: its config does not describe a model ({describe(e, 160)}); pass a "
                        "last.pt or best.pt written by train.py") from e
    check_model_state(ckpt, model.state_dict(), f"{key}={str(path)!r}")
    model.load_state_dict(ckpt["model"])
    return model


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
        # Saved beside the trainer's state: what the run read, e.g. `data_md5`, the MD5s of its test files, by which
        # vae.evaluate tells the run's test set from other files under the same names.
        self.extra: Dict[str, Any] = {}
        for stray in remove_stray_temporaries(self.dir):
            log.info("removed %s, left by a run killed while saving", stray.name)

    def save(self, trainer, name: str = "last.pt") -> None:
        save_checkpoint({**trainer.checkpoint(), **self.extra}, self.dir / name)

    def on_epoch_end(self, trainer, test: dict, is_best: bool, seconds: float) -> None:
        self.save(trainer, "last.pt")
        if is_best:
            self.save(trainer, "best.pt")
