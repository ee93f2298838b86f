"""Training speed on one device: this trainer's step in each fast mode against a textbook port, in one run.

    python -m vae.bench                                   # every mode this device has, 1 epoch timed per mode
    python -m vae.bench epochs=0.1                        # time a tenth of an epoch per mode and extrapolate
    python -m vae.bench device=cuda modes=[eager,compile+cuda_graph] out=bench-h100.json
    python -m vae.bench threads=1 adam=fused profile=true # the CPU knobs measured in the README (Speed)

Settings: configs/bench.yaml (schema `BenchConfig` below). Two kinds of rows:

* Our trainer (`eager`, `compile`, `cuda_graph`, `compile+cuda_graph`): exactly the inner loop of train.py
  with its default settings (batch 100, 30 x 10 latents, soft samples, Adam lr 1e-3): the training set held on
  the device as uint8 (`vae.device_data.DeviceSplit`), one `torch.randperm` per epoch sliced into batches,
  `vae.engine.TrainStep` built in the mode named, the temperature as a 0-d device tensor refreshed when the
  schedule changes it, loss sums accumulated on the device, the same finiteness check and log-interval read-back
  as train.py. The optimizer is `vae.engine.make_optimizer`'s unless `adam=` picks another Adam variant. A mode
  this device cannot run (CUDA graphs on a CPU) is reported as "n/a" and skipped; one that fails to build (no
  C++ compiler for torch.compile, say) is reported as "failed: <reason>" and skipped.
* `baseline`: what the usual PyTorch ports of this model do, feeding the same model and loss:
  `torchvision.datasets.MNIST(data.root, train=True, transform=transforms.ToTensor())` (FashionMNIST for
  data=fashion_mnist), `DataLoader(batch_size, shuffle=True, num_workers=baseline_workers)` (each image
  wrapped as a PIL image, turned into a float tensor in [0, 1] by ToTensor and collated, every epoch), then per
  batch `x.to(device)`, `optimizer.zero_grad()`, `vae.model.CategoricalVAE.encode`, `vae.gumbel.gumbel_softmax` with noise from the
  global RNG and the temperature as a Python float (the same schedule), `decode`, `vae.loss.negative_elbo`,
  `.mean().backward()`, a default `torch.optim.Adam(lr)` step and a `loss.item()` per step (the host sync of
  every port's progress print). A dynamic binarization draws `torch.bernoulli(x)` on the device (a static one
  is not reproduced: the baseline then trains on grayscale targets, at the same cost). An epoch boundary inside
  the timed steps starts a new loader iterator (a new shuffle), as in a port; the last short batch counts.

Every runner is built and warmed up first (`warmup_steps` steps; for compile and cuda_graph that includes the
compilation or the capture: the "compile s" column), then the timed steps are split into `rounds` blocks run
round-robin across the rows, so that a change in machine load hits every row alike; each row reports the median
rate over its blocks. Timing: CUDA events around each block plus a synchronize (CUDA), `time.perf_counter`
(CPU). Only training steps are timed (no test pass, no checkpoint, no TensorBoard). When fewer steps than an
epoch are timed the epoch time is extrapolated, and the table says so ("steps timed" vs steps per epoch).

Output: a compact table on stdout, the estimated training time of `estimate_epochs` epochs, and a JSON file
(`out`) with the settings, device, torch version, CPU model and threads, machine load and every row.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from vae.atomic import atomic_write_text
from vae.config import CONFIG_DIR, Config, DataConfig, check, resolve_device, validate_ranges
from vae.errors import UserError, describe, exit_with
from vae.schedule import tau_for

log = logging.getLogger("vae.bench")

# mode -> (compile, cuda_graph), as TrainStep takes them.
MODES = {"eager": (False, False), "compile": (True, False), "cuda_graph": (False, True),
         "compile+cuda_graph": (True, True)}
ADAM = ("trainer", "fused", "foreach", "for_loop")


@dataclass
class BenchConfig:
    device: str = "auto"
    modes: List[str] = field(default_factory=lambda: ["eager", "compile", "cuda_graph", "compile+cuda_graph"])
    baseline: bool = True
    baseline_workers: int = 0
    epochs: float = 1.0
    steps: Optional[int] = None
    warmup_steps: int = 20
    rounds: int = 3
    threads: Optional[int] = None
    adam: str = "trainer"
    estimate_epochs: int = 10
    profile: bool = False
    profile_steps: int = 10
    profile_rows: int = 12
    out: Optional[str] = None
    # The trainer's settings (same names and defaults as configs/config.yaml).
    latent_dim: int = 30
    categorical_dim: int = 10
    prior: str = "uniform"
    hard: bool = False
    temperature: float = 1.0
    temp_min: float = 0.5
    anneal_rate: float = 3e-5
    anneal_interval: int = 100
    batch_size: int = 100
    lr: float = 1e-3
    seed: int = 0
    tf32: bool = True
    log_interval: int = 100
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


# The trainer's settings that the benchmark shares: checked by the trainer's own range checks.
TRAINER_KEYS = ("latent_dim", "categorical_dim", "prior", "hard", "temperature", "temp_min", "anneal_rate",
                "anneal_interval", "batch_size", "lr", "seed", "tf32", "log_interval", "device", "threads", "data")


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
    validate_ranges(OmegaConf.merge(OmegaConf.structured(Config), {k: cfg[k] for k in TRAINER_KEYS}))


# --- timing --------------------------------------------------------------------------------------------------

class Timer:
    """Seconds of device work: CUDA events (after a synchronize) on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn):
        """(fn(), seconds it took)."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            value = fn()
            end.record()
            torch.cuda.synchronize(self.device)
            return value, start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the two kinds of rows -----------------------------------------------------------------------------------

def make_adam(model, cfg: DictConfig, device: torch.device, cuda_graph: bool, compile: bool):
    """The trainer's optimizer (`adam=trainer`) or one Adam implementation chosen by name, to measure it."""
    from vae.engine import make_optimizer

    if cfg.adam == "trainer":
        return make_optimizer(model, cfg.lr, device, cuda_graph, compile)
    kwargs = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}[cfg.adam]
    if cuda_graph:
        kwargs["capturable"] = True
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, **kwargs)


