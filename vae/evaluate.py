"""Score a trained checkpoint on the test set, in nats per image.

    python -m vae.evaluate checkpoint=outputs/<date>/<time>/checkpoints/best.pt
    python -m vae.evaluate checkpoint=.../last.pt iw_samples=5000 device=cuda seed=1

Reports the relaxed -ELBO at the checkpoint's temperature (what training optimised), the discrete -ELBO
(one-hot z ~ q(z|x), analytic KL), the k-sample importance-weighted bound (Burda et al. 2016; k = 1000 as
in Jang et al. 2017) and how the latent code is used (vae/pictures/latents.py: active variables, perplexity,
confidence). Writes, beside the checkpoint (or into `out=<dir>`): <stem>.metrics.json and the pictures of
vae/pictures/__init__.py, <stem>.prior_samples.png, <stem>.reconstructions.png, <stem>.traversal.png, <stem>.usage.png and
<stem>.class_means.png. Settings: configs/evaluate.yaml (schema `EvaluateConfig` below).

When the output is not a terminal (a log file, a batch job) there is no progress bar: a log line per tenth of the IW
bound says how far it is instead.

The test set is the one the run recorded (data settings, and the MD5s of its test files where the checkpoint has
them), read from the run's data.root (or `data_root=`) and never downloaded: a different test set would give
different numbers without a word.

Hydra writes nothing of its own here (`hydra.output_subdir: null`, `hydra.run.dir: .`, no log file): every
output belongs to a checkpoint and goes beside it, so evaluating twice never litters `outputs/`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm

from vae.core import metrics
from vae.pictures import latents
from vae.common.atomic import atomic_write_text
from vae.training.checkpoint import load_checkpoint
from vae.settings.checks import check_iw_memory, check_output_file, check_threads, resolve_device
from vae.settings.config import CONFIG_DIR, DataConfig
from vae.settings.rules import DEVICE, IMAGES, SEED, THREADS, check_schema, integer, number, setting
from vae.data.device_data import DeviceSplit
from vae.common.errors import UserError, entry_point, memory_hint
from vae.core.gumbel import sample_gumbel
from vae.core.model import CategoricalVAE

log = logging.getLogger("evaluate")


@dataclass
class EvaluateConfig:
    checkpoint: Optional[str] = None
    iw_samples: int = setting(1000, integer(1, note="k of the importance-weighted bound"))
    iw_chunk: int = setting(100, integer(1, note="importance samples evaluated at once"))
    batch_size: int = setting(1000, integer(1, note="test images per batch"))
    seed: int = setting(0, SEED)
    device: str = setting("auto", DEVICE)
    recon_images: int = setting(8, IMAGES)
    prior_samples: int = setting(64, IMAGES)
    prior_nrow: int = setting(8, integer(1, note="images per row of the prior-sample grid"))
    traversal_rows: int = setting(10, integer(1, note="latent variables shown in the traversal"))
    active_kl: float = setting(latents.ACTIVE_KL, number(at_least=0, note="nats per image above which a latent "
                                                                          "variable counts as active"))
    data_root: Optional[str] = None
    # CPU threads for PyTorch (null = its default, one per core).
    threads: Optional[int] = setting(None, THREADS)
    # Directory for the results (null = beside the checkpoint): for a checkpoint on read-only storage.
    out: Optional[str] = None
    # Flush subnormal floats to zero on the CPU (null = on for CPU runs), as in training.
    flush_denormal: Optional[bool] = None


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def validate(cfg: DictConfig) -> None:
    """Range checks, one readable line each, before any file is read."""
    if not cfg.checkpoint:
        raise UserError("checkpoint is required: python -m vae.evaluate "
                        "checkpoint=outputs/<date>/<time>/checkpoints/best.pt")
    check_schema(cfg, EvaluateConfig)
    check_threads(cfg.threads)


def build_model(ckpt: Dict[str, Any], path: Path) -> CategoricalVAE:
    """The checkpoint's model with its weights (vae.training.checkpoint.model_from_checkpoint)."""
    from vae.training.checkpoint import model_from_checkpoint

    return model_from_checkpoint(ckpt, path)


