"""The schedules of a run, each a function of the global step alone (so a resumed run recovers them exactly).

Exponential temperature annealing (Jang et al. 2017, section 4):

    tau_t = max(temp_min, temperature * exp(-anneal_rate * t)),

with t the global optimisation step rounded down to a multiple of `anneal_interval` (tau changes every
`anneal_interval` steps). It depends on the global step alone, so it never resets between epochs and a
resumed run recovers it exactly from the saved step.

The learning rate: `constant` (the default), or `cosine`, half a cosine from `lr` at the first step to 0 after the
run's last (Loshchilov & Hutter 2017, SGDR, without restarts): lr_t = lr * (1 + cos(pi * t / T)) / 2, T = epochs *
steps per epoch. T comes from `epochs`, so resuming with more epochs stretches the rest of the curve.
"""
import math


def temperature_at(step: int, *, temperature: float, temp_min: float, anneal_rate: float,
                   anneal_interval: int) -> float:
    t = step - step % anneal_interval
    return max(temp_min, temperature * math.exp(-anneal_rate * t))


def tau_for(cfg, step: int) -> float:
    return temperature_at(step, temperature=cfg.temperature, temp_min=cfg.temp_min,
                          anneal_rate=cfg.anneal_rate, anneal_interval=cfg.anneal_interval)


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, *, lr: float, schedule: str, total_steps: int) -> float:
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def lr_schedule(cfg) -> str:
    return cfg.get("lr_schedule", "constant")  # a config saved before the setting existed: constant


def lr_moves(cfg) -> bool:
    """Whether the learning rate changes during the run (then it is logged, and a compiled step holds it in a tensor)."""
    return lr_schedule(cfg) != "constant"


def lr_for(cfg, step: int, total_steps: int) -> float:
    return lr_at(step, lr=cfg.lr, schedule=lr_schedule(cfg), total_steps=total_steps)
