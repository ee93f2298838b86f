"""How far each gradient estimator's encoder gradient is from the true one, on one fixed batch.

    python -m vae.gradients                                      # a fresh model, latent_dim=4 categorical_dim=4
    python -m vae.gradients checkpoint=outputs/<date>/<time>/checkpoints/best.pt taus=[0.5,1.0,2.0]
    python -m vae.gradients estimators=[st_gumbel,gumbel_rao] estimator_samples=100 samples=2000
    python -m vae.gradients definition=reinmax latent_dim=4 categorical_dim=8 tau=1.3   # as Liu et al. 2023 measure
    python -m vae.gradients checkpoint=<a 30 x 10 run>/checkpoints/last.pt              # no exact gradient: estimated

For each estimator, `samples` independent estimates g, compared with a reference: the exact gradient g* from
summing over all K^N codes where K^N <= 65536, else (or with reference=rloo) the mean r of `reference_samples`
rloo estimates, unbiased, reported with its own standard error. Two definitions (`definition=ours|reinmax|both`):

  ours (default): g the gradient of the batch's whole loss with respect to the encoder's parameters (flattened);
    bias |E[g] - g*| / |g*|, std sqrt(E|g - E[g]|^2) / |g*|, cosine E[cos(g, g*)]; against an estimated
    reference est_bias, est_std, est_cosine (divided by |r|) and rel_std sqrt(E|g - E[g]|^2) / |E[g]|.
  reinmax: g the gradient of the reconstruction term alone with respect to the encoder's logits (Liu et al. 2023,
    their mnist_vae code); reinmax_bias |E[g] - g*| / |g*|, reinmax_cos cos(E[g], g*), reinmax_rel_std
    |per-coordinate std of g| / |E[g]| (reinmax_est_bias and reinmax_est_cos against an estimated reference).

Writes <out>/gradients.json ({"exact_norm" or "reference", "estimators": {name: {...}}}, plus "by_tau" with several
taus) and <out>/gradients.png, and prints a table. Before it starts, it refuses in one line what would not fit in
memory, naming the settings that size it. Settings: configs/gradients.yaml (schema `GradientsConfig`). Hydra
writes nothing of its own. docs/estimators.md has examples.
"""
from __future__ import annotations

import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vae.common.atomic import atomic_write_text
from vae.settings.checks import check_writable, resolve_device
from vae.settings.config import CONFIG_DIR, DataConfig, check_code_size
from vae.settings.rules import (DEVICE, SEED, Rule, check_schema, each_of, integer, number, one_of, optional,
                                 setting)
from vae.common.errors import UserError, entry_point, is_out_of_memory
from vae.estimators import (ESTIMATORS, check_settings, config_settings, default_samples, make_estimator,
                            takes_samples)
from vae.estimators.exact import CHUNK, MAX_CODES
from vae.tools.gradient_report import draw_chart, format_table
from vae.tools.gradient_stats import (DECODER_UNITS, ENCODER_UNITS, copies_per_call, encoder_gram, gram_columns,
                                kl_logits_gradient, logit_gradient_chunks, logits_gradients, ours, reference_summary,
                                reinmax, summarize)
from vae.core.model import CategoricalVAE

DEFINITIONS = ("ours", "reinmax", "both")
REFERENCES = ("auto", "exact", "rloo")


@dataclass
class GradientsConfig:
    checkpoint: Optional[str] = None
    latent_dim: int = setting(4, integer(1))
    categorical_dim: int = setting(4, integer(2))
    batch_size: int = setting(16, integer(1))
    samples: int = setting(1000, integer(2))
    estimators: List[str] = setting(rule=each_of(ESTIMATORS, non_empty=True),
                                    factory=lambda: [n for n in ESTIMATORS if n != "exact"])
    tau: Optional[float] = setting(None, optional(number(above=0)))
    taus: Optional[List[float]] = setting(None, Rule(lambda ts: ts is None or all(POSITIVE.ok(t) for t in ts),
                                                     "every temperature must be a number > 0"))
    estimator_samples: Optional[int] = None
    baseline_decay: float = 0.9
    definition: str = setting("ours", one_of(DEFINITIONS))
    reference: str = setting("auto", one_of(REFERENCES))
    reference_samples: int = setting(10000, integer(2))
    seed: int = setting(0, SEED)
    device: str = setting("auto", DEVICE)
    out: str = "gradients"
    data_root: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="gradients_schema", node=GradientsConfig)


