"""The benchmark's settings: the trainer's schema (`Config`) extended with what is timed; shared by
`python -m vae.bench` and `python -m vae.baseline` (configs/bench.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from vae.settings.config import Config, validate_ranges
from vae.settings.rules import check, each_of, integer, number, one_of, optional, setting

# mode -> (compile, cuda_graph), as TrainStep takes them.
MODES = {"eager": (False, False), "compile": (True, False), "cuda_graph": (False, True),
         "compile+cuda_graph": (True, True)}
ADAM = ("trainer", "fused", "foreach", "for_loop")


@dataclass
class BenchConfig(Config):
    """The trainer's settings (inherited: one declaration, the trainer's defaults and rules) plus what is timed."""

    modes: List[str] = setting(rule=each_of(MODES),
                               factory=lambda: ["eager", "compile", "cuda_graph", "compile+cuda_graph"])
    baseline: bool = True
    baseline_workers: int = setting(0, integer(0))
    # here: the epochs timed per row (a fraction is timed and extrapolated)
    epochs: float = setting(3.0, number(above=0, note="fractions of an epoch are timed and extrapolated"))
    steps: Optional[int] = setting(None, optional(integer(1), "time `epochs` epochs"))
    warmup_steps: int = setting(20, integer(0))
    rounds: int = setting(3, integer(1))
    adam: str = setting("trainer", one_of(ADAM))
    estimate_epochs: int = setting(10, integer(1))
    profile: bool = False
    profile_steps: int = setting(10, integer(1))
    profile_rows: int = setting(12, integer(1))
    out: Optional[str] = None


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def validate(cfg: DictConfig) -> None:
    """One readable line per bad setting, before any data is read: every setting against its rule (the trainer's
    own for the trainer's settings), then what relates them."""
    validate_ranges(cfg, BenchConfig)
    check(bool(cfg.modes) or cfg.baseline, "modes", list(cfg.modes), "at least one mode, or baseline=true")
