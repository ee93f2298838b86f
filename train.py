"""Train a categorical VAE with Gumbel-softmax latents on MNIST.

    python train.py                               # defaults: 30 x 10-way latents, soft samples, 10 epochs
    python train.py hard=true temperature=1.0     # straight-through Gumbel-softmax
    python train.py estimator=reinmax             # another gradient estimator (docs/estimators.md)
    python train.py resume=outputs/<date>/<time>/checkpoints/last.pt

Settings: configs/config.yaml (schema in vae/settings/config.py). The story: config -> data -> trainer -> fit (epochs of
steps, each followed by a test pass, TensorBoard and a checkpoint) -> final evaluation -> metrics.json.
The loop itself is vae/training/trainer.py.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae.training.checkpoint import RunCheckpoints
from vae.common.errors import TrainingDiverged, entry_point, memory_hint
from vae.data import data_fingerprint, dataset_title
from vae.data.device_data import load_device_splits
from vae.core.gumbel import sample_gumbel
from vae.training.plan import take as take_plan
from vae.common.signals import StopFlag
from vae.training.progress import ProgressBar
from vae.training.rundir import locked, override, write_metrics

log = logging.getLogger("train")


def train(cfg: DictConfig) -> float:
    with StopFlag() as stop, contextlib.ExitStack() as held:
        return run(cfg, stop, held)


def run(cfg: DictConfig, stop: StopFlag, held: contextlib.ExitStack) -> float:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vae.training.snr import GradientSNR
    from vae.training.tensorboard import TensorBoardLog, log_hparams
    from vae.training.tracking import trackers
    from vae.training.trainer import Trainer, training_sizes

    hydra_cfg = HydraConfig.get()
    plan = take_plan(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.overrides.task)  # made once (vae/training/plan.py)
    cfg, run_dir, device, resumed = plan.cfg, plan.run_dir, plan.device, plan.resumed
    held.enter_context(locked(run_dir, resuming=plan.in_place))  # one train.py per run directory
    checkpoints = RunCheckpoints(run_dir / "checkpoints")
    held.enter_context(memory_hint("while training", training_sizes(cfg)))

    with stop.at_once("during start-up"):  # nothing to save yet: a signal here ends the run at once
        if cfg.device == "auto" and device.type == "cpu":
            log.warning("no CUDA GPU visible: training on the CPU (on Docker, did you pass --gpus all?)")
        train_split, test_split, val_split = load_device_splits(cfg.data, device)
        checkpoints.extra["data_md5"] = data_fingerprint(cfg.data)  # vae.evaluate checks it scores these files
        compile_mode, graph_mode = plan.modes(cfg.epochs * (train_split.n // cfg.batch_size)
                                              - (resumed["step"] if resumed else 0))
        log.info("run directory %s%s | device %s | compile=%s cuda_graph=%s | %s: %d train, %d validation, %d test "
                 "images of %dx%d", run_dir, " (resumed in place)" if plan.in_place else "", device, compile_mode,
                 graph_mode, dataset_title(cfg.data), train_split.n, val_split.n if val_split else 0, test_split.n,
                 *train_split.image_shape)
        trainer = Trainer(cfg, train_split, device, compile=compile_mode, cuda_graph=graph_mode, should_stop=stop)
        if resumed:
            trainer.resume(resumed, cfg.resume, checked=True)
        if trainer.state.epoch < cfg.epochs:
            trainer.build()  # the optimizer, and the compiled or captured step: seconds to minutes
    start_step = trainer.state.step

    # Fixed inputs for the image grids, so that epochs can be compared picture to picture.
    recon_x = test_split.batch(torch.arange(min(cfg.recon_images, test_split.n), device=device))
    prior_noise = sample_gumbel((cfg.prior_samples, cfg.latent_dim, cfg.categorical_dim),
                                generator=torch.Generator(device=device).manual_seed(cfg.seed), device=device)
    progress = ProgressBar()
    with TensorBoardLog(run_dir, trainer.state.step + 1 if resumed else None, recon_x, prior_noise, test_split,
                        cfg) as tb, logging_redirect_tqdm():
        trainer.callbacks = [progress, checkpoints, tb, *GradientSNR.for_run(cfg, tb), *trackers(cfg, run_dir, held)]
        try:
            test = trainer.fit(test_split, val_split)
        except TrainingDiverged as e:
            kept = (f"the last good checkpoint {checkpoints.last} was kept" if checkpoints.last.exists()
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{e}; {kept}") from None
        s = trainer.state
        if stop() and s.epoch < cfg.epochs:  # Ctrl-C / SIGTERM: keep what is done, say how to go on
            progress.close()
            checkpoints.save(trainer)
            where = f"during epoch {s.epoch + 1}" if s.epoch_step else f"after epoch {s.epoch}"
            log.warning("stopped by %s %s, at step %d; checkpoint saved. Resume with:\n  python train.py %s",
                        stop.name, where, s.step, override("resume", checkpoints.last))
            raise SystemExit(stop.exit_code)
        if test is None:  # nothing left to train (epochs=0, or resuming a finished run): report the model as it is
            test = trainer.test(test_split)
        results = {"test_loss": test["loss"], "test_elbo_discrete": test["elbo_discrete"], "epochs": s.epoch,
                   "step": s.step, "tau": s.tau, "train_seconds": trainer.train_seconds,
                   "build_seconds": trainer.build_seconds,
                   **({"val_loss": s.val_loss, "best_val_loss": s.best_val_loss} if val_split else {})}
        if cfg.eval.iw_samples > 0:
            iw = None if stop() else final_iw_bound(cfg, trainer, test_split, tb, stop)
            results.update({"test_iw_bound": iw} if iw is not None else  # stopped: all but the bound is saved
                           {"stopped": f"by {stop.name} before the importance-weighted bound was done"})
        log_hparams(tb.writer, cfg, {"test/loss": results["test_loss"],
                                     "test/elbo_discrete": results["test_elbo_discrete"]})
    written = write_metrics(run_dir, results, list(plan.overrides), resumed_in_place=plan.in_place,
                            trained=s.step > start_step)
    if not written:
        log.info("metrics.json kept as it was: this resume trained nothing (the run had finished)")
    if "stopped" in results:
        log.warning("stopped by %s after training (checkpoints in %s); metrics.json has all but the "
                    "importance-weighted bound. Compute it with:\n  python -m vae.evaluate %s iw_samples=%d",
                    stop.name, checkpoints.dir, override("checkpoint", checkpoints.last), cfg.eval.iw_samples)
        raise SystemExit(stop.exit_code)
    log.info("done: test loss %.2f nats/image; %.2f s of training steps; checkpoints in %s", results["test_loss"],
             trainer.train_seconds, checkpoints.dir)
    return results["test_loss"]


def final_iw_bound(cfg: DictConfig, trainer, test_split, tb, stop) -> Optional[float]:
    """The importance-weighted bound on -log p(x) of the test set (Burda et al. 2016), as the paper reports it;
    None if Ctrl-C / SIGTERM came first."""
    from tqdm import tqdm

    with tqdm(total=test_split.n, desc=f"iw bound k={cfg.eval.iw_samples}", leave=False, disable=None) as bar, \
            memory_hint("in the importance-weighted bound", f"eval.batch_size={cfg.eval.batch_size} x "
                        f"eval.iw_chunk={cfg.eval.iw_chunk} (and the code, latent_dim x categorical_dim)"):
        iw = trainer.iw_bound(test_split, progress=bar.update)
    if iw is not None:
        tb.add_scalar("test/iw_bound", iw, trainer.state.step)
        log.info("test -log p(x) bound, k=%d importance samples: %.2f", cfg.eval.iw_samples, iw)
    return iw


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
@entry_point
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: one line, not Hydra's traceback or hang
    main()
