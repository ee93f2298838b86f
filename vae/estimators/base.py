"""What every estimator shares: the interface and its contract, exact categorical samples from the caller's noise,
log q(z|x), and the moving-average baseline of the score-function estimators.

The contract (docs/estimators.md, "Write your own estimator", has a complete example):

- `batch_loss(model, x, noise, tau)` returns four 0-d tensors, batch means: the *surrogate*, whose gradient
  (`surrogate.backward()`) is the estimator's gradient for every parameter, encoder, decoder and a learned prior;
  then the loss, bce and kl the trainer logs (loss = bce + kl, nats per image). The surrogate's value may be the
  loss itself (the pathwise estimators) or differ from it by terms that are zero in value (`score` below).
- All randomness comes from `noise`: standard Gumbel noise of `noise_shape(B, N, K)` that the caller draws from
  the run's `noise` stream *outside* any compiled region, so eager, compiled and CUDA-graph runs see the same
  samples and a resumed run the same stream. `batch_loss` draws nothing itself and makes no host sync (no
  `.item()`, no `if` on a tensor): the trainer compiles it and captures it in a CUDA graph.
- State that lasts from batch to batch (a baseline) is a tensor made once on `device` and updated *in place* (a
  captured graph holds its address); `state_dict` returns it and `load_state_dict` copies a saved one back in
  place, so that it is checkpointed with the run and a resume continues it. A state_dict from another estimator
  (a run resumed with a new `estimator=`) or an empty one must be accepted.
- `settings` declares the estimator's own hyperparameters, name -> default; `make_estimator` passes each one,
  checked by the class's `check_settings`, to `__init__` as a keyword argument, which stores it as an attribute
  of the same name. A user sets one with `+estimator_args.<name>=...` (samples and baseline_decay with their
  top-level keys, CONFIG_KEYS); any name not declared is refused.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F

from vae.common.errors import UserError
from vae.core.gumbel import one_hot_argmax

# Estimator settings with a top-level config key of their own (older than estimator_args, and shared by several
# estimators); every other setting is `estimator_args.<setting>`.
CONFIG_KEYS = {"samples": "estimator_samples", "baseline_decay": "baseline_decay"}


def config_key(setting: str) -> str:
    """The config key a user sets an estimator's setting with, for messages."""
    return CONFIG_KEYS.get(setting, f"estimator_args.{setting}")


class Estimator:
    """One gradient estimator. Subclasses set the class attributes and implement `batch_loss` (the contract is the
    module's docstring).

    name       the `estimator=` setting;
    one_hot    the decoder sees exact one-hot codes, so the logged loss is the discrete negative ELBO (every
               estimator but gumbel, whose logged loss is the relaxed one); the trainer's test pass scores the
               model with straight-through one-hot samples when it is set, with relaxed ones when not;
    uses_tau   the temperature changes the gradient (never the forward value of a one-hot estimator);
    settings   its own hyperparameters, name -> default (each an attribute of the instance).
    """

    name = ""
    one_hot = True
    uses_tau = False
    settings: Dict[str, Any] = {}

    def __init__(self, *, device=None, **settings):
        self.device = device
        for key, value in settings.items():
            setattr(self, key, value)

    @classmethod
    def check_settings(cls, settings: Dict[str, Any], latent_dim: int, categorical_dim: int) -> None:
        """Raise a one-line UserError (vae.common.errors) naming the key, the value and the fix for any of `settings` (all of
        the class's, defaults filled in) it refuses, or for a code space of N = latent_dim variables of
        K = categorical_dim classes it cannot handle. This one refuses nothing."""

    def noise_shape(self, batch_size: int, latent_dim: int, categorical_dim: int) -> tuple:
        """Shape of the standard Gumbel noise the caller draws for one batch: one draw per latent class."""
        return (batch_size, latent_dim, categorical_dim)

    def batch_loss(self, model, x: torch.Tensor, noise: torch.Tensor, tau: torch.Tensor):
        """(surrogate, loss, bce, kl), 0-d tensors: batch means; `surrogate.backward()` gives the estimate."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to load: a stateless estimator ignores the state of another one (a run resumed with a new
        `estimator=`)."""


