"""The training loop, owned by one object.

`TrainState` is everything that changes as training goes on (position, temperature, best loss, running sums,
random streams); a checkpoint is `Trainer.checkpoint()`, built from it plus the weights and Adam's state, and
nothing else. `Trainer` holds the model, the optimizer and the step, and runs the only inner loop of the project
(train.py and the benchmark both call it). Logging, checkpoints, progress bars and signals are callbacks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from vae.core import metrics
from vae.training.checkpoint import FORMAT
from vae.settings.config import estimator_name
from vae.core.optim import load_optimizer_state_, make_optimizer, set_lr_
from vae.training.engine import TrainStep, make_generators
from vae.common.errors import TrainingDiverged, UserError, describe
from vae.estimators import config_settings, estimator_class, make_estimator, takes_samples
from vae.core.model import build_model
from vae.core.schedule import lr_for, lr_moves, tau_for

log = logging.getLogger(__name__)

# A loss (nats per image) past which a run has diverged although it is still finite: 784 pixels at logits of about
# +-1e7. An untrained model scores about 543 (784 log 2); no model that still learns comes near, and saving one that
# is there would overwrite last.pt with weights that only Inf and NaN can follow.
DIVERGED_LOSS = 1e10

@dataclass
class TrainState:
    """Where training is: the loop reads and advances this object only."""

    gens: Dict[str, torch.Generator]  # seeded streams: shuffle, noise, binarize, eval
    tau: float                        # the temperature of the last step taken (of step 0 before any)
    epoch_sums: torch.Tensor          # loss, bce, kl summed over this epoch's steps (on the device)
    interval_sums: torch.Tensor       # ... over the steps since the last train/* scalars
    shuffle_epoch_start: torch.Tensor = None  # the shuffle stream at this epoch's start: its permutation again
    epoch: int = 0                    # epochs completed
    epoch_step: int = 0               # steps done in the current epoch
    step: int = 0                     # steps done in all
    test_loss: float = math.nan       # the last test pass's loss
    best_test_loss: float = math.inf
    val_loss: float = math.nan        # the last validation pass's loss (with a validation split)
    best_val_loss: float = math.inf   # what chooses best.pt when there is a validation split

    def __post_init__(self):
        if self.shuffle_epoch_start is None:
            self.shuffle_epoch_start = self.gens["shuffle"].get_state()

    def state_dict(self) -> dict:
        rng = {name: g.get_state() for name, g in self.gens.items()}
        rng["shuffle_epoch_start"] = self.shuffle_epoch_start
        return {"epoch": self.epoch, "epoch_step": self.epoch_step, "step": self.step, "tau": self.tau,
                "test_loss": self.test_loss, "best_test_loss": self.best_test_loss, "val_loss": self.val_loss,
                "best_val_loss": self.best_val_loss, "rng": rng,
                "epoch_sums": self.epoch_sums.cpu(), "interval_sums": self.interval_sums.cpu()}

    def load_state_dict(self, d: dict) -> None:
        self.epoch, self.epoch_step, self.step = int(d["epoch"]), int(d["epoch_step"]), int(d["step"])
        self.tau, self.test_loss = float(d["tau"]), float(d["test_loss"])
        self.best_test_loss = float(d["best_test_loss"])
        # Absent from checkpoints written before the validation split existed (their runs had none).
        self.val_loss, self.best_val_loss = float(d.get("val_loss", math.nan)), float(d.get("best_val_loss", math.inf))
        for name, g in self.gens.items():
            g.set_state(d["rng"][name])
        self.shuffle_epoch_start = d["rng"]["shuffle_epoch_start"]
        self.epoch_sums.copy_(d["epoch_sums"])  # in place: the running sums stay where they are
        self.interval_sums.copy_(d["interval_sums"])


@dataclass
class Trainer:
    """Model, optimizer and step for one run of `cfg` on `train_split`, and the loop that trains them."""

    cfg: DictConfig
    train_split: object
    device: torch.device
    compile: bool = False
    cuda_graph: bool = False
    optimizer_factory: Optional[Callable] = None  # the benchmark's Adam variants; None = make_optimizer
    # Objects with any of on_epoch_start(trainer), on_step(trainer), on_interval(trainer, means, grad_norm),
    # on_epoch_end(trainer, test, is_best, seconds): progress bars, TensorBoard, checkpoints.
    callbacks: List[object] = field(default_factory=list)
    should_stop: Callable[[], bool] = lambda: False

    def __post_init__(self):
        cfg, device = self.cfg, self.device
        self.steps_per_epoch = self.train_split.n // cfg.batch_size  # full batches: fixed shapes for compile/graphs
        self.total_steps = cfg.epochs * self.steps_per_epoch  # the learning-rate schedule's length
        if self.steps_per_epoch == 0:
            raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({self.train_split.n} "
                            f"images); use batch_size<={self.train_split.n}")
        torch.manual_seed(cfg.seed)  # the initial weights
        self.model = build_model(cfg, self.train_split.image_shape).to(device)
        self.initial_weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        gens = make_generators(cfg.seed, device)
        self.estimator = make_estimator(estimator_name(cfg), config_settings(estimator_name(cfg), cfg), device)
        self.state = TrainState(gens, tau_for(cfg, 0), torch.zeros(3, device=device), torch.zeros(3, device=device))
        self.tau_t = torch.tensor(self.state.tau, device=device)  # what the (compiled, captured) step reads
        self.lr = cfg.lr  # the optimizer's learning rate now (lr_schedule moves it)
        self.check_every = 1 if device.type == "cpu" else cfg.log_interval  # a sync per step is free on a CPU only
        self.train_seconds = 0.0  # this process's time in training steps (no test passes, images or checkpoints)
        self.build_seconds = 0.0
        self.optimizer = self.step_fn = self.compile_error = None
        self._saved_optimizer = None  # a resumed run's Adam state, loaded once the optimizer exists
        self._perm = None

    def build(self) -> None:
        """Build the optimizer and the step (compiled or captured), once, when training first needs them: a run
        with nothing to train never pays for them (building Adam alone imports torch._dynamo: seconds)."""
        if self.step_fn is not None:
            return
        t0 = time.perf_counter()
        try:
            self._build_step()
        except Exception as e:  # torch.compile needs a working C++ compiler (CPU) or Triton (CUDA)
            if not self.compile:
                raise
            self.compile_error = e
            log.warning("compile=true failed here (%s); training without torch.compile (set compile=false to skip "
                        "the attempt)", describe(e))
            self.compile = False
            self._build_step()
        self.build_seconds = time.perf_counter() - t0
        if self.compile or self.cuda_graph:
            log.info("training step compiled/captured in %.1f s (not counted in the epochs' training time)",
                     self.build_seconds)
        if self._saved_optimizer is not None:
            load_optimizer_state_(self.optimizer, self._saved_optimizer)
        # The saved state carries the old lr (`resume=... lr=...` changes it); a schedule starts where the step is.
        self._follow_lr_schedule(force=self._saved_optimizer is not None)

    def _follow_lr_schedule(self, force: bool = False) -> None:
        """Give the optimizer the learning rate of the current step, if it differs from the one it has (or `force`)."""
        lr = lr_for(self.cfg, self.state.step, self.total_steps)
        if force or lr != self.lr:  # with the constant schedule: only when forced (a resume)
            self.lr = lr
            set_lr_(self.optimizer, lr)

    def _build_step(self) -> None:
        """The step's warm-up (compile) or capture changes weights, Adam's state and the random streams, and puts
        them back as they were (in place: a captured graph holds their addresses)."""
        cfg, gens = self.cfg, self.state.gens
        if self.optimizer_factory is None:
            spec = OmegaConf.to_container(cfg.optimizer) if "optimizer" in cfg else None
            self.optimizer = make_optimizer(self.model, cfg.lr, self.device, self.cuda_graph, self.compile, spec,
                                            lr_moves=lr_moves(cfg))
        else:
            self.optimizer = self.optimizer_factory(self.model, cfg.lr, self.device, self.cuda_graph, self.compile)
        binarize_gen = gens["binarize"] if self.train_split.binarize == "dynamic" else None
        self.step_fn = TrainStep(self.model, self.optimizer, self.train_split, batch_size=cfg.batch_size,
                                 estimator=self.estimator, noise_generator=gens["noise"],
                                 binarize_generator=binarize_gen, compile=self.compile, cuda_graph=self.cuda_graph,
                                 compile_optimizer=None if self.optimizer_factory is None else False)

    # -- checkpoints -------------------------------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """The whole run as a plain dict that `torch.load(..., weights_only=True)` accepts."""
        self.build()
        return {"format": FORMAT, "model": self.model.state_dict(), "image_shape": list(self.model.image_shape),
                "optimizer": self.optimizer.state_dict(),
                **self.state.state_dict(), "estimator": self.estimator.state_dict(),
                "config": OmegaConf.to_container(self.cfg, resolve=True), "torch_version": str(torch.__version__)}

    def resume(self, ckpt: dict, path, checked: bool = False) -> None:
        """Continue the run saved in `ckpt` (read from `path`), after checking that it fits this model (unless the
        run's plan has checked it already: vae/training/plan.py)."""
        if not checked:
            from vae.training.checkpoint import check_model_state, check_optimizer_state

            check_model_state(ckpt, self.initial_weights, path)
            check_optimizer_state(ckpt, self.model, path)
        self.load(ckpt)
        s = self.state
        log.info("resumed %s at step %d (%d epochs and %d steps done), tau %.4f", path, s.step, s.epoch,
                 s.epoch_step, s.tau)

    def load(self, ckpt: dict) -> None:
        """Continue from a checkpoint, in place (a captured graph holds the tensors' addresses)."""
        saved = {name: ckpt["rng"][name].numel() for name in self.state.gens}
        if any(n != self.state.gens[name].get_state().numel() for name, n in saved.items()):
            # CPU and CUDA generators keep different states: exact resume needs the device type it was saved on.
            raise UserError(f"the checkpoint's random streams are not those of a {self.device.type} device: it was "
                            f"written on {'a CUDA GPU' if self.device.type == 'cpu' else 'the CPU'}; resume it with "
                            f"device={'cuda' if self.device.type == 'cpu' else 'cpu'}")
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(ckpt["model"][k])
        self._saved_optimizer = ckpt["optimizer"]
        self.state.load_state_dict(ckpt)
        if self.optimizer is not None:
            load_optimizer_state_(self.optimizer, ckpt["optimizer"])
            self._follow_lr_schedule(force=True)
        self.estimator.load_state_dict(ckpt.get("estimator") or {})
        self.tau_t.fill_(self.state.tau)
        self._perm = None

    # -- the loop ----------------------------------------------------------------------------------------------

    def train_steps(self, max_steps: Optional[int] = None) -> int:
        """Steps of the current epoch until it ends, `max_steps` are done or `should_stop()`; returns the count."""
        self.build()
        cfg, s, bs = self.cfg, self.state, self.cfg.batch_size
        if self._perm is None:  # the epoch's order, also when resuming in the middle of it
            s.gens["shuffle"].set_state(s.shuffle_epoch_start)
            self._perm = torch.randperm(self.train_split.n, generator=s.gens["shuffle"], device=self.device)
        done = 0
        while s.epoch_step < self.steps_per_epoch and (max_steps is None or done < max_steps):
            tau = tau_for(cfg, s.step)
            if tau != s.tau:  # a fill only when the schedule moves (every anneal_interval steps)
                s.tau = tau
                self.tau_t.fill_(tau)
            self._follow_lr_schedule()
            log_now = (s.step + 1) % cfg.log_interval == 0
            stats, grad_norm = self.step_fn(self._perm[s.epoch_step * bs:(s.epoch_step + 1) * bs], self.tau_t,
                                            log_now)
            s.epoch_sums += stats
            s.interval_sums += stats
            s.step += 1
            s.epoch_step += 1
            done += 1
            self._emit("on_step")
            if s.step % self.check_every == 0:
                steps = (s.step - 1) % cfg.log_interval + 1  # summed in interval_sums (false for NaN too)
                if not (s.interval_sums.abs() < DIVERGED_LOSS * steps).all():
                    raise TrainingDiverged(self._diverged(f"at step {s.step} (epoch {s.epoch + 1}"))
            if log_now:
                means = (s.interval_sums / cfg.log_interval).tolist()  # the interval's only host sync
                s.interval_sums.zero_()
                norm = grad_norm.item() if grad_norm is not None else None
                self._emit("on_interval", means, norm)
            if self.should_stop():
                break
        return done

    def finish_epoch(self) -> None:
        s = self.state
        s.epoch += 1
        s.epoch_step = 0
        s.epoch_sums.zero_()
        s.shuffle_epoch_start = s.gens["shuffle"].get_state()
        self._perm = None

    def test(self, split) -> dict:
        """The test pass: the same noise every time (epoch-to-epoch changes are the model's), at the temperature
        of the last step, one-hot samples for the estimators whose decoder sees one-hot codes."""
        self.state.gens["eval"].manual_seed(self.cfg.seed)
        return metrics.evaluate_split(self.model, split, tau=self.state.tau, hard=self.estimator.one_hot,
                                      generator=self.state.gens["eval"], batch_size=self.cfg.eval.batch_size)

    def iw_bound(self, split, progress=None) -> Optional[float]:
        """The importance-weighted bound (Burda et al. 2016) with eval.iw_samples samples, mean nats per image; None
        if `should_stop()` came first. The eval stream is re-seeded: the same noise as any other evaluation."""
        cfg, gen = self.cfg, self.state.gens["eval"]
        gen.manual_seed(cfg.seed)
        return metrics.iw_bound(self.model, split, k=cfg.eval.iw_samples, chunk=cfg.eval.iw_chunk,
                                batch_size=cfg.eval.batch_size, generator=gen, progress=progress,
                                should_stop=self.should_stop)

    def fit(self, test_split, val_split=None) -> Optional[dict]:
        """Train up to `cfg.epochs` with a test pass after each epoch; the last test metrics (None if none ran).

        With a validation split, each epoch also scores it (the same way, as `test["val"]`) and the best model is
        the one of lowest validation loss: the test set is then only reported, never used to choose."""
        cfg, s = self.cfg, self.state
        test = None
        while s.epoch < cfg.epochs and not self.should_stop():
            self._emit("on_epoch_start")
            t0 = time.perf_counter()
            self.train_steps()
            if self.should_stop():
                break
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            self.train_seconds += seconds
            train_loss = (s.epoch_sums / self.steps_per_epoch).tolist()[0]
            test = self.test(test_split)
            if not all(abs(v) < DIVERGED_LOSS for v in (*test.values(), train_loss)):  # false for NaN too
                raise TrainingDiverged(self._diverged(f"in epoch {s.epoch + 1} (step {s.step}"))
            test["train_loss"] = train_loss
            self.finish_epoch()
            is_best = test["loss"] < s.best_test_loss
            if val_split is not None:
                test["val"] = self.test(val_split)
                if not all(math.isfinite(v) for v in test["val"].values()):
                    raise TrainingDiverged(self._diverged(f"in epoch {s.epoch} (step {s.step}, validation"))
                is_best = test["val"]["loss"] < s.best_val_loss
                s.val_loss, s.best_val_loss = test["val"]["loss"], min(s.best_val_loss, test["val"]["loss"])
            s.best_test_loss = min(s.best_test_loss, test["loss"])
            s.test_loss = test["loss"]
            self._emit("on_epoch_end", test, is_best, seconds)
        return test

    def _emit(self, event: str, *args) -> None:
        for c in self.callbacks:
            handler = getattr(c, event, None)
            if handler is not None:
                handler(self, *args)

    def _diverged(self, where: str) -> str:
        return (f"the loss became NaN/inf or exploded past {DIVERGED_LOSS:g} nats {where}, tau {self.state.tau:.3g}); "
                f"try a smaller lr (now {self.cfg.lr:g}) "
                f"or a higher temp_min (now {self.cfg.temp_min:g})")


def training_sizes(cfg: DictConfig) -> str:
    """The settings that size training's memory, those of the estimator first: what an out-of-memory error names."""
    name = estimator_name(cfg)
    sizes = (f"batch_size={cfg.batch_size}, eval.batch_size={cfg.eval.batch_size} and the code, latent_dim x "
             f"categorical_dim = {cfg.latent_dim} x {cfg.categorical_dim}")
    if takes_samples(name):  # every image is decoded (rloo) or relaxed (gumbel_rao) this many times per step
        samples = estimator_class(name).settings["samples"] if cfg.estimator_samples is None else cfg.estimator_samples
        return f"estimator_samples={samples} (estimator={name}'s samples per image) x {sizes}"
    if name == "exact":  # every image is decoded at each of the K^N codes
        return f"the K^N = {cfg.categorical_dim}^{cfg.latent_dim} codes of estimator=exact x {sizes}"
    return sizes
