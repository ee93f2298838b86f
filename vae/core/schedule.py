"""Exponential temperature annealing (Jang et al. 2017, section 4):

    tau_t = max(temp_min, temperature * exp(-anneal_rate * t)),

with t the global optimisation step rounded down to a multiple of `anneal_interval` (tau changes every
`anneal_interval` steps). It depends on the global step alone, so it never resets between epochs and a
resumed run recovers it exactly from the saved step.
"""
import math


def temperature_at(step: int, *, temperature: float, temp_min: float, anneal_rate: float,
                   anneal_interval: int) -> float:
    t = step - step % anneal_interval
    return max(temp_min, temperature * math.exp(-anneal_rate * t))


def tau_for(cfg, step: int) -> float:
    return temperature_at(step, temperature=cfg.temperature, temp_min=cfg.temp_min,
                          anneal_rate=cfg.anneal_rate, anneal_interval=cfg.anneal_interval)