def check_samples(samples: Any, example: int) -> None:
    """`estimator_samples` counts samples per image: an integer >= 1 whatever the estimator."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise UserError(f"estimator_samples={samples!r} is not allowed: must be an integer >= 1 "
                        f"(e.g. estimator_samples={example})")


def sample_codes(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Exact one-hot samples z ~ q(z|x) = Categorical(softmax(logits)) by Gumbel-max, one per leading slice of
    `noise` ([..., B, N, K] noise gives [..., B, N, K] codes). No gradient flows through a sample."""
    return one_hot_argmax(logits.detach() + noise)


def log_q(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log q(z|x) = sum_n log softmax(logits_n)[z_n] of one-hot codes z [..., B, N, K], shape [..., B].

    A gather, not sum(z * log q): 0 * (-inf) would be NaN where a class's probability has underflowed.
    """
    log_probs = F.log_softmax(logits, dim=-1).expand_as(z)
    return log_probs.gather(-1, z.argmax(dim=-1, keepdim=True)).sum(dim=(-2, -1))


def score(log_prob: torch.Tensor) -> torch.Tensor:
    """Zero in value, grad log q in gradient: `signal * score(log q)` adds the REINFORCE term signal * grad log q
    to a surrogate without changing its value, so that the surrogate's value is the logged loss."""
    return log_prob - log_prob.detach()


class MovingAverageBaseline:
    """b, an exponential moving average of the batch-mean learning signal (Williams 1992; Mnih & Gregor
    2014 use the same kind of baseline).

    A baseline keeps REINFORCE unbiased as long as it does not depend on the sample it is subtracted from; the
    average of earlier batches does not. The first batch has no earlier batches: there each image's baseline is the
    mean of the *other* images' signals (leave-one-out, also independent of its own sample), and the average starts
    at that batch's mean.

    The state is two 0-d tensors on the device, updated in place: a captured CUDA graph holds their addresses, and
    `torch.where` instead of an `if` keeps the first-batch case free of host syncs.

    `torch.compile` runs this call eagerly (one graph break). Inside a compiled graph, a state tensor that is read
    and then updated in place is a mutated graph input, and AOTAutograd may recompute the baseline from it in the
    backward pass, after the update: with torch 2.14's aot_eager backend the gradient then used the new average
    instead of the old one (tests/test_estimators.py, the compile test, checks the gradients against eager mode).
    """

    @staticmethod
    def check_decay(decay: Any) -> None:
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0 <= decay < 1):
            raise UserError(f"baseline_decay={decay!r} is not allowed: must be a number in [0, 1) "
                            "(0 = the last batch's mean; e.g. baseline_decay=0.9)")

    def __init__(self, decay: float, device):
        self.decay = decay
        self.value = torch.zeros((), dtype=torch.float32, device=device)
        self.initialised = torch.zeros((), dtype=torch.bool, device=device)
        # Wrapped here, not with a decorator: that would import torch._dynamo (seconds) with this module, in every
        # run, for the two estimators that keep a baseline.
        self._eager_update = torch.compiler.disable(self._update)

    def __call__(self, signal: torch.Tensor) -> torch.Tensor:
        return self._eager_update(signal)

    def _update(self, signal: torch.Tensor) -> torch.Tensor:
        """The baseline for each element of `signal` (detached, any shape), then the average takes its mean in."""
        signal = signal.detach()
        n = signal.numel()
        total = signal.sum()
        leave_one_out = (total - signal) / max(n - 1, 1)
        baseline = torch.where(self.initialised, self.value, leave_one_out)
        mean = total / n
        updated = torch.where(self.initialised, self.decay * self.value + (1 - self.decay) * mean, mean)
        with torch.no_grad():
            self.value.copy_(updated)
            self.initialised.fill_(True)
        return baseline

    def state_dict(self) -> dict:
        return {"baseline": self.value.detach().clone(), "initialised": self.initialised.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """In place (a captured graph reads these addresses). An empty state, from a run of a stateless estimator,
        starts the average afresh."""
        with torch.no_grad():
            self.value.copy_(state.get("baseline", torch.zeros(())))
            self.initialised.copy_(state.get("initialised", torch.zeros((), dtype=torch.bool)))