class TrainerRun:
    """train.py's inner loop over a DeviceSplit, with TrainStep in one mode; state carries across `run` calls."""

    def __init__(self, cfg: DictConfig, split, device: torch.device, compile: bool, cuda_graph: bool):
        from vae.engine import TrainStep, make_generators
        from vae.model import CategoricalVAE

        self.cfg, self.split, self.device = cfg, split, device
        self.batch_size = cfg.batch_size
        self.steps_per_epoch = split.n // cfg.batch_size  # full batches only, as train.py
        self.images_per_epoch = self.steps_per_epoch * cfg.batch_size
        torch.manual_seed(cfg.seed)
        self.model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior).to(device)
        initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.optimizer = make_adam(self.model, cfg, device, cuda_graph, compile)
        self.gens = make_generators(cfg.seed, device)
        self.step_fn = TrainStep(self.model, self.optimizer, split, batch_size=cfg.batch_size, hard=cfg.hard,
                                 noise_generator=self.gens["noise"],
                                 binarize_generator=self.gens["binarize"] if split.binarize == "dynamic" else None,
                                 compile=compile, cuda_graph=cuda_graph,
                                 compile_optimizer=None if cfg.adam == "trainer" else False)
        with torch.no_grad():  # in place: a captured graph holds these addresses
            for k, v in self.model.state_dict().items():
                v.copy_(initial[k])
        self.step, self.epoch_step = 0, 0
        self.tau = tau_for(cfg, 0)
        self.tau_t = torch.tensor(self.tau, device=device)
        self.epoch_sums = torch.zeros(3, device=device)
        self.interval_sums = torch.zeros(3, device=device)
        self.check_every = 1 if device.type == "cpu" else cfg.log_interval  # as train.py
        self.perm = None

    def run(self, n: int) -> int:
        """n steps; returns the number of images trained on."""
        cfg, bs = self.cfg, self.batch_size
        for _ in range(n):
            if self.perm is None or self.epoch_step == self.steps_per_epoch:
                self.perm = torch.randperm(self.split.n, generator=self.gens["shuffle"], device=self.device)
                self.epoch_step = 0
                self.epoch_sums.zero_()
            new_tau = tau_for(cfg, self.step)
            if new_tau != self.tau:
                self.tau = new_tau
                self.tau_t.fill_(new_tau)
            stats = self.step_fn(self.perm[self.epoch_step * bs:(self.epoch_step + 1) * bs], self.tau_t)
            self.epoch_sums += stats
            self.interval_sums += stats
            self.step += 1
            self.epoch_step += 1
            if self.step % self.check_every == 0 and not torch.isfinite(self.interval_sums).all():
                raise FloatingPointError(f"the loss became NaN/inf at step {self.step}")
            if self.step % cfg.log_interval == 0:
                (self.interval_sums / cfg.log_interval).tolist()  # train.py's scalars: one read-back
                self.interval_sums.zero_()
        return n * bs

    def loss(self) -> float:
        """Mean training loss over this epoch's steps so far (read after timing, for a sanity check)."""
        return (self.epoch_sums[0] / max(self.epoch_step, 1)).item()