POSITIVE = number(above=0)


def validate(cfg: DictConfig) -> None:
    """Every setting against its rule (declared beside it above), then what relates them; before any file is read."""
    check_schema(cfg, GradientsConfig)
    check_code_size(cfg.latent_dim, cfg.categorical_dim)
    for name in cfg.estimators:
        check_settings(name, settings_for(cfg, name), 1, 2)


def taus_of(cfg: DictConfig, default: float) -> List[float]:
    if cfg.taus:
        return [float(t) for t in cfg.taus]
    return [float(cfg.tau if cfg.tau is not None else default)]


def samples_for(cfg: DictConfig, name: str) -> int:
    """`estimator_samples` applies to the estimators that take several samples; the others draw one."""
    if takes_samples(name) and cfg.estimator_samples is not None:
        return int(cfg.estimator_samples)
    return default_samples(name)


def settings_for(cfg: DictConfig, name: str) -> dict:
    """The settings estimator `name` is measured with: samples_for's, and baseline_decay if it keeps a baseline."""
    return config_settings(name, {"estimator_samples": samples_for(cfg, name), "baseline_decay": cfg.baseline_decay})


def resolve_reference(cfg: DictConfig, model) -> str:
    """exact or rloo for this model: auto is exact where the K^N codes can be summed over."""
    K, N = model.categorical_dim, model.latent_dim
    if "exact" in cfg.estimators:
        check_settings("exact", {}, N, K)
    if cfg.reference == "exact" and K ** N > MAX_CODES:
        raise UserError(f"reference=exact sums over K^N = {K}^{N} codes, more than {MAX_CODES}: use reference=auto "
                        "or reference=rloo (a many-sample estimate, reported with its standard error), or a model "
                        f"with K^N <= {MAX_CODES}")
    if cfg.reference == "auto":
        return "exact" if K ** N <= MAX_CODES else "rloo"
    return cfg.reference


# -- memory ---------------------------------------------------------------------------------------------------------

