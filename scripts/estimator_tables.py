"""The estimator tables and figure of docs/estimators.md, from runs collected by scripts/export_runs.py.

    python scripts/estimator_tables.py RUNS.json [FIGURE.png]

Run names as scripts/cpu-estimator-tables.sh and scripts/gpu-session.sh write them: `paper-<estimator>[-s<seed>]`
(Jang et al. 2017's protocol) and `reinmax-<estimator>` (the ReinMax paper's model). Prints two markdown tables
(mean and standard deviation over seeds where there are several) and draws the test curves, one line per
estimator, with PIL (which torchvision already brings).
"""
import json
import math
import re
import statistics
import sys
from collections import defaultdict

# Jang, Gu & Poole (2017), Table 1: -log p(x) on binarized MNIST, the categorical VAE (20 x 10 latents), m = 1000.
PAPER = {"sf": 110.6, "muprop": 107.0, "st": 110.9, "annealed_st": 107.8, "gumbel": 101.5, "st_gumbel": 107.8}
ORDER = ("gumbel", "st_gumbel", "st", "annealed_st", "sf", "rloo", "muprop", "gumbel_rao", "reinmax")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


def group(runs: dict, protocol: str) -> dict:
    """estimator -> list of runs of that protocol (one per seed)."""
    out = defaultdict(list)
    for name, run in runs.items():
        m = re.fullmatch(rf"{protocol}-([a-z_]+?)(-s\d+)?(-eager)?", name)
        if m:
            out[m.group(1)].append(run)
    return out


def iw_bound(run: dict):
    """The run's IW bound (k=1000): train.py's, or `python -m vae.evaluate`'s of the last checkpoint."""
    value = run["metrics"].get("test_iw_bound")
    if value is None and run.get("evaluate"):
        value = run["evaluate"]["metrics"].get("iw_bound")
    return value


def fmt(values: list) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


def tables(runs: dict) -> str:
    lines = []
    paper = group(runs, "paper")
    if paper:
        epochs = {r["metrics"]["epochs"] for rs in paper.values() for r in rs}
        lines += [f"Paper protocol, {'/'.join(map(str, sorted(epochs)))} epochs: test -log p(x) bound (IW, k=1000), "
                  "nats", "", "| estimator | ours: IW bound | ours: discrete -ELBO | Jang et al. 2017, Table 1 |",
                  "| --- | ---: | ---: | ---: |"]
        for est in ORDER:
            rs = paper.get(est, [])
            lines.append(f"| `{est}` | {fmt([iw_bound(r) for r in rs])} | "
                         f"{fmt([r['metrics']['test_elbo_discrete'] for r in rs])} | {PAPER.get(est, '–')} |")
        lines.append("| DARN | not implemented | | 128.8 |")
    reinmax = group(runs, "reinmax")
    if reinmax:
        epochs = {r["metrics"]["epochs"] for rs in reinmax.values() for r in rs}
        lines += ["", f"ReinMax protocol (30 x 10, grayscale, batch 100), {'/'.join(map(str, sorted(epochs)))} epochs: "
                  "test negative ELBO, nats", "", "| estimator | ours: discrete -ELBO | ours: relaxed test loss |",
                  "| --- | ---: | ---: |"]
        for est in ORDER:
            if est in reinmax:
                rs = reinmax[est]
                lines.append(f"| `{est}` | {fmt([r['metrics']['test_elbo_discrete'] for r in rs])} | "
                             f"{fmt([r['metrics']['test_loss'] for r in rs])} |")
    return "\n".join(lines)


def draw(runs: dict, path: str, protocol: str = "paper", tag: str = "test/elbo_discrete") -> None:
    """One line per estimator (first seed): `tag` against the epoch."""
    from PIL import Image, ImageDraw

    curves = {est: rs[0]["curves"].get(tag, []) for est, rs in group(runs, protocol).items()}
    curves = {e: c for e, c in curves.items() if c}
    if not curves:
        return
    w, h, left, right, top, bottom = 900, 560, 70, 170, 40, 50
    values = [v for c in curves.values() for _, v in c]
    lo, hi = min(values), min(max(values), min(values) + 60)  # the first epochs' losses would flatten the rest
    n = max(len(c) for c in curves.values())
    image = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(image)

    def xy(i, v):
        x = left + (w - left - right) * i / max(n - 1, 1)
        y = top + (h - top - bottom) * (1 - (min(v, hi) - lo) / (hi - lo or 1))
        return x, y

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        _, y = xy(0, v)
        d.line([left - 4, y, left, y], fill="black")
        d.text((5, y - 6), f"{v:.1f}", fill="black")
    d.text((left, h - bottom + 15), f"epoch 1 .. {n}", fill="black")
    d.text((left, 12), f"{protocol} protocol: {tag} (nats, lower is better)", fill="black")
    for (est, c), colour in zip(sorted(curves.items(), key=lambda kv: ORDER.index(kv[0])), COLOURS):
        d.line([xy(i, v) for i, (_, v) in enumerate(c)], fill=colour, width=2)
        y = top + 18 * ORDER.index(est)
        d.line([w - right + 10, y + 6, w - right + 30, y + 6], fill=colour, width=3)
        d.text((w - right + 35, y), est, fill="black")
    image.save(path)


if __name__ == "__main__":
    runs = json.load(open(sys.argv[1]))
    print(tables(runs))
    if len(sys.argv) > 2:
        draw(runs, sys.argv[2])
        print(f"wrote {sys.argv[2]}")
