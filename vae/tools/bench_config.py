"""The benchmark's settings: the trainer's schema (`Config`) extended with what is timed; shared by
`python -m vae.bench` and `python -m vae.baseline` (configs/bench.yaml)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vae.settings.config import Config, check, validate_ranges

# mode -> (compile, cuda_graph), as TrainStep takes them.
MODES = {"eager": (False, False), "compile": (True, False), "cuda_graph": (False, True),
         "compile+cuda_graph": (True, True)}
ADAM = ("trainer", "fused", "foreach", "for_loop")


@dataclass
class BenchConfig(Config):
    """The trainer's settings (inherited: one declaration, the trainer's defaults) plus what is timed."""

    modes: List[str] = field(default_factory=lambda: ["eager", "compile", "cuda_graph", "compile+cuda_graph"])
    baseline: bool = True
    baseline_workers: int = 0
    epochs: float = 3.0  # here: the epochs timed per row (a fraction is timed and extrapolated)
    steps: Optional[int] = None
    warmup_steps: int = 20
    rounds: int = 3
    adam: str = "trainer"
    estimate_epochs: int = 10
    profile: bool = False
    profile_steps: int = 10
    profile_rows: int = 12
    out: Optional[str] = None


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def validate(cfg: DictConfig) -> None:
    """One readable line per bad setting, before any data is read."""
    check(all(m in MODES for m in cfg.modes), "modes", list(cfg.modes), f"a list drawn from {', '.join(MODES)}")
    check(bool(cfg.modes) or cfg.baseline, "modes", list(cfg.modes), "at least one mode, or baseline=true")
    check(cfg.adam in ADAM, "adam", cfg.adam, f"one of {', '.join(ADAM)}")
    check(math.isfinite(cfg.epochs) and cfg.epochs > 0, "epochs", cfg.epochs,
          "a number > 0 (fractions of an epoch are timed and extrapolated)")
    for key, minimum in (("warmup_steps", 0), ("rounds", 1), ("baseline_workers", 0), ("estimate_epochs", 1),
                         ("profile_steps", 1), ("profile_rows", 1)):
        check(cfg[key] >= minimum, key, cfg[key], f"an integer >= {minimum}")
    check(cfg.steps is None or cfg.steps >= 1, "steps", cfg.steps, "an integer >= 1, or null to time `epochs` epochs")
    validate_ranges(cfg)  # the trainer's own checks for the trainer's settings