class BaselineRun:
    """The textbook port (see the module docstring): DataLoader of ToTensor images, same model and loss."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from vae.model import CategoricalVAE

        self.cfg, self.device = cfg, device
        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[cfg.data.name]
        try:
            self.dataset = cls(str(cfg.data.root), train=True, download=False, transform=transforms.ToTensor())
        except RuntimeError as e:  # torchvision: "Dataset not found"
            raise UserError(f"baseline: torchvision cannot read {cfg.data.root} ({str(e).splitlines()[0]}); "
                            "run `python -m vae.data` first, or set baseline=false") from e
        self.loader = DataLoader(self.dataset, batch_size=cfg.batch_size, shuffle=True,
                                 num_workers=cfg.baseline_workers)
        self.steps_per_epoch = len(self.loader)
        self.images_per_epoch = len(self.dataset)
        torch.manual_seed(cfg.seed)
        self.model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.iterator = None
        self.step = 0
        self.epoch_losses: List[float] = []

    def _next_batch(self):
        if self.iterator is not None:
            batch = next(self.iterator, None)
            if batch is not None:
                return batch
        self.iterator = iter(self.loader)  # the first call, or the end of an epoch: a new shuffled epoch
        self.epoch_losses = []
        return next(self.iterator)

    def run(self, n: int) -> int:
        from vae.gumbel import gumbel_softmax
        from vae.loss import negative_elbo

        images = 0
        for _ in range(n):
            x, _ = self._next_batch()
            x = x.to(self.device).view(-1, 28 * 28)
            if self.cfg.data.binarize == "dynamic":
                x = torch.bernoulli(x)
            self.optimizer.zero_grad()
            logits = self.model.encode(x)
            z = gumbel_softmax(logits, tau_for(self.cfg, self.step), hard=self.cfg.hard)
            loss, _, _ = negative_elbo(self.model.decode(z), x, logits, self.model.log_prior())
            loss = loss.mean()
            loss.backward()
            self.optimizer.step()
            self.epoch_losses.append(loss.item())
            self.step += 1
            images += len(x)
        return images

    def loss(self) -> float:
        return statistics.fmean(self.epoch_losses) if self.epoch_losses else float("nan")


# --- the run -------------------------------------------------------------------------------------------------

@dataclass
class Row:
    mode: str
    status: str = "ok"          # ok | n/a (the device cannot run it) | failed (it could not be built or run)
    reason: str = ""
    runner: Any = None
    compile_s: float = math.nan  # building the step (compile / capture) plus the warm-up steps
    blocks: List[tuple] = field(default_factory=list)  # (steps, images, seconds) per timed block

    def skip(self, status: str, reason: str) -> None:
        self.status, self.reason, self.runner = status, reason, None
        log.warning("%s: %s", self.mode, reason if status == "n/a" else f"{status}: {reason}")


def block_sizes(steps: int, rounds: int) -> List[int]:
    """`steps` split into at most `rounds` blocks of near-equal size (none empty)."""
    rounds = min(rounds, steps)
    return [steps // rounds + (i < steps % rounds) for i in range(rounds)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> Dict[str, Any]:
    import torchvision

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
        "cuda": torch.version.cuda, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
    }
    return info


def build_rows(cfg: DictConfig, device: torch.device) -> List[Row]:
    """Build and warm up every row (in order: the modes, then the baseline)."""
    timer = Timer(device)
    warmup = max(cfg.warmup_steps, 1)  # at least one step, so compilation is never inside the timed steps
    try:  # torch.optim imports torch._dynamo on first use (2-3 s): a one-off of the process, not of any row
        import torch._dynamo  # noqa: F401
    except Exception:  # pragma: no cover  (minimal builds)
        pass
    rows = [Row(m) for m in cfg.modes]
    split = None
    if rows:
        from vae.data import load_split
        from vae.device_data import DeviceSplit

        train_images, _ = load_split(cfg.data, "train")
        # The training split exactly as train.py's make_splits builds it (static: the first draw of its generator).
        gen = torch.Generator().manual_seed(cfg.data.binarize_seed) if cfg.data.binarize == "static" else None
        split = DeviceSplit(train_images, device, cfg.data.binarize, gen)
        if split.n < cfg.batch_size:
            raise UserError(f"batch_size={cfg.batch_size} is larger than the training set ({split.n} images)")
    for row in rows:
        compile_mode, graph_mode = MODES[row.mode]
        if graph_mode and device.type != "cuda":
            row.skip("n/a", "n/a: needs CUDA")
            continue
        log.info("%s: building and warming up (%d steps)%s", row.mode, warmup,
                 "; torch.compile takes a while" if compile_mode else "")

        def build(compile_mode=compile_mode, graph_mode=graph_mode):
            runner = TrainerRun(cfg, split, device, compile_mode, graph_mode)
            runner.run(warmup)
            return runner

        try:
            row.runner, row.compile_s = timer(build)
        except Exception as e:  # a mode that cannot run here is reported, never fatal
            row.skip("failed", describe(e))
    if cfg.baseline:
        row = Row("baseline")
        log.info("baseline: building and warming up (%d steps)", warmup)

        def build_baseline():
            runner = BaselineRun(cfg, device)
            runner.run(warmup)
            return runner

        try:
            row.runner, row.compile_s = timer(build_baseline)
        except Exception as e:
            row.skip("failed", describe(e))
        rows.append(row)
    return rows


def time_rows(cfg: DictConfig, rows: List[Row], device: torch.device) -> None:
    """Round-robin timed blocks over the rows that built."""
    timer = Timer(device)
    plans = {}
    for row in rows:
        if row.status == "ok":
            steps = cfg.steps or max(1, round(cfg.epochs * row.runner.steps_per_epoch))
            plans[row.mode] = block_sizes(steps, cfg.rounds)
    for r in range(cfg.rounds):
        for row in rows:
            if row.status != "ok" or r >= len(plans[row.mode]):
                continue
            n = plans[row.mode][r]
            try:
                images, seconds = timer(lambda: row.runner.run(n))
            except Exception as e:
                row.skip("failed", describe(e))
                continue
            row.blocks.append((n, images, seconds))
        log.info("round %d/%d: %s", r + 1, cfg.rounds, ", ".join(
            f"{row.mode} {row.blocks[-1][1] / row.blocks[-1][2]:,.0f} img/s" for row in rows
            if row.status == "ok" and len(row.blocks) == r + 1))


def profile_row(row: Row, cfg: DictConfig, device: torch.device) -> List[Dict[str, Any]]:
    """torch.profiler over `profile_steps` steps: the top ops by self time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        row.runner.run(cfg.profile_steps)
        _sync(device)
    events = prof.key_averages()
    on_device = device.type == "cuda"

    def device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))

    key = device_us if on_device else (lambda e: float(e.self_cpu_time_total))
    top = sorted(events, key=key, reverse=True)[:cfg.profile_rows]
    total_cpu = sum(float(e.self_cpu_time_total) for e in events)
    n = cfg.profile_steps
    out = [{"op": e.key, "calls_per_step": e.count / n, "self_cpu_ms_per_step": e.self_cpu_time_total / n / 1e3,
            **({"self_device_ms_per_step": device_us(e) / n / 1e3} if on_device else {})} for e in top]
    print(f"\nprofile: {row.mode}, {n} steps, self CPU time {total_cpu / n / 1e3:.2f} ms/step "
          f"(top {len(top)} ops by self {'device' if on_device else 'CPU'} time)")
    width = max([len(o["op"][:48]) for o in out] + [2])
    for o in out:
        dev = f" {o['self_device_ms_per_step']:8.3f} ms dev" if on_device else ""
        share = o["self_cpu_ms_per_step"] * n * 1e3 / total_cpu if total_cpu else 0.0
        print(f"  {o['op'][:48]:<{width}} {o['self_cpu_ms_per_step']:8.3f} ms cpu {share:6.1%}{dev}"
              f"  x{o['calls_per_step']:g}")
    return out


