"""Train a categorical VAE with Gumbel-softmax latents on MNIST.

    python train.py                               # defaults: 30 x 10-way latents, soft samples, 10 epochs
    python train.py hard=true temperature=1.0     # straight-through Gumbel-softmax
    python train.py estimator=reinmax             # another gradient estimator (docs/estimators.md)
    python train.py resume=outputs/<date>/<time>/checkpoints/last.pt

Settings: configs/config.yaml (schema in vae/config.py). The story: config -> data -> trainer -> fit (epochs of
steps, each followed by a test pass, TensorBoard and a checkpoint) -> final evaluation -> metrics.json.
The loop itself is vae/trainer.py.
"""
from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vae import metrics
from vae.atomic import atomic_write_text
from vae.checkpoint import RunCheckpoints, check_model_state, load_checkpoint, resume_config
from vae.checks import resolve_device, validate
from vae.engine import configure_device, pick_modes
from vae.errors import TrainingDiverged, entry_point
from vae.gumbel import sample_gumbel
from vae.progress import ProgressBar, StopFlag

log = logging.getLogger("train")


def load_data(cfg: DictConfig, device: torch.device):
    """Train and test splits, each held once on the device as uint8."""
    from vae.data import load_splits
    from vae.device_data import make_splits

    (train_images, _), (test_images, _) = load_splits(cfg.data, ("train", "test"))
    return make_splits(train_images, test_images, device, cfg.data.binarize, cfg.data.binarize_seed)


def train(cfg: DictConfig) -> float:
    with StopFlag() as stop:
        return run(cfg, stop)


def run(cfg: DictConfig, stop: StopFlag) -> float:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from vae.tensorboard import TensorBoardLog, log_hparams
    from vae.trainer import Trainer

    hydra_cfg = HydraConfig.get()
    validate(cfg, check_resume=False)  # again: in a multirun, each job's values are only known here
    run_dir, resumed = Path(hydra_cfg.runtime.output_dir), None
    if cfg.resume is not None:
        resumed = load_checkpoint(cfg.resume, key="resume")
        cfg = resume_config(cfg, resumed, hydra_cfg.overrides.task)
        validate(cfg, check_resume=False)
        # A resumed run continues in its own directory, so TensorBoard shows one unbroken run.
        run_dir = Path(cfg.resume).expanduser().resolve().parent.parent
    checkpoints = RunCheckpoints(run_dir / "checkpoints")

    device = resolve_device(cfg.device)
    configure_device(device, cfg.tf32, cfg.threads, cfg.flush_denormal)
    if cfg.device == "auto" and device.type == "cpu":
        log.warning("no CUDA GPU visible: training on the CPU (on Docker, did you pass --gpus all?)")
    train_split, test_split = load_data(cfg, device)
    steps_left = cfg.epochs * (train_split.n // cfg.batch_size) - (resumed["step"] if resumed else 0)
    compile_mode, graph_mode = pick_modes(device, cfg.compile, cfg.cuda_graph, steps_left, cfg.compile_min_steps)
    log.info("run directory %s | device %s | compile=%s cuda_graph=%s", run_dir, device, compile_mode, graph_mode)

    trainer = Trainer(cfg, train_split, device, compile=compile_mode, cuda_graph=graph_mode, should_stop=stop)
    if resumed:
        check_model_state(resumed, trainer.initial_weights, cfg.resume)
        trainer.load(resumed)
        log.info("resumed %s at step %d (%d epochs and %d steps done), tau %.4f", cfg.resume, trainer.state.step,
                 trainer.state.epoch, trainer.state.epoch_step, trainer.state.tau)

    # Fixed inputs for the image grids, so that epochs can be compared picture to picture.
    recon_x = test_split.batch(torch.arange(min(cfg.recon_images, test_split.n), device=device))
    prior_noise = sample_gumbel((cfg.prior_samples, cfg.latent_dim, cfg.categorical_dim),
                                generator=torch.Generator(device=device).manual_seed(cfg.seed), device=device)
    progress = ProgressBar()
    with TensorBoardLog(run_dir, trainer.state.step + 1 if resumed else None, recon_x, prior_noise, test_split,
                        cfg) as tb, logging_redirect_tqdm():
        trainer.callbacks = [progress, checkpoints, tb]
        try:
            test = trainer.fit(test_split)
        except TrainingDiverged as e:
            kept = (f"the last good checkpoint {checkpoints.last} was kept" if checkpoints.last.exists()
                    else "no checkpoint had been written yet")
            raise TrainingDiverged(f"{e}; {kept}") from None
        if stop():  # Ctrl-C / SIGTERM: keep what is done, say how to go on
            progress.close()
            checkpoints.save(trainer)
            s = trainer.state
            where = f"during epoch {s.epoch + 1}" if s.epoch_step else f"after epoch {s.epoch}"
            log.warning("stopped by %s %s, at step %d; checkpoint saved. Resume with:\n  python train.py resume=%s",
                        stop.name, where, s.step, shlex.quote(str(checkpoints.last)))
            raise SystemExit(stop.exit_code)
        if test is None:  # nothing left to train (epochs=0, or resuming a finished run): report the model as it is
            test = trainer.test(test_split)
        s = trainer.state
        results = {"test_loss": test["loss"], "test_elbo_discrete": test["elbo_discrete"], "epochs": s.epoch,
                   "step": s.step, "tau": s.tau, "train_seconds": trainer.train_seconds,
                   "build_seconds": trainer.build_seconds}
        if cfg.eval.iw_samples > 0:
            results["test_iw_bound"] = final_iw_bound(cfg, trainer, test_split, tb)
        log_hparams(tb.writer, cfg, {"test/loss": results["test_loss"],
                                     "test/elbo_discrete": results["test_elbo_discrete"]})
    results["overrides"] = list(hydra_cfg.overrides.task)
    atomic_write_text(run_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    log.info("done: test loss %.2f nats/image; %.2f s of training steps; checkpoints in %s", results["test_loss"],
             trainer.train_seconds, checkpoints.dir)
    return results["test_loss"]


def final_iw_bound(cfg: DictConfig, trainer, test_split, tb) -> float:
    """The importance-weighted bound on -log p(x) of the test set (Burda et al. 2016), as the paper reports it."""
    from tqdm import tqdm

    gen = trainer.state.gens["eval"]
    gen.manual_seed(cfg.seed)
    with tqdm(total=test_split.n, desc=f"iw bound k={cfg.eval.iw_samples}", leave=False, disable=None) as bar:
        iw = metrics.iw_bound(trainer.model, test_split, k=cfg.eval.iw_samples, chunk=cfg.eval.iw_chunk,
                              batch_size=cfg.eval.batch_size, generator=gen, progress=bar.update)
    tb.writer.add_scalar("test/iw_bound", iw, trainer.state.step)
    log.info("test -log p(x) bound, k=%d importance samples: %.2f", cfg.eval.iw_samples, iw)
    return iw


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
@entry_point
def main(cfg: DictConfig) -> float:
    return train(cfg)


if __name__ == "__main__":
    main()