def data_config(ckpt: Dict[str, Any], path: Path, data_root: Optional[str]) -> DictConfig:
    """The checkpoint's own data settings (the test set must be the one the run was scored on), on top of
    the schema so that settings added since the checkpoint was written take their defaults. Only the files already
    there are used: evaluating never downloads a dataset of its own."""
    try:
        data_cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), ckpt["config"]["data"])
    except (KeyError, TypeError, OmegaConfBaseException) as e:
        raise UserError(f"checkpoint={str(path)!r} has data settings this version cannot read "
                        f"({str(e).splitlines()[0][:160]})") from e
    if data_root is not None:
        data_cfg.root = data_root
    data_cfg.download, data_cfg.sources = False, ["local"]
    return data_cfg


def check_test_data(data_cfg: DictConfig, ckpt: Dict[str, Any], where: str) -> None:
    """The run's test files must be where its settings say (`where`: which setting says so), and be the ones it was
    tested on: their MD5s, where the checkpoint recorded them (train.py does), else the official ones that
    data.verify=true checks."""
    from vae.data import OWN_DATA, SPLITS, raw_dir
    from vae.data.verify import file_digest

    if data_cfg.name in OWN_DATA:  # your own images: the file (or folder) the run named, as it was
        from vae.data.arrays import source_path

        try:
            source = source_path(data_cfg)
        except UserError as e:
            raise UserError(f"the checkpoint's test set cannot be read ({where}): {e}") from None
        recorded = ckpt.get("data_md5")
        for name, md5 in (recorded.items() if isinstance(recorded, dict) else ()):
            if name == source.name and file_digest(source) != md5:
                raise UserError(f"{source} is not the file this run was tested on (its MD5 is not the one the "
                                "checkpoint recorded); evaluate with the run's own file")
        return
    raw = raw_dir(data_cfg)
    splits = ("train", "test") if data_cfg.binarize == "static" else ("test",)  # static: one draw over both
    missing = [name for split in splits for name in SPLITS[split] if not (raw / name).is_file()]
    if missing:
        raise UserError(f"the checkpoint's test set is not in {raw} ({where}): it lacks {', '.join(missing)}; pass "
                        f"data_root=<dir> holding {raw.parent.name}/raw/ with the run's files (evaluation never "
                        "downloads a dataset)")
    recorded = ckpt.get("data_md5")
    for name, md5 in (recorded.items() if isinstance(recorded, dict) else ()):
        if name in SPLITS["test"] and file_digest(raw / name) != md5:
            raise UserError(f"{raw / name} is not the file this run was tested on (its MD5 is not the one the "
                            f"checkpoint recorded; {where}); pass data_root=<dir> holding the run's own files")


def load_test_split(data_cfg: DictConfig, device: torch.device) -> DeviceSplit:
    """The test split as the model should be scored on it (vae.data.device_data.scoring_test_split)."""
    from vae.data.device_data import scoring_test_split

    return scoring_test_split(data_cfg, device)


@torch.no_grad()
def save_images(model: CategoricalVAE, test: DeviceSplit, cfg: DictConfig, generator: torch.Generator,
                prefix: Path, stats: Dict[str, Any]) -> Dict[str, str]:
    """The pictures of vae/pictures/__init__.py, as TensorBoard shows them, each as <stem>.<name>.png: prior samples,
    the first test digits above their reconstructions, the traversal of the first of them, the usage map and
    the class means."""
    from vae import pictures

    log_prior = model.log_prior()
    noise = sample_gumbel((cfg.prior_samples, *log_prior.shape), generator=generator, device=log_prior.device)
    x = test.batch(torch.arange(min(cfg.recon_images, test.n), device=test.device))
    drawn = {"prior_samples": pictures.prior_grid(model, noise, nrow=cfg.prior_nrow),
             "reconstructions": pictures.reconstruction_grid(model, x),
             **pictures.latent_pictures(model, x[0], stats, max_rows=cfg.traversal_rows)}
    paths = {}
    for name, picture in drawn.items():
        paths[name] = prefix.with_name(f"{prefix.name}.{name}.png")
        pictures.save_png(picture, paths[name])
    return {k: str(v) for k, v in paths.items()}


