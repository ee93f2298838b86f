"""One optimisation step, built once per run in the fastest mode the device supports.

Modes (chosen in the config, see vae/training/device.py's `pick_modes`):
  eager       plain PyTorch;
  compile     `torch.compile` of the forward pass and loss (AOTAutograd compiles the backward too), and on
              CUDA of the Adam step;
  cuda_graph  the whole step (batch gather, noise, forward, backward, Adam) captured once as a CUDA graph and
              replayed: one launch per step instead of about a hundred, which is what bounds this tiny model on
              a GPU.
Random numbers are always drawn from explicit generators outside the compiled region, so eager and compiled
runs see the same noise and learn the same thing.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from vae.core.gumbel import sample_gumbel
from vae.core.optim import compiles_optimizer, reset_optimizer_state_

log = logging.getLogger(__name__)


# The random streams of a run, in the order their seeds are drawn (a new stream goes at the end, or every later
# stream's seed changes); a checkpoint holds each one's state under its name (vae/training/checkpoint.py).
RNG_STREAMS = ("shuffle", "noise", "binarize", "eval")


def make_generators(seed: int, device: torch.device) -> dict:
    """Independent seeded streams: a change in one (e.g. binarization on/off) does not shift the others."""
    seeds = torch.randint(2**62, (len(RNG_STREAMS),), generator=torch.Generator().manual_seed(seed)).tolist()
    return {n: torch.Generator(device=device).manual_seed(s) for n, s in zip(RNG_STREAMS, seeds)}


class TrainStep:
    """`step(idx, tau, grad_norm) -> (tensor([loss, bce, kl]), encoder gradient norm or None)`: batch means, on the
    device, no host sync. The estimator (vae/estimators.py) turns the batch and pre-drawn Gumbel noise into the loss
    whose gradient is used."""

    def __init__(self, model, optimizer, split, *, batch_size: int, estimator, noise_generator,
                 binarize_generator, compile: bool = False, cuda_graph: bool = False,
                 compile_optimizer: Optional[bool] = None):
        self.model, self.optimizer, self.split = model, optimizer, split
        self.estimator = estimator
        self.noise_generator, self.binarize_generator = noise_generator, binarize_generator
        self.noise_shape = estimator.noise_shape(batch_size, model.latent_dim, model.categorical_dim)
        self.encoder_params = list(model.encoder.parameters())
        self.loss_fn = torch.compile(estimator.batch_loss, dynamic=False) if compile else estimator.batch_loss
        if compile_optimizer is None:  # None: as make_optimizer decided for this device and mode
            compile_optimizer = compiles_optimizer(split.device, compile)
        self.optimizer_step = torch.compile(optimizer.step) if compile_optimizer else optimizer.step
        self.graph = None
        if cuda_graph:
            self._capture(batch_size)
        elif compile:
            # Compile now, on one throw-away step, so that compilation is not counted as (or mixed into) the
            # first epoch's training time.
            with self._undone_afterwards():
                self(torch.arange(batch_size, device=split.device), torch.ones((), device=split.device), True)

    @contextlib.contextmanager
    def _undone_afterwards(self):
        """Run warm-up steps, then put the weights, Adam's state and the random streams back as they were.

        In place: a captured graph has recorded these tensors' addresses. (The trainer loads the initial or
        resumed state after this, also in place.)
        """
        params = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        gens = [g for g in (self.noise_generator, self.binarize_generator) if g is not None]
        gen_states = [g.get_state() for g in gens]
        estimator_state = {k: v.clone() for k, v in self.estimator.state_dict().items()}
        try:
            yield
        finally:  # also when compilation fails, so that the caller can fall back to eager on the same state
            with torch.no_grad():
                for k, v in self.model.state_dict().items():
                    v.copy_(params[k])
            reset_optimizer_state_(self.optimizer)
            for g, s in zip(gens, gen_states):
                g.set_state(s)
            self.estimator.load_state_dict(estimator_state)

    def _body(self, idx: torch.Tensor, tau: torch.Tensor, grad_norm: bool):
        x = self.split.batch(idx, self.binarize_generator)
        noise = sample_gumbel(self.noise_shape, generator=self.noise_generator, device=x.device)
        surrogate, loss, bce, kl = self.loss_fn(self.model, x, noise, tau)
        surrogate.backward()
        norm = None
        if grad_norm:  # read before Adam's step; only on the steps that log it (on CUDA graphs: every replay)
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.encoder_params if p.grad is not None])
        self.optimizer_step()
        return torch.stack((loss, bce, kl)).detach(), norm

    def __call__(self, idx: torch.Tensor, tau: torch.Tensor, grad_norm: bool = False):
        if self.graph is not None:
            self.static_idx.copy_(idx)
            self.static_tau.copy_(tau)
            self.graph.replay()
            return self.static_stats.clone(), self.static_norm.clone()
        self.optimizer.zero_grad(set_to_none=True)
        return self._body(idx, tau, grad_norm)

    def _capture(self, batch_size: int) -> None:
        """Whole-step capture, following PyTorch's recipe: warm up on a side stream, then capture.

        Warm-up steps really update the weights and Adam's moments, so they are undone afterwards. The
        generators are registered with the graph so each replay draws fresh noise.
        """
        device = self.split.device
        self.static_idx = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.static_tau = torch.ones((), device=device)
        with self._undone_afterwards():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self.optimizer.zero_grad(set_to_none=True)
                    self._body(self.static_idx, self.static_tau, True)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            for g in (self.noise_generator, self.binarize_generator):
                if g is not None:
                    self.graph.register_generator_state(g)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self.static_stats, self.static_norm = self._body(self.static_idx, self.static_tau, True)
