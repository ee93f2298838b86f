"""Gumbel-softmax samples (Jang, Gu & Poole 2017; Maddison et al. 2017).

    y = softmax((logits + g) / tau),   g_i = -log(-log u_i),  u_i ~ Uniform(0, 1)

argmax(logits + g) is an exact sample of Categorical(softmax(logits)) (the Gumbel-max trick); the softmax
relaxes it so that gradients reach the logits. tau -> 0 recovers one-hot samples, tau -> inf uniform ones.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def sample_gumbel(shape, *, generator: Optional[torch.Generator] = None, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel noise that is always finite.

    torch.rand draws from [0, 1): u == 0 would give log(0). Clamping u into [tiny, 1 - eps] keeps both
    logarithms finite (g lies in about [-4.5, 16] in float32) and moves no probability mass that matters.
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    info = torch.finfo(dtype)
    u = u.clamp(min=info.tiny, max=1.0 - info.eps)
    return -torch.log(-torch.log(u))


class _StraightThrough(torch.autograd.Function):
    """Forward: the exact one-hot sample. Backward: the gradient of the soft sample.

    The usual `y_hard - y_soft.detach() + y_soft` is only one-hot up to rounding (1 - s + s != 1 in floating
    point), so the decoder would see values like 0.99999994. An autograd function returns y_hard exactly.
    """

    @staticmethod
    def forward(ctx, y_soft: torch.Tensor, y_hard: torch.Tensor) -> torch.Tensor:
        return y_hard

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(y_soft: torch.Tensor, y_hard: torch.Tensor) -> torch.Tensor:
    """Exactly `y_hard` forward; backward, the gradient goes to `y_soft` as if it had been used instead."""
    return _StraightThrough.apply(y_soft, y_hard)


def one_hot_argmax(scores: torch.Tensor) -> torch.Tensor:
    """One-hot of the argmax over the last dimension, in the dtype of `scores`."""
    return F.one_hot(scores.argmax(dim=-1), scores.shape[-1]).to(scores.dtype)


def gumbel_softmax(logits: torch.Tensor, tau, *, hard: bool = False,
                   generator: Optional[torch.Generator] = None,
                   noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A relaxed (or, with `hard`, straight-through one-hot) sample over the last dimension of `logits`.

    `tau` may be a float or a 0-d tensor (a tensor lets a compiled or captured step read a changing tau).
    `noise` is pre-drawn Gumbel noise: the compiled training step takes it as an input so that the random
    stream comes from one explicit generator, identical in eager and compiled mode.
    """
    g = noise if noise is not None else sample_gumbel(logits.shape, generator=generator, device=logits.device,
                                                      dtype=logits.dtype)
    y_soft = F.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return y_soft
    return _StraightThrough.apply(y_soft, one_hot_argmax(y_soft))


def sample_categorical(logits: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Exact one-hot samples of Categorical(softmax(logits)) by the Gumbel-max trick (no gradient)."""
    g = sample_gumbel(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return one_hot_argmax(logits + g)