def run_settings(c: Dict[str, Any]) -> Dict[str, Any]:
    """The settings that identify the run a checkpoint comes from (those its config has: older checkpoints lack
    some), for the JSON: which estimator, seed and optimizer produced these numbers."""
    settings = {"estimator": "st_gumbel" if c.get("hard") else c.get("estimator", "gumbel")}
    for key in ("estimator_samples", "seed", "lr"):
        if c.get(key) is not None:
            settings[key] = c[key]
    optimizer = c.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("name") is not None:
        settings["optimizer"] = optimizer["name"]
    data = c.get("data")
    if isinstance(data, dict) and data.get("name") is not None:
        settings["data"] = data["name"]
    return settings


class ProgressLines:
    """`progress(n)` for metrics.iw_bound: passes n on to `also` (a tqdm bar's update) and, when `on`, logs a line
    each time another tenth of the `total` images is done: for output that is not a terminal, where no bar shows."""

    def __init__(self, total: int, desc: str, *, on: bool, also: Callable[[int], object]):
        self.total, self.desc, self.on, self.also = total, desc, on, also
        self.done, self.start = 0, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.also(n)
        before, self.done = self.done, self.done + n
        if self.on and self.done * 10 // self.total > before * 10 // self.total:
            log.info("%s: %d/%d images (%d%%), %.1f s", self.desc, self.done, self.total,
                     100 * self.done // self.total, time.perf_counter() - self.start)


RESULT_SUFFIXES = (".metrics.json", ".prior_samples.png", ".reconstructions.png", ".traversal.png", ".usage.png",
                   ".class_means.png")


def result_prefix(path: Path, out: Optional[str]) -> Path:
    """`<dir>/<stem>`, the results' names without their suffixes: beside the checkpoint, or in `out`. Checked now,
    before minutes of computing: the directory takes new files, and no result's name is taken by a directory, FIFO or
    device."""
    prefix = (Path(out).expanduser() if out else path.parent) / path.stem
    key, fix = ("out", "") if out else ("checkpoint", "write the results elsewhere with out=<dir>")
    for suffix in RESULT_SUFFIXES:
        check_output_file(prefix.with_name(prefix.name + suffix), key, fix)
    return prefix


def format_table(result: Dict[str, Any]) -> str:
    m = result["metrics"]
    rows = [(f"relaxed -ELBO (tau={result['tau']:.3g}{', hard' if result['hard'] else ''})", m["loss"]),
            ("  reconstruction (BCE)", m["bce"]),
            ("  KL(q || p)", m["kl"]),
            ("discrete -ELBO", m["elbo_discrete"]),
            (f"IW bound, k={result['k']}", m["iw_bound"])]
    usage = result.get("latents")  # absent when stopped before the end
    if usage is None:
        usage = {"latent_dim": 0, "categorical_dim": 0}
    n_var, k = usage["latent_dim"], usage["categorical_dim"]
    code_rows = [] if not n_var else [(f"active variables (KL > {usage['active_kl']:g} nats)", f"{usage['active']:d} / {n_var}"),
                 (f"perplexity, mean (1 .. {k})", f"{usage['perplexity_mean']:.3f}"),
                 (f"confidence, mean max q (1/{k} .. 1)", f"{usage['confidence']:.3f}")]
    width = max(len(name) for name, _ in rows + code_rows)
    lines = [f"{result['checkpoint']}  (epoch {result['epoch']}, step {result['step']}; "
             f"{result['n_images']} test images on {result['device']}, {result['seconds']:.1f} s)",
             f"{'test, nats per image':<{width}}  {'value':>9}"]
    lines += [f"{name:<{width}}  {value:9.3f}" for name, value in rows]
    if code_rows:
        lines.append(f"code usage, {n_var} variables x {k} classes")
        lines += [f"{name:<{width}}  {value:>9}" for name, value in code_rows]
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> Dict[str, Any]:
    from vae.common.signals import StopFlag

    with StopFlag() as stop:
        return run(cfg, stop)


def run(cfg: DictConfig, stop) -> Dict[str, Any]:
    from vae.data import DataError
    from vae.training.device import configure_device

    validate(cfg)
    device = resolve_device(cfg.device)
    configure_device(device, tf32=True, threads=cfg.threads, flush_denormal=cfg.flush_denormal)
    path = Path(cfg.checkpoint).expanduser()
    ckpt = load_checkpoint(path, key="checkpoint", resume=False)
    prefix = result_prefix(path, cfg.out)  # fail before minutes of computation, not after, if they cannot be written
    c = ckpt["config"]
    check_iw_memory(device, iw_samples=cfg.iw_samples, iw_chunk=cfg.iw_chunk, batch_size=cfg.batch_size,
                    code=c["latent_dim"] * c["categorical_dim"], keys=("iw_chunk", "batch_size"))
    with stop.at_once("while loading"):  # nothing computed yet: a signal ends the command at once
        model = build_model(ckpt, path).to(device)
        data_cfg = data_config(ckpt, path, cfg.data_root)
        where = (f"data_root={cfg.data_root!r}" if cfg.data_root is not None else
                 f"data.root={str(data_cfg.root)!r} as the run recorded it")
        check_test_data(data_cfg, ckpt, where)
        try:
            test = load_test_split(data_cfg, device)
        except DataError as e:
            raise UserError(f"{e} (the test set comes from {where})") from None
    # The relaxed loss as the run's estimator computed it: one-hot (straight-through) codes for every estimator but
    # gumbel (and `hard`, the historical switch for st_gumbel).
    tau, hard = float(ckpt["tau"]), bool(c.get("hard", False)) or c.get("estimator", "gumbel") != "gumbel"

    # One fresh generator per metric: changing k (or the image settings) leaves every other number unchanged.
    def generator() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(cfg.seed)

    start = time.perf_counter()
    sizes = (f"batch_size={cfg.batch_size} x iw_chunk={cfg.iw_chunk} (and the checkpoint's code, latent_dim x "
             f"categorical_dim = {c['latent_dim']} x {c['categorical_dim']})")
    with memory_hint("while evaluating", sizes):
        result_metrics = metrics.evaluate_split(model, test, tau=tau, hard=hard, generator=generator(),
                                                batch_size=cfg.batch_size)
        desc = f"IW bound k={cfg.iw_samples}"
        with tqdm(total=test.n, desc=desc, unit="img", disable=None, dynamic_ncols=True) as bar:
            progress = ProgressLines(test.n, desc, on=not sys.stdout.isatty(), also=bar.update)
            iw = None if stop() else metrics.iw_bound(model, test, k=cfg.iw_samples, chunk=cfg.iw_chunk,
                                                      batch_size=cfg.batch_size, generator=generator(),
                                                      progress=progress, should_stop=stop)
    seconds = time.perf_counter() - start
    if iw is None:  # Ctrl-C / SIGTERM: show what was computed; an earlier complete result file stays as it was
        print(format_table({"checkpoint": str(path), "epoch": ckpt["epoch"], "step": ckpt["step"], "tau": tau,
                            "hard": hard, "k": cfg.iw_samples, "n_images": test.n, "device": str(device),
                            "seconds": seconds, "metrics": {**result_metrics, "iw_bound": math.nan}}))
        print(f"stopped by {stop.name} before the IW bound was done: nothing written", file=sys.stderr, flush=True)
        raise SystemExit(stop.exit_code)
    result_metrics["iw_bound"] = iw
    usage = latents.code_usage(model, test, batch_size=cfg.batch_size, threshold=cfg.active_kl,
                               generator=generator())
    seconds = time.perf_counter() - start
    if not all(math.isfinite(v) for v in result_metrics.values()):
        raise UserError(f"checkpoint={str(path)!r} gives non-finite test metrics {result_metrics}; "
                        "its weights have diverged: evaluate an earlier checkpoint (e.g. best.pt)")

    result = {
        "checkpoint": str(path), "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]), "tau": tau, "hard": hard,
        "k": cfg.iw_samples, "iw_chunk": cfg.iw_chunk, "batch_size": cfg.batch_size, "seed": cfg.seed,
        "run": run_settings(c), "n_images": test.n, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "seconds": seconds, "metrics": result_metrics,
        "latents": {"latent_dim": model.latent_dim, "categorical_dim": model.categorical_dim,
                    "perplexity": usage["perplexity"].tolist(), "perplexity_mean": usage["perplexity_mean"],
                    "kl_per_variable": usage["kl_per_variable"].tolist(), "active": usage["active"],
                    "active_kl": cfg.active_kl, "confidence": usage["confidence"]},
    }
    result["images"] = save_images(model, test, cfg, generator(), prefix, usage)
    metrics_path = prefix.with_name(prefix.name + ".metrics.json")
    atomic_write_text(metrics_path, json.dumps(result, indent=2) + "\n", "metrics")
    print(format_table(result))
    print(f"wrote {metrics_path}")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