def summarize(cfg: DictConfig, rows: List[Row], device: torch.device) -> List[Dict[str, Any]]:
    out = []
    for row in rows:
        d: Dict[str, Any] = {"mode": row.mode, "status": row.status}
        if row.status != "ok" or not row.blocks:
            d["reason"] = row.reason
            out.append(d)
            continue
        runner = row.runner
        rates = [images / seconds for _, images, seconds in row.blocks]
        steps = sum(n for n, _, _ in row.blocks)
        images = sum(i for _, i, _ in row.blocks)
        seconds = sum(s for _, _, s in row.blocks)
        ips = statistics.median(rates)
        d.update({
            "steps": steps, "steps_per_epoch": runner.steps_per_epoch, "extrapolated": steps < runner.steps_per_epoch,
            "images": images, "seconds": seconds, "images_per_s": ips, "images_per_s_overall": images / seconds,
            "images_per_s_blocks": rates, "ms_per_step": 1e3 * seconds / steps,
            "s_per_epoch": runner.images_per_epoch / ips,
            "compile_s": row.compile_s,
            "estimate_epochs": cfg.estimate_epochs,
            "estimate_s": cfg.estimate_epochs * runner.images_per_epoch / ips,
            "loss": runner.loss(),
        })
        out.append(d)
    base = next((d for d in out if d["mode"] == "baseline" and d["status"] == "ok"), None)
    for d in out:
        if d["status"] == "ok":
            d["speedup_vs_baseline"] = base["s_per_epoch"] / d["s_per_epoch"] if base else None
    return out


