"""Numbers over seeds, and the published numbers they are compared with.

`PUBLISHED` holds each published result the tables cite, keyed by (preset, shape, estimator), with its source.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

JANG = "Jang, Gu & Poole (2017), Table 1 (−log p(x), 100 epochs)"
REINMAX_CV = "Wang & Bui (2026), ReinMax-CV result files (test −ELBO, 160 epochs, mean of 10 seeds)"

# (preset, shape, estimator) -> (value, source). Shapes are classes x variables.
PUBLISHED = {
    ("paper", None, "gumbel"): (101.5, JANG), ("paper", None, "st_gumbel"): (107.8, JANG),
    ("paper", None, "st"): (110.9, JANG), ("paper", None, "annealed_st"): (107.8, JANG),
    ("paper", None, "sf"): (110.6, JANG), ("paper", None, "muprop"): (107.0, JANG),
    ("reinmax", "8x4", "reinmax"): (126.63, REINMAX_CV), ("reinmax", "4x24", "reinmax"): (102.45, REINMAX_CV),
    ("reinmax", "64x8", "reinmax"): (102.96, REINMAX_CV), ("reinmax", "10x30", "reinmax"): (100.49, REINMAX_CV),
}


def published_for(preset: str, shape: Optional[str], estimator: str) -> Optional[dict]:
    """The published number for a table row, or None. A preset's own shape (10x30 for reinmax) counts as given."""
    hit = PUBLISHED.get((preset, shape, estimator))
    if hit is None and shape is None and preset == "reinmax":
        hit = PUBLISHED.get((preset, "10x30", estimator))
    return None if hit is None else {"value": hit[0], "source": hit[1]}


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = list(values)
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def fmt_mean_std(values: List[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f} (n={len(values)})" if len(values) > 1 else f"{mean:.2f} (n=1)"