def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory that can still be allocated on `device` (the cgroup's limit counts too), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = []
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            free += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    with contextlib.suppress(OSError, ValueError):  # a container's limit (cgroup v2), which /proc/meminfo ignores
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return min(free) if free else None


def allocations(model, batch_size: int, names: List[str], reference: str, want_ours: bool,
                cfg: DictConfig) -> Tuple[Tuple[int, str, str], List[Tuple[int, str, str]]]:
    """What `measure` allocates, from the shapes alone (an estimate to within a small factor), each as (bytes, what,
    the settings that size it): the Gram matrix, held throughout, and the largest allocations of each step."""
    B, N, K = batch_size, model.latent_dim, model.categorical_dim
    D, P = B * N * K, sum(p.numel() for p in model.encoder.parameters())
    code = f"batch_size={B} (with the code, latent_dim x categorical_dim = {N} x {K})"
    held = (8 * D * D if want_ours else 0, f"the encoder's Gram matrix over the batch's {D} logits",
            f"batch_size={B} (the matrix grows with its square; definition=reinmax needs none)")
    steps = [(4 * B * (784 + 3 * N * K), "the batch", code)]
    if want_ours:
        steps.append((gram_columns(B, P) * 4 * (2 * P + 4 * B * ENCODER_UNITS), "forming the Gram matrix", code))
    if reference == "exact":
        steps.append((4 * (K ** N * N * K + 8 * B * CHUNK + 6 * CHUNK * DECODER_UNITS),
                       f"the exact gradient over {K}^{N} codes", code))
    for name in dict.fromkeys([*names, *(["rloo"] if reference == "rloo" else [])]):
        if name == "exact":
            continue
        k = samples_for(cfg, name) if name in names else default_samples(name)
        draws = k if takes_samples(name) else 1
        r = copies_per_call(B, draws)
        decoded = r * B * (k if name == "rloo" else 1)
        where = f"estimator_samples={k} and batch_size={B}" if takes_samples(name) else code
        steps.append((4 * (6 * decoded * DECODER_UNITS + 12 * r * B * draws * N * K) + 32 * r * D,
                      f"one call of {name} ({r} x {B} images x {k} samples)", where))
    return held, steps


def check_memory(model, batch_size: int, names: List[str], reference: str, want_ours: bool, cfg: DictConfig,
                 device: torch.device) -> None:
    """Refuse, before any work, what would not fit: one line naming the settings that size the largest part."""
    held, steps = allocations(model, batch_size, names, reference, want_ours, cfg)
    peak = max(steps)
    free = free_bytes(device)
    if free is None or held[0] + peak[0] <= free:
        return
    _, what, settings = max(held, peak)
    raise UserError(f"vae.gradients would need about {_size(held[0] + peak[0])} on {device} but {_size(free)} is "
                    f"free, most of it for {what}: lower {settings}")


@contextlib.contextmanager
def out_of_memory(what: str, settings: str):
    """An allocation that fails anyway (the estimate is rough; memory is shared) becomes one line naming `settings`,
    and the size asked for, whole."""
    try:
        yield
    except Exception as e:
        if not (isinstance(e, MemoryError) or is_out_of_memory(e)):
            raise
        asked = re.search(r"allocate ([\d.]+) ?(bytes|[KMGT]i?B)", str(e), re.IGNORECASE)
        size = ""
        if asked:
            size = f" of {_size(float(asked.group(1)))}" if asked.group(2) == "bytes" else f" of {asked.group(1)} " \
                f"{asked.group(2)}"
        raise UserError(f"out of memory {what} (an allocation{size} failed); its size grows with {settings}: "
                        "lower them") from None


# -- measuring ------------------------------------------------------------------------------------------------------

def measure(model, x, names: List[str], taus: List[float], cfg: DictConfig, reference: str = "exact") -> Dict:
    """{"exact_norm" (ours) / "reinmax_exact_norm" (reinmax) or "reference" (estimated), "estimators"} for the first
    tau, and "by_tau" {tau: {"estimators"}} when there are several."""
    device, B = x.device, len(x)
    want_ours, want_reinmax = cfg.definition in ("ours", "both"), cfg.definition in ("reinmax", "both")
    code = f"batch_size={B} (with the code, {model.latent_dim} x {model.categorical_dim})"
    with out_of_memory("forming the encoder's Gram matrix", f"{code}; definition=reinmax needs none"):
        gram = encoder_gram(model, x) if want_ours else None
    kl_grad = kl_logits_gradient(model, x).double()
    result: Dict = {}
    with out_of_memory(f"computing the {reference} reference", code):
        if reference == "exact":
            exact_est = make_estimator("exact", {}, device)
            ref = logits_gradients(model, x, exact_est, torch.ones((), device=device), None, 1)[0].double()
            se = None
            if want_ours:
                result["exact_norm"] = (ref @ gram @ ref).clamp_min(0).sqrt().item()
            if want_reinmax:
                result["reinmax_exact_norm"] = (ref - kl_grad).norm().item()
        else:  # the mean of many rloo estimates, from a stream of its own (a measured rloo must not share its noise)
            est = make_estimator("rloo", {}, device)
            seed = torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(cfg.seed)).item()
            chunks = logit_gradient_chunks(model, x, est, torch.ones((), device=device),
                                           torch.Generator(device=device).manual_seed(seed), cfg.reference_samples)
            moments = summarize(chunks, gram)
            ref, result["reference"] = moments.mean, reference_summary(moments, kl_grad, "rloo")
            se = result["reference"]
    for wanted, key, what in ((want_ours, "norm", ""), (want_reinmax, "reinmax_norm", " of the reconstruction term")):
        norm = (se or {}).get(key, result.get(key.replace("norm", "exact_norm")))
        if wanted and norm == 0:
            raise UserError(f"the {'estimated' if se else 'exact'} encoder gradient{what} on this batch is zero: "
                            "nothing to compare with; choose another checkpoint, seed or batch_size")
    if cfg.definition != "ours":
        result["definition"] = cfg.definition
    by_tau: Dict[float, Dict[str, Dict[str, float]]] = {}
    for tau in taus:
        by_tau[tau] = {}
        for name in names:
            est = make_estimator(name, settings_for(cfg, name), device)
            if not est.uses_tau and tau != taus[0]:
                by_tau[tau][name] = by_tau[taus[0]][name]  # the same estimator whatever tau: measured once
                continue
            # One fresh generator per estimator: its numbers do not depend on which others are measured.
            generator = torch.Generator(device=device).manual_seed(cfg.seed)
            where = f"estimator_samples={samples_for(cfg, name)} and {code}" if takes_samples(name) else code
            with out_of_memory(f"measuring {name}", where):
                chunks = logit_gradient_chunks(model, x, est, torch.tensor(tau, device=device), generator,
                                               cfg.samples)
                moments = summarize(chunks, gram, ref if want_ours else None)
            stats: Dict[str, float] = {}
            if want_ours:
                stats.update(ours(moments, ref, None if se is None else se["rel_se"]))
            if want_reinmax:
                stats.update(reinmax(moments, ref, kl_grad, None if se is None else se["reinmax_rel_se"]))
            by_tau[tau][name] = stats
    result["estimators"] = by_tau[taus[0]]
    if len(taus) > 1:
        result["by_tau"] = {f"{tau:g}": {"estimators": by_tau[tau]} for tau in taus}
    return result


