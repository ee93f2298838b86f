"""Training speed on one device: the trainer's own loop in each fast mode against a textbook port, in one run.

    python -m vae.bench                                   # every mode this device has, 3 epochs timed per mode
    python -m vae.bench epochs=0.1                        # time a tenth of an epoch per mode and extrapolate
    python -m vae.bench device=cuda modes=[eager,compile+cuda_graph] out=bench-h100.json
    python -m vae.bench threads=1 adam=fused profile=true

Settings: configs/bench.yaml (schema `BenchConfig`, which extends the trainer's `Config`). Rows: our trainer
(`vae.training.trainer.Trainer.train_steps`, the loop train.py runs, in each mode: eager, compile, cuda_graph,
compile+cuda_graph) and `baseline`, the usual port (torchvision MNIST + ToTensor + DataLoader, a `loss.item()` per
step) feeding the same model and loss. Timed steps are split into `rounds` blocks run round-robin across the rows,
so machine load hits every row alike; each row reports the median rate and its last block's rate over its first
(a slowdown that appears only as training goes on shows there). docs/speed.md explains every column and the
measured figures.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vae.common.atomic import atomic_write_text
from vae.tools.bench_config import MODES, validate  # the schema (registered there) and its checks
from vae.settings.checks import check_output_file, resolve_device
from vae.settings.config import CONFIG_DIR
from vae.common.errors import UserError, describe, entry_point
from vae.tools.machine import machine_info

log = logging.getLogger("vae.bench")

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

def adam_variant(name: str):
    """An optimizer factory with make_optimizer's signature for one Adam implementation, to measure it."""
    kwargs = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}[name]

    def factory(model, lr, device, cuda_graph, compile):
        return torch.optim.Adam(model.parameters(), lr=lr, **kwargs, **(dict(capturable=True) if cuda_graph else {}))

    return factory


class TrainerRun:
    """The trainer's loop over the training split in one mode; `run(n)` continues across epochs."""

    def __init__(self, cfg: DictConfig, split, device: torch.device, compile: bool, cuda_graph: bool):
        from vae.training.trainer import Trainer

        factory = None if cfg.adam == "trainer" else adam_variant(cfg.adam)
        self.trainer = Trainer(cfg, split, device, compile=compile, cuda_graph=cuda_graph, optimizer_factory=factory)
        self.trainer.build()
        if self.trainer.compile_error is not None:  # the trainer fell back to eager: no compiled row to measure
            raise self.trainer.compile_error
        self.steps_per_epoch = self.trainer.steps_per_epoch
        self.images_per_epoch = self.steps_per_epoch * cfg.batch_size

    def run(self, n: int) -> int:
        """n steps; returns the number of images trained on."""
        t, done = self.trainer, 0
        while done < n:
            if t.state.epoch_step == t.steps_per_epoch:
                t.finish_epoch()
            done += t.train_steps(n - done)
        return n * t.cfg.batch_size

    def loss(self) -> float:
        """Mean training loss over this epoch's steps so far (read after timing, for a sanity check)."""
        s = self.trainer.state
        return (s.epoch_sums[0] / max(s.epoch_step, 1)).item()


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
        from vae.data.device_data import DeviceSplit

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
            from vae.baseline import BaselineRun

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
            "last_over_first_block": rates[-1] / rates[0],
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
    lines += ["", "| mode | images/s | s/epoch | compile s | last/first block | speed-up vs baseline |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for d in result["rows"]:
        if d["status"] != "ok":
            lines.append(f"| {d['mode']} | {d['reason']} | | | | |")
            continue
        sp = f"{d['speedup_vs_baseline']:.2f}x" if d.get("speedup_vs_baseline") else "-"
        lines.append(f"| {d['mode']} | {d['images_per_s']:,.0f} | {d['s_per_epoch']:.2f} | {d['compile_s']:.1f} "
                     f"| {d['last_over_first_block']:.2f} | {sp} |")
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
    from vae.training.device import configure_device, pick_modes

    validate(cfg)
    device = resolve_device(cfg.device)
    # Threads and TF32 as train.py sets them; process-wide, so the baseline gets them too.
    configure_device(device, cfg.tf32, cfg.threads, cfg.flush_denormal)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # the CUDA events record on the current device's stream
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:
        check_output_file(out, "out")  # now, not after minutes of timing
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
    # What train.py's auto modes pick for a run of estimate_epochs epochs.
    per_epoch = next((d["steps_per_epoch"] for d in summary if d["status"] == "ok"), None)
    compile_default, graph_default = pick_modes(device, None, None, per_epoch and cfg.estimate_epochs * per_epoch,
                                                cfg.compile_min_steps)
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
    if out is not None:  # written before it is printed: a reader that leaves early (`| head`) costs nothing
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result, indent=2) + "\n", "benchmark results")
    print(format_table(result))
    if out is not None:
        print(f"wrote {out}")
    return result


@hydra.main(config_path=str(CONFIG_DIR), config_name="bench", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    from vae.settings.config_files import check_config_files

    check_config_files(__file__)  # a YAML named with --config-*: refused in one line, not Hydra's traceback or hang
    main()
