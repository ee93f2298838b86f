"""Train a categorical VAE with Gumbel-softmax latents on MNIST.

    python train.py                               # defaults: 30 x 10-way latents, soft samples, 10 epochs
    python train.py hard=true temperature=1.0     # straight-through Gumbel-softmax
    python train.py resume=outputs/<date>/<time>/checkpoints/last.pt

Settings: configs/config.yaml (schema and checks in vae/config.py). The loop below reads top to bottom:
data -> model -> (resume) -> epochs of steps with a test pass, TensorBoard and a checkpoint after each.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vae import checkpoint as ckpt_io
from vae import metrics
from vae.atomic import atomic_write_text, remove_stray_temporaries
from vae.config import resolve_device, validate
from vae.data import load_splits
from vae.device_data import make_splits
from vae.engine import (TrainStep, configure_device, load_optimizer_state_, make_generators, make_optimizer,
                        pick_modes, set_lr_)
from vae.errors import TrainingDiverged, UserError, describe, exit_with
from vae.gumbel import one_hot_argmax, sample_gumbel
from vae.model import CategoricalVAE
from vae.schedule import tau_for
from vae.tensorboard import image_grid, log_hparams

log = logging.getLogger("train")

# Exit statuses of a run stopped by a signal, as a shell reports them (128 + signal number).
SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopFlag:
    """Ctrl-C / SIGTERM only set a flag: the step in flight finishes, then the loop saves and exits."""

    def __init__(self):
        self.signum = None
        for s in SIGNAL_EXIT:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C while saving: let the user know we heard it
            print("\nstill saving the checkpoint, please wait...", file=sys.stderr, flush=True)
        self.signum = signum


def train(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    stop = StopFlag()
    validate(cfg, check_resume=False)  # again: in a multirun, each job's values are only known here
    resumed = None
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if cfg.resume is not None:
        resumed = ckpt_io.load_checkpoint(cfg.resume, key="resume")
        cfg = ckpt_io.resume_config(cfg, resumed, hydra_cfg.overrides.task)
        validate(cfg, check_resume=False)
        # A resumed run continues in its own directory, so TensorBoard shows one unbroken run.
        run_dir = Path(cfg.resume).expanduser().resolve().parent.parent
    ckpt_dir = run_dir / "checkpoints"
    for stray in remove_stray_temporaries(ckpt_dir):
        log.info("removed %s, left by a run killed while saving", stray.name)

    device = resolve_device(cfg.device)
    compile_mode, graph_mode = pick_modes(device, cfg.compile, cfg.cuda_graph)
    configure_device(device, cfg.tf32, cfg.threads)
    if cfg.device == "auto" and device.type == "cpu":
        log.warning("no CUDA GPU visible: training on the CPU (on Docker, did you pass --gpus all?)")
    log.info("run directory %s | device %s | compile=%s cuda_graph=%s", run_dir, device, compile_mode, graph_mode)

    # -- data: each split held once on the device as uint8 ---------------------------------------------------
    (train_images, _), (test_images, _) = load_splits(cfg.data, ("train", "test"))
    train_split, test_split = make_splits(train_images, test_images, device, cfg.data.binarize,
                                          cfg.data.binarize_seed)
    steps_per_epoch = train_split.n // cfg.batch_size  # full batches only: fixed shapes for compile/graphs
    if steps_per_epoch == 0:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({train_split.n} images); "
                        f"use batch_size<={train_split.n}")

    # -- model, optimizer, step -------------------------------------------------------------------------------
    torch.manual_seed(cfg.seed)  # the initial weights
    model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior).to(device)
    initial_weights = {k: v.clone() for k, v in model.state_dict().items()}
    gens = make_generators(cfg.seed, device)

    def build_step(compile_mode: bool):
        optimizer = make_optimizer(model, cfg.lr, device, graph_mode, compile_mode)
        return optimizer, TrainStep(model, optimizer, train_split, batch_size=cfg.batch_size, hard=cfg.hard,
                                    noise_generator=gens["noise"],
                                    binarize_generator=gens["binarize"] if cfg.data.binarize == "dynamic" else None,
                                    compile=compile_mode, cuda_graph=graph_mode)

    t_build = time.perf_counter()
    try:
        optimizer, train_step = build_step(compile_mode)
    except Exception as e:  # torch.compile needs a working C++ compiler (CPU) or Triton (CUDA)
        if not compile_mode:
            raise
        log.warning("compile=true failed here (%s); training without torch.compile (set compile=false to skip "
                    "the attempt)", describe(e))
        compile_mode = False
        optimizer, train_step = build_step(compile_mode)
    build_seconds = time.perf_counter() - t_build
    if compile_mode or graph_mode:
        log.info("training step compiled/captured in %.1f s (not counted in the epochs' training time)", build_seconds)
    # Load the starting state in place (a captured graph holds these tensors' addresses).
    epoch, epoch_step, step, best = 0, 0, 0, math.inf
    epoch_sums = torch.zeros(3, device=device)      # loss, bce, kl summed over this epoch's steps
    interval_sums = torch.zeros(3, device=device)   # ... over the steps since the last train/* scalars
    if resumed:
        ckpt_io.check_model_state(resumed, initial_weights, cfg.resume)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(resumed["model"][k] if resumed else initial_weights[k])
    if resumed:
        load_optimizer_state_(optimizer, resumed["optimizer"])
        set_lr_(optimizer, cfg.lr)  # the saved state carries the old lr; `resume=... lr=...` changes it
        epoch, epoch_step, step = resumed["epoch"], resumed["epoch_step"], resumed["step"]
        best = resumed["best_test_loss"]
        for name, g in gens.items():
            g.set_state(resumed["rng"][name])
        epoch_sums.copy_(resumed["epoch_sums"])
        interval_sums.copy_(resumed["interval_sums"])
        log.info("resumed %s at step %d (%d epochs and %d steps done), tau %.4f", cfg.resume, step, epoch,
                 epoch_step, tau_for(cfg, step))
    shuffle_state = resumed["rng"]["shuffle_epoch_start"] if resumed else gens["shuffle"].get_state()

    # Fixed inputs for the image grids, so that epochs can be compared picture to picture.
    recon_x = test_split.batch(torch.arange(min(cfg.recon_images, test_split.n), device=device))
    prior_noise = sample_gumbel((cfg.prior_samples, cfg.latent_dim, cfg.categorical_dim),
                                generator=torch.Generator(device=device).manual_seed(cfg.seed), device=device)

    # Events a killed run wrote after its checkpoint (steps > step) are hidden by TensorBoard, so the resumed run's
    # scalars continue without duplicated steps.
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=step + 1 if resumed else None)
    tau = tau_for(cfg, step)
    tau_t = torch.tensor(tau, device=device)
    check_every = 1 if device.type == "cpu" else cfg.log_interval  # a sync per step is free on a CPU only

    def save(name: str, test_loss: float) -> None:
        rng = {n: g.get_state() for n, g in gens.items()}
        rng["shuffle_epoch_start"] = shuffle_state
        ckpt_io.save_checkpoint({
            "format": ckpt_io.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "epoch": epoch, "epoch_step": epoch_step, "step": step, "tau": tau, "test_loss": test_loss,
            "best_test_loss": best, "rng": rng, "epoch_sums": epoch_sums.cpu(), "interval_sums": interval_sums.cpu(),
            "config": OmegaConf.to_container(cfg, resolve=True), "torch_version": str(torch.__version__),
        }, ckpt_dir / name)

    def test_pass() -> dict:
        gens["eval"].manual_seed(cfg.seed)  # the same noise every epoch: epoch-to-epoch changes are the model's
        return metrics.evaluate_split(model, test_split, tau=tau, hard=cfg.hard, generator=gens["eval"],
                                      batch_size=cfg.eval.batch_size)

    def write_images() -> None:
        with torch.no_grad():
            recon = torch.sigmoid(model.decode(one_hot_argmax(model.encode(recon_x))))
            writer.add_image("test/reconstructions", image_grid(torch.cat([recon_x, recon]), nrow=len(recon_x)), step)
            codes = one_hot_argmax(model.log_prior() + prior_noise)
            writer.add_image("samples/prior", image_grid(torch.sigmoid(model.decode(codes))), step)

    def stop_for_signal() -> None:
        save("last.pt", test["loss"] if test else resumed["test_loss"] if resumed else math.nan)
        writer.flush()
        writer.close()
        name = signal.Signals(stop.signum).name
        where = f"during epoch {epoch + 1}" if epoch_step else f"after epoch {epoch}"
        log.warning("stopped by %s %s, at step %d; checkpoint saved. Resume with:\n  python train.py resume=%s",
                    name, where, step, ckpt_dir / "last.pt")
        sys.exit(SIGNAL_EXIT[stop.signum])

    test = None
    train_seconds = 0.0  # this process's time in training steps (no test passes, images or checkpoints)
    with logging_redirect_tqdm():
        while epoch < cfg.epochs:
            gens["shuffle"].set_state(shuffle_state)
            perm = torch.randperm(train_split.n, generator=gens["shuffle"], device=device)
            bar = tqdm(total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True, disable=None)
            t0 = time.perf_counter()
            first_step = epoch_step
            while epoch_step < steps_per_epoch:
                new_tau = tau_for(cfg, step)
                if new_tau != tau:
                    tau = new_tau
                    tau_t.fill_(tau)
                stats = train_step(perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size], tau_t)
                epoch_sums += stats
                interval_sums += stats
                step += 1
                epoch_step += 1
                bar.update()
                if step % check_every == 0 and not torch.isfinite(interval_sums).all():
                    writer.close()
                    raise TrainingDiverged(
                        f"the loss became NaN/inf at step {step} (epoch {epoch + 1}, tau {tau:.3g}); "
                        f"try a smaller lr (now {cfg.lr:g}) or a higher temp_min (now {cfg.temp_min:g}); "
                        f"the last good checkpoint {ckpt_dir / 'last.pt'} was kept")
                if step % cfg.log_interval == 0:
                    loss, bce, kl = (interval_sums / cfg.log_interval).tolist()
                    for tag, value in (("loss", loss), ("bce", bce), ("kl", kl), ("temperature", tau)):
                        writer.add_scalar(f"train/{tag}", value, step)
                    interval_sums.zero_()
                    bar.set_postfix(loss=f"{loss:.2f}", tau=f"{tau:.3f}")
                if stop.signum is not None:
                    bar.close()
                    stop_for_signal()
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            images_per_s = (epoch_step - first_step) * cfg.batch_size / epoch_seconds
            train_loss = (epoch_sums / steps_per_epoch).tolist()[0]

            test = test_pass()
            if not all(math.isfinite(v) for v in test.values()) or not math.isfinite(train_loss):
                writer.close()
                raise TrainingDiverged(
                    f"the loss became NaN/inf in epoch {epoch + 1} (step {step}, tau {tau:.3g}); try a smaller lr "
                    f"(now {cfg.lr:g}) or a higher temp_min (now {cfg.temp_min:g}); the last good checkpoint "
                    f"{ckpt_dir / 'last.pt'} was kept")
            epoch += 1
            epoch_step = 0
            epoch_sums.zero_()
            shuffle_state = gens["shuffle"].get_state()
            writer.add_scalar("test/loss", test["loss"], step)
            writer.add_scalar("test/bce", test["bce"], step)
            writer.add_scalar("test/kl", test["kl"], step)
            writer.add_scalar("test/elbo_discrete", test["elbo_discrete"], step)
            write_images()
            is_best = test["loss"] < best
            best = min(best, test["loss"])
            save("last.pt", test["loss"])
            if is_best:
                save("best.pt", test["loss"])
            writer.flush()
            log.info("epoch %d/%d | train loss %.2f | test loss %.2f | test -elbo (discrete) %.2f | tau %.4f | "
                     "%.2f s, %.0f images/s", epoch, cfg.epochs, train_loss, test["loss"], test["elbo_discrete"], tau,
                     epoch_seconds, images_per_s)
            if stop.signum is not None:
                stop_for_signal()

    if stop.signum is not None:  # a signal during the last epoch's test pass or before training began
        stop_for_signal()
    if test is None:  # nothing left to train (epochs=0, or resuming a finished run): report the model as it is
        test = test_pass()
    results = {"test_loss": test["loss"], "test_elbo_discrete": test["elbo_discrete"], "epochs": epoch,
               "step": step, "tau": tau, "train_seconds": train_seconds, "build_seconds": build_seconds}
    if cfg.eval.iw_samples > 0:
        gens["eval"].manual_seed(cfg.seed)
        with tqdm(total=test_split.n, desc=f"iw bound k={cfg.eval.iw_samples}", leave=False, disable=None) as bar:
            iw = metrics.iw_bound(model, test_split, k=cfg.eval.iw_samples, chunk=cfg.eval.iw_chunk,
                                  batch_size=cfg.eval.batch_size, generator=gens["eval"], progress=bar.update)
        writer.add_scalar("test/iw_bound", iw, step)
        results["test_iw_bound"] = iw
        log.info("test -log p(x) bound, k=%d importance samples: %.2f", cfg.eval.iw_samples, iw)
    log_hparams(writer, cfg, {"test/loss": results["test_loss"], "test/elbo_discrete": results["test_elbo_discrete"]})
    writer.close()
    results["overrides"] = list(hydra_cfg.overrides.task)
    atomic_write_text(run_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    log.info("done: test loss %.2f nats/image; %.2f s of training steps; checkpoints in %s", results["test_loss"],
             train_seconds, ckpt_dir)
    return results["test_loss"]


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg)
    except UserError as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # In a sweep, one bad job must not end the others: Hydra's launcher records the failure and a sweeper
            # such as Optuna marks the trial failed and goes on.
            log.error("error: %s", e)
            raise
        exit_with(e)


if __name__ == "__main__":
    main()