def format_table(result: Dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"device {m['device_name']} | CPU {m['cpu_model']}, torch threads {m['torch_threads']} of "
             f"{m['cpus_usable']} usable CPUs | torch {m['torch']} | load {result['load_before'][0]:.1f} -> "
             f"{result['load_after'][0]:.1f}",
             f"batch {s['batch_size']}, latents {s['latent_dim']}x{s['categorical_dim']}, "
             f"{'hard' if s['hard'] else 'soft'} samples, adam={s['adam']}, data.binarize={s['data']['binarize']}"]
    ok = [d for d in result["rows"] if d["status"] == "ok"]
    if ok:
        timed = sorted({(d["steps"], d["steps_per_epoch"]) for d in ok})
        what = "; ".join(f"{a} steps timed of {b} per epoch" for a, b in timed)
        extrap = any(d["extrapolated"] for d in ok)
        lines.append(f"{what}, in up to {s['rounds']} round-robin blocks (median rate)"
                     + ("; epoch time extrapolated" if extrap else ""))
    lines += ["", "| mode | images/s | s/epoch | compile s | speed-up vs baseline |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for d in result["rows"]:
        if d["status"] != "ok":
            lines.append(f"| {d['mode']} | {d['reason']} | | | |")
            continue
        sp = f"{d['speedup_vs_baseline']:.2f}x" if d.get("speedup_vs_baseline") else "-"
        lines.append(f"| {d['mode']} | {d['images_per_s']:,.0f} | {d['s_per_epoch']:.2f} | {d['compile_s']:.1f} "
                     f"| {sp} |")
    lines.append("(compile s: building the step, i.e. torch.compile or the CUDA-graph capture, plus the warm-up steps)")
    n = s["estimate_epochs"]
    for label, key in (("default setting", "default_mode"), ("fastest", "fastest_mode")):
        mode = result.get(key)
        d = next((r for r in ok if r["mode"] == mode), None)
        if d is None or (key == "fastest_mode" and mode == result.get("default_mode")):
            continue
        lines.append(f"{n} epochs of training, {label} ({mode}): {d['estimate_s']:.1f} s "
                     f"(+ {d['compile_s']:.1f} s compile/warm-up once)")
    return "\n".join(lines)


def bench(cfg: DictConfig) -> Dict[str, Any]:
    from vae.engine import configure_device, pick_modes

    validate(cfg)
    device = resolve_device(cfg.device)
    # Threads and TF32 as train.py sets them; process-wide, so the baseline gets them too.
    configure_device(device, cfg.tf32, cfg.threads)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the CUDA events record on the current device's stream
    out = Path(cfg.out).expanduser() if cfg.out else None
    load_before = os.getloadavg()
    rows = build_rows(cfg, device)
    time_rows(cfg, rows, device)
    profiles = {}
    if cfg.profile:
        for row in rows:
            if row.status == "ok":
                profiles[row.mode] = profile_row(row, cfg, device)
        print()
    load_after = os.getloadavg()
    summary = summarize(cfg, rows, device)
    for d in summary:
        if d["mode"] in profiles:
            d["profile"] = profiles[d["mode"]]
    compile_default, graph_default = pick_modes(device, None, None)
    default_mode = {v: k for k, v in MODES.items()}[(compile_default, graph_default)]
    ours = [d for d in summary if d["status"] == "ok" and d["mode"] != "baseline"]
    result = {
        "settings": OmegaConf.to_container(cfg, resolve=True),
        "machine": machine_info(device),
        "load_before": list(load_before), "load_after": list(load_after),
        "default_mode": default_mode,
        "fastest_mode": min(ours, key=lambda d: d["s_per_epoch"])["mode"] if ours else None,
        "rows": summary,
    }
    print(format_table(result))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        bench(cfg)
    except UserError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