def load_model(cfg: DictConfig):
    """(model, data settings of its test set, its temperature): the checkpoint's, or a fresh model of the settings'
    shape initialised with `seed` and the `data` settings."""
    from vae.evaluate import build_model, data_config  # the checkpoint route of vae.evaluate

    if cfg.checkpoint:
        from vae.training.checkpoint import load_checkpoint

        path = Path(cfg.checkpoint).expanduser()
        ckpt = load_checkpoint(path, key="checkpoint", resume=False)  # scoring needs the weights and config only
        return build_model(ckpt, path), data_config(ckpt, path, cfg.data_root), float(ckpt["tau"])
    torch.manual_seed(cfg.seed)
    model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim)
    data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), cfg.data)
    if cfg.data_root is not None:
        data_cfg.root = cfg.data_root
    return model, data_cfg, 1.0


def load_batch(cfg: DictConfig, data_cfg: DictConfig, device: torch.device) -> torch.Tensor:
    """The first `batch_size` test images, as evaluation binarizes them."""
    from vae.evaluate import load_test_split

    test = load_test_split(data_cfg, device)
    return test.batch(torch.arange(min(cfg.batch_size, test.n), device=device))


def run(cfg: DictConfig) -> Dict:
    from vae.training.device import configure_device

    validate(cfg)
    device = resolve_device(cfg.device)
    # No TF32: its 10-bit mantissa would put an error of about 1e-3 into the exact gradient and every estimate.
    configure_device(device, tf32=False)
    out = Path(cfg.out).expanduser()
    check_writable(out, "out")
    model, data_cfg, default_tau = load_model(cfg)
    reference = resolve_reference(cfg, model)
    names = list(cfg.estimators)
    x = load_batch(cfg, data_cfg, device)
    check_memory(model, len(x), names, reference, cfg.definition != "reinmax", cfg, device)
    model = model.to(device)
    taus = taus_of(cfg, default_tau)
    start = time.perf_counter()
    result = measure(model, x, names, taus, cfg, reference)
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "gradients.json", json.dumps(result, indent=2) + "\n")
    source = cfg.checkpoint or f"fresh model, latent_dim={cfg.latent_dim} categorical_dim={cfg.categorical_dim}"
    ref = result.get("reference")
    against = f", vs an ESTIMATED reference ({ref['estimates']} {ref['estimator']} estimates)" if ref else ""
    draw_chart(result, taus, cfg.samples, out / "gradients.png", f"{source}: {len(x)} images, {cfg.samples} "
               f"estimates each, tau={','.join(f'{t:g}' for t in taus)}{against}")
    print(format_table(result, taus, cfg.samples))
    print(f"{len(x)} images, {model.categorical_dim}^{model.latent_dim} codes, on {device}, {seconds:.1f} s")
    print(f"wrote {out / 'gradients.json'} and {out / 'gradients.png'}")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="gradients", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
