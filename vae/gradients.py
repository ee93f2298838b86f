"""How far each gradient estimator's encoder gradient is from the exact one, on one fixed batch.

    python -m vae.gradients                                      # a fresh model, latent_dim=4 categorical_dim=4
    python -m vae.gradients checkpoint=outputs/<date>/<time>/checkpoints/best.pt taus=[0.5,1.0,2.0]
    python -m vae.gradients estimators=[st_gumbel,gumbel_rao] estimator_samples=100 samples=2000

For each estimator, `samples` independent estimates g of the gradient of the batch's loss with respect to the
encoder's parameters (flattened), against the exact gradient g* from summing over all K^N codes (so K^N <= 65536):

    bias    |E[g] - g*| / |g*|          (E over the samples: an unbiased estimator shows about std / sqrt(samples))
    std     sqrt(E |g - E[g]|^2) / |g*|  (the spread of one estimate)
    cosine  E[cos(g, g*)]

Writes <out>/gradients.json ({"exact_norm", "estimators": {name: {bias, std, cosine}}}, plus "by_tau" with several
taus) and <out>/gradients.png, and prints a table. Settings: configs/gradients.yaml (schema `GradientsConfig`).
Hydra writes nothing of its own. docs/estimators.md has an example.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vae.atomic import atomic_write, atomic_write_text
from vae.checks import check_writable, resolve_device
from vae.config import CONFIG_DIR, DataConfig, check_device_name
from vae.errors import UserError, entry_point
from vae.estimators import MULTI_SAMPLE, NAMES, check_settings, default_samples, make_estimator
from vae.gumbel import sample_gumbel
from vae.model import CategoricalVAE

# Images pushed through one estimator call (the batch repeated), and columns of the encoder's Gram matrix formed at
# once (each needs a parameter-sized vector: 537,360 floats for the default architecture).
ROWS_PER_CALL = 2048
COLUMNS_AT_ONCE = 32


@dataclass
class GradientsConfig:
    checkpoint: Optional[str] = None
    latent_dim: int = 4
    categorical_dim: int = 4
    batch_size: int = 16
    samples: int = 1000
    estimators: List[str] = field(default_factory=lambda: [n for n in NAMES if n != "exact"])
    tau: Optional[float] = None
    taus: Optional[List[float]] = None
    estimator_samples: Optional[int] = None
    baseline_decay: float = 0.9
    seed: int = 0
    device: str = "auto"
    out: str = "gradients"
    data_root: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="gradients_schema", node=GradientsConfig)


def _one_line(key: str, value, allowed: str) -> UserError:
    return UserError(f"{key}={value!r} is not allowed: {allowed} (set it on the command line, e.g. {key}=...)")


def validate(cfg: DictConfig) -> None:
    """Range checks, one readable line each, before any file is read."""
    for key, minimum in (("batch_size", 1), ("samples", 2), ("latent_dim", 1), ("categorical_dim", 2)):
        if cfg[key] < minimum:
            raise _one_line(key, cfg[key], f"must be an integer >= {minimum}")
    unknown = [n for n in cfg.estimators if n not in NAMES]
    if unknown or not cfg.estimators:
        raise _one_line("estimators", list(cfg.estimators), f"a non-empty list drawn from {', '.join(NAMES)}")
    for tau in taus_of(cfg, 1.0):
        if not (math.isfinite(tau) and tau > 0):
            raise _one_line("taus" if cfg.taus else "tau", tau, "every temperature must be a number > 0")
    for name in cfg.estimators:
        check_settings(name, samples_for(cfg, name), 1, 2, cfg.baseline_decay)
    check_device_name(cfg.device)


def taus_of(cfg: DictConfig, default: float) -> List[float]:
    if cfg.taus:
        return [float(t) for t in cfg.taus]
    return [float(cfg.tau if cfg.tau is not None else default)]


def samples_for(cfg: DictConfig, name: str) -> int:
    """`estimator_samples` applies to the estimators that take several samples; the others draw one."""
    if name in MULTI_SAMPLE and cfg.estimator_samples is not None:
        return int(cfg.estimator_samples)
    return default_samples(name)


class _GivenLogits:
    """The model with its encoder's output replaced by a given tensor, so that one backward pass through an estimator
    gives the gradient with respect to the logits of every copy of the batch separately."""

    def __init__(self, model, logits):
        self.model, self.logits = model, logits

    def encode(self, x):
        return self.logits

    def decode(self, z):
        return self.model.decode(z)

    def log_prior(self):
        return self.model.log_prior()


def logits_gradients(model, x, estimator, tau: torch.Tensor, generator, samples: int) -> torch.Tensor:
    """`samples` estimates of d(batch-mean surrogate)/d(logits of the batch), [samples, B*N*K].

    The batch is repeated r times in one estimator call, each copy with its own noise, and one backward pass gives
    the gradient with respect to each copy's logits.
    """
    logits = model.encode(x).detach()
    B, N, K = logits.shape
    per_call = max(1, ROWS_PER_CALL // B)
    estimates = []
    for start in range(0, samples, per_call):
        r = min(per_call, samples - start)
        copies = logits.repeat(r, 1, 1).requires_grad_()
        noise = sample_gumbel(estimator.noise_shape(r * B, N, K), generator=generator, device=x.device)
        surrogate = estimator.batch_loss(_GivenLogits(model, copies), x.repeat(r, 1), noise, tau)[0]
        (delta,) = torch.autograd.grad(surrogate, copies)
        estimates.append(delta.reshape(r, B * N * K) * r)  # the surrogate averages r*B images, one estimate B
    return torch.cat(estimates)


def encoder_gram(model, x) -> torch.Tensor:
    """M = J J^T, J = d(logits of the batch)/d(encoder parameters) [B*N*K, P], in float64.

    An estimate's encoder gradient is g = J^T delta, delta its gradient with respect to the logits, and every number
    reported is made of inner products g.h = delta^T M eta: with M in hand, no parameter-sized vector is formed per
    estimate. Column by column, M e = J (J^T e): a vector-Jacobian product, then a Jacobian-vector product.
    """
    params = {k: v.detach() for k, v in model.encoder.named_parameters()}

    def logits_of(p):  # model.encode(x), flattened, as a function of the encoder's parameters
        return torch.func.functional_call(model.encoder, p, (x,)).flatten()

    _, vjp = torch.func.vjp(logits_of, params)

    def column(e):
        (v,) = vjp(e)
        return torch.func.jvp(logits_of, (params,), (v,))[1]

    eye = torch.eye(logits_of(params).numel(), device=x.device)
    with warnings.catch_warnings():  # torch.func.jvp uses torch.jit.script internally, and torch 2.14 warns about it
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        return torch.cat([torch.func.vmap(column)(block) for block in eye.split(COLUMNS_AT_ONCE)]).double()


def compare(estimates: torch.Tensor, exact: torch.Tensor, gram: torch.Tensor) -> Dict[str, float]:
    """bias, std and cosine of the encoder gradients J^T delta of the estimates delta [S, D] against J^T delta*."""
    d, d_star = estimates.double(), exact.double()

    def norm(v):  # |J^T v| for each row of v; rounding can leave a quadratic form a hair below zero
        return ((v @ gram) * v).sum(dim=-1).clamp_min(0).sqrt()

    exact_norm = norm(d_star)
    mean = d.mean(dim=0)
    bias = norm(mean - d_star) / exact_norm
    std = (norm(d - mean) ** 2).sum().div(len(d) - 1).sqrt() / exact_norm
    cosine = (d @ gram @ d_star / (norm(d) * exact_norm).clamp_min(torch.finfo(d.dtype).tiny)).mean()
    return {"bias": bias.item(), "std": std.item(), "cosine": cosine.item()}


def measure(model, x, names: List[str], taus: List[float], cfg: DictConfig) -> Dict:
    """{"exact_norm", "estimators"} for the first tau, and "by_tau" {tau: {"estimators"}} when there are several."""
    device = x.device
    gram = encoder_gram(model, x)
    exact_est = make_estimator("exact", samples=1, baseline_decay=cfg.baseline_decay, device=device)
    exact = logits_gradients(model, x, exact_est, torch.ones((), device=device), None, 1)[0]
    exact_norm = (exact.double() @ gram @ exact.double()).clamp_min(0).sqrt().item()
    if exact_norm == 0:
        raise UserError("the exact encoder gradient of this batch is zero: nothing to compare with; "
                        "choose another checkpoint, seed or batch_size")
    by_tau: Dict[float, Dict[str, Dict[str, float]]] = {}
    for tau in taus:
        by_tau[tau] = {}
        for name in names:
            est = make_estimator(name, samples=samples_for(cfg, name), baseline_decay=cfg.baseline_decay,
                                 device=device)
            if not est.uses_tau and tau != taus[0]:
                by_tau[tau][name] = by_tau[taus[0]][name]  # the same estimator whatever tau: measured once
                continue
            # One fresh generator per estimator: its numbers do not depend on which others are measured.
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            estimates = logits_gradients(model, x, est, torch.tensor(tau, device=device), generator, cfg.samples)
            by_tau[tau][name] = compare(estimates, exact, gram)
    result = {"exact_norm": exact_norm, "estimators": by_tau[taus[0]]}
    if len(taus) > 1:
        result["by_tau"] = {f"{tau:g}": {"estimators": by_tau[tau]} for tau in taus}
    return result


def format_table(result: Dict, taus: List[float], samples: int) -> str:
    """One row per estimator (and tau); `noise` is std / sqrt(samples), the bias an unbiased estimator shows."""
    rows = result.get("by_tau") or {f"{taus[0]:g}": {"estimators": result["estimators"]}}
    lines = [f"encoder gradient vs exact (|g*| = {result['exact_norm']:.4g}), {samples} estimates each",
             f"{'estimator':<12} {'tau':>5} {'bias':>9} {'noise':>9} {'std':>9} {'cosine':>7}"]
    for tau, entry in rows.items():
        for name, s in entry["estimators"].items():
            noise = s["std"] / math.sqrt(samples)
            lines.append(f"{name:<12} {tau:>5} {s['bias']:9.4f} {noise:9.4f} {s['std']:9.4f} {s['cosine']:7.3f}")
    return "\n".join(lines)


def load_model_and_batch(cfg: DictConfig, device: torch.device):
    """The checkpoint's model and its run's test set, or a fresh model and the `data` settings' test set; the first
    `batch_size` test images as evaluation binarizes them."""
    from vae.evaluate import build_model, data_config, load_test_split  # the checkpoint route of vae.evaluate

    if cfg.checkpoint:
        from vae.checkpoint import load_checkpoint

        path = Path(cfg.checkpoint).expanduser()
        ckpt = load_checkpoint(path, key="checkpoint", resume=False)  # scoring needs the weights and config only
        model = build_model(ckpt, path)
        check_settings("exact", 1, model.latent_dim, model.categorical_dim, cfg.baseline_decay)
        data_cfg, tau = data_config(ckpt, path, cfg.data_root), float(ckpt["tau"])
    else:
        check_settings("exact", 1, cfg.latent_dim, cfg.categorical_dim, cfg.baseline_decay)
        torch.manual_seed(cfg.seed)
        model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim)
        data_cfg, tau = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data), 1.0
        if cfg.data_root is not None:
            data_cfg.root = cfg.data_root
    test = load_test_split(data_cfg, device)
    x = test.batch(torch.arange(min(cfg.batch_size, test.n), device=device))
    return model.to(device), x, tau


def draw_chart(result: Dict, taus: List[float], samples: int, path: Path, title: str) -> None:
    """Bias and std per estimator as bars on a log scale (1e-3 .. 1e2 of |g*|), cosine as a number; the black tick on
    a bias bar is std / sqrt(samples), the bias an unbiased estimator shows. Drawn with PIL (already there with
    torchvision): one small chart is not worth a plotting library as a dependency."""
    from PIL import Image, ImageDraw

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

    for i, (key, colour) in enumerate((("bias", (200, 60, 40)), ("std", (40, 90, 200)))):
        x0 = left + i * (panel + gap)
        draw.text((x0, top - 16), f"{key} / |g*| (log scale)", fill="black")
        for decade in range(lo, hi + 1):
            x = x_of(10.0 ** decade, x0)
            draw.line([(x, top), (x, height - 24)], fill=(215, 215, 215))
            draw.text((x - 10, height - 20), f"1e{decade}", fill="gray")
        for r, (_, s) in enumerate(rows):
            y = top + r * row_h
            draw.rectangle([x0, y + 3, max(x0 + 1, x_of(s[key], x0)), y + row_h - 3], fill=colour)
            if key == "bias":
                tick = x_of(s["std"] / math.sqrt(samples), x0)
                draw.line([(tick, y + 1), (tick, y + row_h - 1)], fill="black", width=2)
    x_cos = left + 2 * panel + gap + 20
    draw.text((x_cos, top - 16), "cosine", fill="black")
    for r, (label, s) in enumerate(rows):
        y = top + r * row_h
        draw.text((8, y + 3), label, fill="black")
        draw.text((x_cos, y + 3), f"{s['cosine']:.3f}", fill="black")
    atomic_write(path, lambda f: image.save(f, format="png"))


def run(cfg: DictConfig) -> Dict:
    from vae.engine import configure_device

    validate(cfg)
    device = resolve_device(cfg.device)
    # No TF32: its 10-bit mantissa would put an error of about 1e-3 into the exact gradient and every estimate.
    configure_device(device, tf32=False)
    out = Path(cfg.out).expanduser()
    check_writable(out, "out")
    model, x, default_tau = load_model_and_batch(cfg, device)
    taus = taus_of(cfg, default_tau)
    start = time.perf_counter()
    result = measure(model, x, list(cfg.estimators), taus, cfg)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gradients.json", json.dumps(result, indent=2) + "\n")
    source = cfg.checkpoint or f"fresh model, latent_dim={cfg.latent_dim} categorical_dim={cfg.categorical_dim}"
    draw_chart(result, taus, cfg.samples, out / "gradients.png",
               f"{source}: {len(x)} images, {cfg.samples} estimates each, tau={','.join(f'{t:g}' for t in taus)}")
    print(format_table(result, taus, cfg.samples))
    print(f"{len(x)} images, {model.categorical_dim}^{model.latent_dim} codes, on {device}, {seconds:.1f} s")
    print(f"wrote {out / 'gradients.json'} and {out / 'gradients.png'}")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="gradients", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
