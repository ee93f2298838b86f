"""The tables and the chart of `python -m vae.gradients`, from its result dict (the keys of gradients.json)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

from vae.common.atomic import atomic_write


def views(result: Dict, samples: int) -> List[Tuple[str, List[Tuple[str, int, int]]]]:
    """(title, columns (key, width, decimals)) of each table, in the keys of gradients.json; `noise` is the bias that
    sampling error alone gives (std / sqrt(samples), and the reference's standard error where it is estimated)."""
    out = []
    ref = result.get("reference")
    if "exact_norm" in result:
        out.append((f"encoder gradient vs exact (|g*| = {result['exact_norm']:.4g}), {samples} estimates each",
                    [("bias", 9, 4), ("noise", 9, 4), ("std", 9, 4), ("cosine", 7, 3)]))
    elif ref and "norm" in ref:
        out.append((f"encoder gradient vs an ESTIMATED reference r, the mean of {ref['estimates']} {ref['estimator']} "
                    f"estimates (|r| = {ref['norm']:.4g}, standard error {ref['rel_se']:.3g} |r|), {samples} "
                    "estimates each", [("est_bias", 9, 4), ("est_noise", 9, 4), ("est_std", 9, 4),
                                       ("est_cosine", 10, 3), ("rel_std", 9, 4)]))
    what = "ReinMax's definition (Liu et al. 2023): gradient of the reconstruction term w.r.t. the encoder's logits"
    if "reinmax_exact_norm" in result:
        out.append((f"{what}, vs exact (|g*| = {result['reinmax_exact_norm']:.4g}), {samples} estimates each",
                    [("reinmax_bias", 12, 4), ("reinmax_noise", 13, 4), ("reinmax_rel_std", 15, 4),
                     ("reinmax_cos", 11, 3)]))
    elif result.get("definition") in ("reinmax", "both"):
        out.append((f"{what}, vs an ESTIMATED reference r, the mean of {ref['estimates']} {ref['estimator']} "
                    f"estimates (|r| = {ref['reinmax_norm']:.4g}, standard error {ref['reinmax_rel_se']:.3g} |r|), "
                    f"{samples} estimates each", [("reinmax_est_bias", 16, 4), ("reinmax_est_noise", 17, 4),
                                                  ("reinmax_rel_std", 15, 4), ("reinmax_est_cos", 15, 3)]))
    return out


def _value(s: Dict[str, float], key: str, samples: int) -> float:
    return s["std"] / math.sqrt(samples) if key == "noise" else s[key]


def format_table(result: Dict, taus: List[float], samples: int) -> str:
    """One table per definition, one row per estimator (and tau)."""
    rows = result.get("by_tau") or {f"{taus[0]:g}": {"estimators": result["estimators"]}}
    lines = []
    for title, columns in views(result, samples):
        lines += [title, f"{'estimator':<12} {'tau':>5} " + " ".join(f"{k:>{w}}" for k, w, _ in columns)]
        for tau, entry in rows.items():
            for name, s in entry["estimators"].items():
                lines.append(f"{name:<12} {tau:>5} " + " ".join(f"{_value(s, k, samples):{w}.{d}f}"
                                                                 for k, w, d in columns))
    return "\n".join(lines)


def draw_chart(result: Dict, taus: List[float], samples: int, path: Path, title: str) -> None:
    """The first table's bias and spread per estimator as bars on a log scale (1e-3 .. 1e2), cosine as a number; the
    black tick on a bias bar is its noise, the bias an unbiased estimator shows. Drawn with PIL (already there with
    torchvision): one small chart is not worth a plotting library as a dependency."""
    from PIL import Image, ImageDraw

    (bias_key, _, _), (noise_key, _, _), (spread_key, _, _), (cos_key, _, _) = views(result, samples)[0][1][:4]
    rows = [(f"{name} (tau={tau})" if len(taus) > 1 else name, s)
            for tau, entry in (result.get("by_tau") or {"": {"estimators": result["estimators"]}}).items()
            for name, s in entry["estimators"].items()]
    left, panel, gap, row_h, top = 170, 300, 40, 18, 40
    width, height = left + 2 * panel + gap + 90, top + row_h * len(rows) + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill="black")
    lo, hi = -3, 2

    def x_of(value: float, x0: int) -> int:
        v = math.log10(max(value, 10.0 ** lo))
        return x0 + int((panel - 1) * (min(v, hi) - lo) / (hi - lo))

    for i, (key, colour) in enumerate(((bias_key, (200, 60, 40)), (spread_key, (40, 90, 200)))):
        x0 = left + i * (panel + gap)
        unit = "|E[g]|" if "rel_std" in key else "|r|" if "est_" in key else "|g*|"
        draw.text((x0, top - 16), f"{key} / {unit} (log scale)", fill="black")
        for decade in range(lo, hi + 1):
            x = x_of(10.0 ** decade, x0)
            draw.line([(x, top), (x, height - 24)], fill=(215, 215, 215))
            draw.text((x - 10, height - 20), f"1e{decade}", fill="gray")
        for r, (_, s) in enumerate(rows):
            y = top + r * row_h
            draw.rectangle([x0, y + 3, max(x0 + 1, x_of(s[key], x0)), y + row_h - 3], fill=colour)
            if key == bias_key:
                tick = x_of(_value(s, noise_key, samples), x0)
                draw.line([(tick, y + 1), (tick, y + row_h - 1)], fill="black", width=2)
    x_cos = left + 2 * panel + gap + 20
    draw.text((x_cos, top - 16), cos_key, fill="black")
    for r, (label, s) in enumerate(rows):
        y = top + r * row_h
        draw.text((8, y + 3), label, fill="black")
        draw.text((x_cos, y + 3), f"{s[cos_key]:.3f}", fill="black")
    atomic_write(path, lambda f: image.save(f, format="png"))
