"""Where do subnormal floats come from while training the default model on a CPU?

    python scripts/find_subnormals.py                      # 2 epochs, a census every 100 steps, then timings
    python scripts/find_subnormals.py --epochs 3 --every 50 --data-root /path/to/data
    python scripts/find_subnormals.py --epochs 0 --no-timing   # only the dataset's always-zero pixels

A float32 x is subnormal when 0 < |x| < torch.finfo(torch.float32).tiny (1.18e-38). x86 CPUs handle such
values in slow microcode unless flush-to-zero / denormals-are-zero is on (`torch.set_flush_denormal(True)`).

The script builds the default model and training exactly as train.py does (configs/config.yaml composed by
Hydra: batch 100, Adam lr 1e-3 (fused, vae.core.optim.make_optimizer), 30 x 10 latents, soft Gumbel-softmax,
tau from vae.core.schedule.tau_for, the seeded streams of vae.training.engine.make_generators, one randperm per epoch,
vae.training.engine.TrainStep in eager mode), trains, and every K steps counts subnormals in

* every parameter, its gradient (of the step just taken) and Adam's exp_avg / exp_avg_sq;
* every layer's output ("act") and the gradient the backward pass sends into that output ("dact"), recorded
  with forward hooks + tensor hooks on the next real training step (observing only: nothing is changed);
* every ATen op run in that step (forward, backward and the fused Adam update), recorded with a
  TorchDispatchMode: which op produced subnormals, and how many.

For the 2-D weights it says which rows / columns hold them; the first encoder Linear's columns and the last
decoder Linear's rows are pixels, compared with the pixels that are 0 in every training image.

After training it explains them: which ReLU units are dead (0 on every training image), how each subnormal
Adam moment splits into dead rows / dead columns / always-0 or rare pixels / other, the values in units of the
smallest float32, and the fused Adam kernel run on a zero gradient (exp_avg stops decaying at 4 x 2^-149).

Then it times, with and without torch.set_flush_denormal(True): training continued from the live state in
alternating blocks; one step from the fresh and from the late state (cases interleaved, 3 rounds); Adam's
update alone inside those steps; and a torch.profiler table of ~20 steps per case (top ops by self CPU time)
plus the per-op difference, late state, flush off vs on. Timers use this thread's CPU time by default
(--clock wall for wall time): on a busy shared machine that is far steadier.

    python scripts/find_subnormals.py --from-checkpoint outputs/<date>/<time>/checkpoints/last.pt

skips training and does the census, the explanation and the timings on the state train.py saved.
Findings for this repository: docs/denormals.md.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's vae package, not whichever one is installed

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from vae.data import load_splits  # noqa: E402
from vae.data.device_data import make_splits  # noqa: E402
from vae.core.optim import make_optimizer  # noqa: E402
from vae.training.engine import TrainStep, make_generators  # noqa: E402
from vae.core.model import CategoricalVAE  # noqa: E402
from vae.core.schedule import tau_for  # noqa: E402

TINY = torch.finfo(torch.float32).tiny
# The step timers: CPU time of this thread by default, which a busy shared machine disturbs far less than
# wall-clock time (with threads=1 a step runs on this thread alone); --clock wall for wall-clock time.
CLOCK = [time.thread_time]


def subnormal_mask(t: torch.Tensor) -> torch.Tensor:
    a = t.detach().abs()
    return (a > 0) & (a < torch.finfo(t.dtype).tiny)


def n_sub(t) -> int:
    if not torch.is_tensor(t) or not t.is_floating_point() or t.numel() == 0:
        return 0
    return int(subnormal_mask(t).sum())


def compose_config(args):
    from hydra import compose, initialize_config_dir
    from vae.settings.config import CONFIG_DIR
    overrides = ["device=cpu", f"threads={args.threads}", f"seed={args.seed}"] + list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# --- the census ---------------------------------------------------------------------------------------------

def layer_names(model):
    """Readable names of the modules whose outputs are recorded."""
    names = {}
    for prefix, seq in (("enc", model.encoder), ("dec", model.decoder)):
        for i, m in enumerate(seq):
            names[m] = f"{prefix}.{i}:{type(m).__name__}"
    return names


class Recorder(TorchDispatchMode):
    """Counts subnormals in every op's outputs (and the arguments a mutating op wrote, e.g. fused Adam's)."""

    def __init__(self):
        super().__init__()
        self.counts = defaultdict(lambda: [0, 0])  # op -> [calls with subnormals, subnormal values]
        self.calls = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        self.calls[name] += 1
        written = []
        schema = func._schema
        flat_args = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
        for a, v in zip(schema.arguments, flat_args):
            if a.alias_info is not None and a.alias_info.is_write:
                written.extend(x for x in tree_flatten(v)[0] if torch.is_tensor(x))
        outs = [x for x in tree_flatten(out)[0] if torch.is_tensor(x)]
        n = sum(n_sub(t) for t in outs + written)
        if n:
            c = self.counts[name]
            c[0] += 1
            c[1] += n
        return out


def rows_cols(mask: torch.Tensor):
    """For a 2-D mask: rows with any True, columns with any True."""
    return mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()


def pixel_note(idx: torch.Tensor, dead: torch.Tensor, rare: torch.Tensor) -> str:
    """How many of these pixel indices are always 0 in training images / non-zero in < 0.1 % of them."""
    if idx.numel() == 0:
        return ""
    d = int(dead[idx].sum())
    r = int(rare[idx].sum())
    return f"{idx.numel()} px: {d} always-0, {r} rare(<60 imgs), {idx.numel() - d - r} other"


def census(model, optimizer, dead, rare, pixel_axes):
    """{name: count} over parameters, gradients and Adam state, plus the detail lines for 2-D tensors."""
    counts, details = {}, {}
    for pname, p in model.named_parameters():
        tensors = {"w": p, "grad": p.grad}
        st = optimizer.state.get(p, {})
        tensors["exp_avg"] = st.get("exp_avg")
        tensors["exp_avg_sq"] = st.get("exp_avg_sq")
        if p.grad is not None:
            # Adam's exp_avg_sq update computes (1 - beta2) * grad^2: subnormal inside the kernel (not in any
            # tensor) when 0 < |grad| < sqrt(tiny / (1 - beta2)) = 3.4e-18.
            beta2 = optimizer.param_groups[0]["betas"][1]
            a = p.grad.abs()
            counts[(pname, "tiny grad")] = int(((a > 0) & (a < (TINY / (1 - beta2)) ** 0.5)).sum())
        for kind, t in tensors.items():
            if t is None:
                continue
            m = subnormal_mask(t)
            n = int(m.sum())
            counts[(pname, kind)] = n
            if n and pname in pixel_axes:
                axis = pixel_axes[pname]
                if t.dim() == 2:
                    r, c = rows_cols(m)
                    pix = c if axis == 1 else r
                    other = r if axis == 1 else c
                    details[(pname, kind)] = (f"{pixel_note(pix, dead, rare)}; "
                                              f"{other.numel()} of {t.shape[1 - axis]} units")
                else:
                    details[(pname, kind)] = pixel_note(m.nonzero().flatten(), dead, rare)
            elif n and t.dim() == 2:
                r, c = rows_cols(m)
                details[(pname, kind)] = f"{r.numel()}/{t.shape[0]} rows, {c.numel()}/{t.shape[1]} cols"
    return counts, details


def probe_step(model, train_step, idx, tau_t, names):
    """Run the real next training step with hooks on: per-layer act / dact counts, per-op counts."""
    acts, dacts, handles = {}, {}, []

    def fwd_hook(module, inputs, output):
        name = names[module]
        acts[name] = n_sub(output)
        if module is model.decoder[0]:
            acts["dec.0:input z"] = n_sub(inputs[0])
            acts["min z (not a count)"] = float(inputs[0].detach().min())
        if module is model.decoder[4]:
            # Bernoulli logits: below about -87.3, sigmoid (BCE's gradient) and exp(-|l|) inside
            # log-sigmoid become subnormal.
            acts["min x_logit (not a count)"] = float(output.detach().min())
        if output.requires_grad:
            def grad_hook(g, name=name):
                dacts[name] = n_sub(g)
            output.register_hook(grad_hook)

    for m in names:
        handles.append(m.register_forward_hook(fwd_hook))
    rec = Recorder()
    try:
        with rec:
            stats = train_step(idx, tau_t)
    finally:
        for h in handles:
            h.remove()
    return stats, acts, dacts, rec


def dead_and_rare_pixels(train_images):
    x = train_images.reshape(-1, 28 * 28)
    nonzero_imgs = (x != 0).sum(0)
    dead = nonzero_imgs == 0
    rare = (nonzero_imgs > 0) & (nonzero_imgs < 60)
    return dead, rare, nonzero_imgs


# --- why: dead ReLU units, rare pixels, and a geometric decay that never reaches zero --------------------------

ULP = 2.0 ** -149  # the smallest positive float32 (a subnormal)


@torch.no_grad()
def unit_activity(model, split, tau, seed=0, batch=1000):
    """Per ReLU layer: on how many training images each unit is > 0 (fresh noise from its own generator)."""
    gen = torch.Generator().manual_seed(seed)
    relus = {"enc.1": model.encoder[1], "enc.3": model.encoder[3], "dec.1": model.decoder[1], "dec.3": model.decoder[3]}
    counts = {k: None for k in relus}
    handles = []
    for k, m in relus.items():
        def hook(module, inputs, output, k=k):
            c = (output > 0).flatten(0, -2).sum(0)
            counts[k] = c if counts[k] is None else counts[k] + c
        handles.append(m.register_forward_hook(hook))
    try:
        from vae.core.gumbel import gumbel_softmax
        for x in split.batches(batch):
            logits = model.encode(x)
            model.decode(gumbel_softmax(logits, tau, generator=gen))
    finally:
        for h in handles:
            h.remove()
    return counts


def explain(model, optimizer, split, tau, dead_px, rare_px):
    """Attribute each subnormal exp_avg entry to: a dead output unit (row), a dead input (column: a dead unit
    of the layer below, a pixel that is 0 in every / almost every training image), or neither."""
    act = unit_activity(model, split, tau)
    dead = {k: v == 0 for k, v in act.items()}
    print(f"\n== why: ReLU units that are 0 on all {split.n} training images now (dead), per layer ==")
    for k, d in dead.items():
        print(f"  {k}: {int(d.sum())} of {d.numel()} units dead")
    # (rows = output units, cols = inputs) for each Linear: which mask applies.
    layout = {
        "encoder.0": (dead["enc.1"], None), "encoder.2": (dead["enc.3"], dead["enc.1"]),
        "encoder.4": (None, dead["enc.3"]), "decoder.0": (dead["dec.1"], None),
        "decoder.2": (dead["dec.3"], dead["dec.1"]), "decoder.4": (None, dead["dec.3"]),
    }
    print("\n-- subnormal exp_avg entries by cause (a cause earlier in the line wins) --")
    print(f"  {'tensor':18s} {'subnormal':>9s} {'dead row':>9s} {'dead col':>9s} {'0-pixel':>8s} {'rare px':>8s} "
          f"{'other':>7s}")
    total = defaultdict(int)
    for name, (row_dead, col_dead) in layout.items():
        for suffix in ("weight", "bias"):
            p = dict(model.named_parameters())[f"{name}.{suffix}"]
            m = subnormal_mask(optimizer.state[p]["exp_avg"])
            n = int(m.sum())
            if n == 0:
                continue
            if suffix == "bias":
                m = m[:, None]
            rows = row_dead[:, None].expand_as(m) if row_dead is not None else torch.zeros_like(m)
            if suffix == "weight" and col_dead is not None:
                cols = col_dead[None, :].expand_as(m)
            else:
                cols = torch.zeros_like(m)
            zero_px = torch.zeros_like(m)
            rare = torch.zeros_like(m)
            if name == "encoder.0" and suffix == "weight":
                zero_px, rare = dead_px[None, :].expand_as(m), rare_px[None, :].expand_as(m)
            left = m.clone()
            parts = []
            for mask in (rows, cols, zero_px, rare):
                c = int((left & mask).sum())
                parts.append(c)
                left &= ~mask
            parts.append(int(left.sum()))
            for key, c in zip(("n", "row", "col", "zero", "rare", "other"), [n] + parts):
                total[key] += c
            print(f"  {name + '.' + suffix:18s} {n:9d} " + " ".join(f"{c:9d}" if i < 2 else f"{c:8d}"
                                                                   for i, c in enumerate(parts[:-1]))
                  + f" {parts[-1]:7d}")
    print(f"  {'all':18s} {total['n']:9d} {total['row']:9d} {total['col']:9d} {total['zero']:8d} {total['rare']:8d} "
          f"{total['other']:7d}")

    vals = torch.cat([optimizer.state[p]["exp_avg"].flatten() for p in model.parameters()
                      if p in optimizer.state])
    sub = vals[subnormal_mask(vals)].abs().double() / ULP
    if sub.numel():
        edges = [1, 2, 3, 4, 5, 100, 2 ** 23]
        h = [int(((sub >= lo) & (sub < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:])]
        print(f"\n-- the subnormal exp_avg values in units of the smallest float32 (2^-149 = 1.4e-45) --")
        print("  " + "  ".join(f"{lo}{'' if hi == lo + 1 else '..' + str(hi - 1)} ulp: {c}"
                              for lo, hi, c in zip(edges[:-1], edges[1:], h)))
    # exp_avg of a weight whose gradient is 0 is multiplied by beta1 = 0.9 each step; rounded to nearest,
    # 0.9 * k ulp == k ulp for k <= 4 (5 -> 4.5 rounds to even 4): the decay stops short of zero, for good.
    p = torch.full((7,), 0.01, requires_grad=True)  # a typical weight size
    p.grad = torch.zeros(7)
    opt = torch.optim.Adam([p], lr=1e-3, fused=True)
    opt.step()
    start = torch.tensor([1.0e-3, 1e-30, 1e-38, 20 * ULP, 5 * ULP, 4 * ULP, ULP])
    opt.state[p]["exp_avg"].copy_(start)
    opt.state[p]["exp_avg_sq"].fill_(1e-8)
    steps = 0
    trace = []
    for t in (100, 700, 800, 900, 1000, 5000):
        while steps < t:
            opt.step()
            steps += 1
        trace.append((t, opt.state[p]["exp_avg"].clone()))
    print("\n-- fused Adam, gradient exactly 0: exp_avg after t steps (starting values in the first column) --")
    print("  start      " + "".join(f"{'t=' + str(t):>11s}" for t, _ in trace))
    for i, s in enumerate(start.tolist()):
        print(f"  {s:9.3g}  " + "".join(f"{v[i].item():11.3g}" for _, v in trace))
    print(f"  the weight (0.01) of an entry that started subnormal moved: {bool((p[2:] != 0.01).any())}")


def time_adam(model, optimizer, train_step, snaps, batches, tau_t, rounds=3):
    """Adam's update alone, timed inside real consecutive training steps, per state, flush off/on; the cases
    are interleaved over `rounds` rounds and each reports the median over all its steps."""
    out = defaultdict(list)
    original = train_step.optimizer_step
    for _ in range(rounds):
        for label, snap in snaps:
            for flush in (False, True):
                ts = out[(label, flush)]

                def timed_step(ts=ts):
                    t0 = CLOCK[0]()
                    original()
                    ts.append(CLOCK[0]() - t0)

                restore(model, optimizer, snap)
                train_step.optimizer_step = timed_step
                torch.set_flush_denormal(flush)
                try:
                    for idx in batches:
                        train_step(idx, tau_t)
                finally:
                    torch.set_flush_denormal(False)
                    train_step.optimizer_step = original
    restore(model, optimizer, snaps[-1][1])
    return {k: statistics.median(v) * 1e3 for k, v in out.items()}

# --- timing -------------------------------------------------------------------------------------------------

def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def restore(model, optimizer, snap):
    model.load_state_dict(snap[0])  # copies into the parameters
    # Optimizer.load_state_dict keeps the given state tensors (a shallow copy): without this deepcopy the
    # steps timed next would change the snapshot itself (a flushed run would zero its subnormals for good).
    optimizer.load_state_dict(copy.deepcopy(snap[1]))


def time_steps(model, optimizer, train_step, snap, batches, tau_t, flush):
    """Median seconds per step over `batches`, starting from `snap`; the state is restored after."""
    restore(model, optimizer, snap)
    torch.set_flush_denormal(flush)
    try:
        ts = []
        for idx in batches:
            t0 = CLOCK[0]()
            train_step(idx, tau_t)
            ts.append(CLOCK[0]() - t0)
    finally:
        torch.set_flush_denormal(False)
        restore(model, optimizer, snap)
    return statistics.median(ts)


def profile_steps(model, optimizer, train_step, snap, batches, tau_t, flush, top):
    from torch.profiler import ProfilerActivity, profile
    restore(model, optimizer, snap)
    torch.set_flush_denormal(flush)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for idx in batches:
                train_step(idx, tau_t)
    finally:
        torch.set_flush_denormal(False)
        restore(model, optimizer, snap)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows)
    return [(e.key, e.count, e.self_cpu_time_total / len(batches) / 1e3) for e in rows[:top]], total / len(batches) / 1e3


# --- main ---------------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2, help="epochs to train (default 2)")
    ap.add_argument("--every", type=int, default=100, help="census every K steps (default 100)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-root", default=None, help="data.root (default: the config's, <repo>/data)")
    ap.add_argument("--timing-steps", type=int, default=40, help="steps timed per (state, flush) case")
    ap.add_argument("--profile-steps", type=int, default=20, help="steps profiled per case (0: no profile)")
    ap.add_argument("--top", type=int, default=8, help="ops shown per profile")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="step timers: this thread's CPU time (default; robust on a busy machine) or wall time")
    ap.add_argument("--from-checkpoint", default=None,
                    help="skip training: load model + Adam state from a train.py checkpoint (e.g. "
                         "outputs/<date>/<time>/checkpoints/last.pt), then census, causes and timings")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides of configs/config.yaml (e.g. lr=3e-4)")
    args = ap.parse_args()

    cfg = compose_config(args)
    CLOCK[0] = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(False)
    device = torch.device("cpu")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {cfg.batch_size}, lr {cfg.lr}, "
          f"{cfg.latent_dim}x{cfg.categorical_dim} latents, hard={cfg.hard}, prior={cfg.prior}, "
          f"binarize={cfg.data.binarize}")

    (train_images, _), (test_images, _) = load_splits(cfg.data, ("train", "test"))
    train_split, test_split, _ = make_splits(train_images, test_images, device, cfg.data.binarize,
                                          cfg.data.binarize_seed)
    dead, rare, nz = dead_and_rare_pixels(train_images)
    test_dead = (test_images.reshape(-1, 784) != 0).sum(0) == 0
    print(f"pixels 0 in all {train_split.n} training images: {int(dead.sum())} of 784 "
          f"(also 0 in every test image: {int((dead & test_dead).sum())}); "
          f"non-zero in 1..59 images (rare): {int(rare.sum())}")
    steps_per_epoch = train_split.n // cfg.batch_size

    torch.manual_seed(cfg.seed)
    model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim, cfg.prior).to(device)
    gens = make_generators(cfg.seed, device)
    optimizer = make_optimizer(model, cfg.lr, device, False, False)
    train_step = TrainStep(model, optimizer, train_split, batch_size=cfg.batch_size, hard=cfg.hard,
                           noise_generator=gens["noise"],
                           binarize_generator=gens["binarize"] if cfg.data.binarize == "dynamic" else None,
                           compile=False, cuda_graph=False)
    print(f"optimizer: {type(optimizer).__name__} fused={optimizer.defaults.get('fused')} "
          f"betas={optimizer.defaults['betas']} eps={optimizer.defaults['eps']}")
    names = layer_names(model)
    # Which axis of each tensor is the pixel axis.
    pixel_axes = {"encoder.0.weight": 1, "decoder.4.weight": 0, "decoder.4.bias": 0}
    fresh = snapshot(model, optimizer)

    tau = tau_for(cfg, 0)
    tau_t = torch.tensor(tau)
    step = 0
    history = []  # (step, counts, details, acts, dacts, ops, loss)
    shuffle_state = gens["shuffle"].get_state()
    t_epochs = []
    if args.from_checkpoint:
        ck = torch.load(args.from_checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        step = ck["step"]
        tau = tau_for(cfg, step)
        tau_t.fill_(tau)
        print(f"loaded {args.from_checkpoint}: step {step}, tau {tau:.4f} (no training)")
    for epoch in range(0 if args.from_checkpoint else args.epochs):
        gens["shuffle"].set_state(shuffle_state)
        perm = torch.randperm(train_split.n, generator=gens["shuffle"], device=device)
        t0, c0 = time.perf_counter(), time.thread_time()
        probe_time = probe_cpu = 0.0
        for epoch_step in range(steps_per_epoch):
            new_tau = tau_for(cfg, step)
            if new_tau != tau:
                tau = new_tau
                tau_t.fill_(tau)
            idx = perm[epoch_step * cfg.batch_size:(epoch_step + 1) * cfg.batch_size]
            # The probe runs on a real step (the one after every K-th), so the gradients it sees are this step's.
            if step % args.every == 0:
                tp, cp = time.perf_counter(), time.thread_time()
                stats, acts, dacts, rec = probe_step(model, train_step, idx, tau_t, names)
                counts, details = census(model, optimizer, dead, rare, pixel_axes)
                history.append((step + 1, counts, details, acts, dacts, dict(rec.counts), float(stats[0])))
                probe_time += time.perf_counter() - tp
                probe_cpu += time.thread_time() - cp
            else:
                stats = train_step(idx, tau_t)
            step += 1
        shuffle_state = gens["shuffle"].get_state()
        t_epochs.append(time.perf_counter() - t0 - probe_time)
        cpu = time.thread_time() - c0 - probe_cpu
        print(f"epoch {epoch + 1}: {t_epochs[-1]:.1f} s wall, {cpu:.1f} s CPU of (unprobed) training steps, "
              f"last loss {float(stats[0]):.2f}")
    # A final census after the last step.
    counts, details = census(model, optimizer, dead, rare, pixel_axes)

    print_tables(history, model, args)
    if history or args.from_checkpoint:
        print(f"\nafter step {step} (end of training): subnormals held in the state")
        for (pname, kind), n in counts.items():
            if n:
                print(f"  {pname:18s} {kind:10s} {n:7d}  {details.get((pname, kind), '')}")

    explain_exp_avg(model, optimizer, dead, rare, nz, pixel_axes)
    if step:
        explain(model, optimizer, train_split, tau_t, dead, rare)

    if args.no_timing or step == 0:
        return
    late = snapshot(model, optimizer)
    # First, the live state: keep training (as train.py would) in blocks of steps, flush off / on alternating.
    print(f"\n== live ({args.clock} time): training continued from step {step}, blocks of {args.timing_steps} "
          f"steps, flush alternating ==")
    for block in range(4):
        flush = bool(block % 2)
        torch.set_flush_denormal(flush)
        perm = torch.randperm(train_split.n, generator=gens["shuffle"])
        ts = []
        for i in range(args.timing_steps):
            t0 = CLOCK[0]()
            train_step(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size], tau_t)
            ts.append(CLOCK[0]() - t0)
        torch.set_flush_denormal(False)
        print(f"  block {block + 1}: flush_denormal={str(flush):5s} median {statistics.median(ts) * 1e3:6.2f} ms/step, "
              f"mean {statistics.mean(ts) * 1e3:6.2f}")
    restore(model, optimizer, late)
    g = torch.Generator().manual_seed(123)
    batches = [torch.randperm(train_split.n, generator=g)[:cfg.batch_size] for _ in range(args.timing_steps)]
    print(f"\n== one training step ({args.clock} time), median of {args.timing_steps} (each case starts from the "
          f"same saved state; cases interleaved, 3 rounds) ==")
    cases = [("fresh model", fresh, False), ("fresh model", fresh, True),
             (f"after {step} steps", late, False), (f"after {step} steps", late, True)]
    # Warm-up, then round-robin so that a change in machine load hits every case alike.
    time_steps(model, optimizer, train_step, fresh, batches[:5], tau_t, False)
    results = defaultdict(list)
    for _ in range(3):
        for label, snap, flush in cases:
            results[(label, flush)].append(time_steps(model, optimizer, train_step, snap, batches, tau_t, flush))
    base = None
    for label, snap, flush in cases:
        ms = statistics.median(results[(label, flush)]) * 1e3
        base = ms if base is None else base
        print(f"  {label:18s} flush_denormal={str(flush):5s}  {ms:6.2f} ms/step  ({ms / base:.2f}x the fresh step; "
              f"x600 = {ms * 0.6:.1f} s/epoch)")
    adam = time_adam(model, optimizer, train_step, [("fresh model", fresh), (f"after {step} steps", late)],
                     batches, tau_t)
    print(f"\n-- Adam's update alone ({args.clock} time of optimizer.step() inside the same steps; median of "
          f"{len(batches)} x 3 rounds) --")
    for (label, flush), ms in adam.items():
        print(f"  {label:18s} flush_denormal={str(flush):5s}  {ms:6.3f} ms")
    if args.profile_steps:
        pb = batches[:args.profile_steps]
        for label, snap, flush in cases:
            rows, total = profile_steps(model, optimizer, train_step, snap, pb, tau_t, flush, args.top)
            print(f"\n-- profile: {label}, flush_denormal={flush}: {total:.2f} ms/step of self CPU time; "
                  f"top ops (ms per step) --")
            for key, count, ms in rows:
                print(f"  {key:42s} {ms:7.3f}  ({count // len(pb)} calls/step)")
        # Which op gets slower: per-op self CPU time, late state without vs with flush, each the median of
        # 3 interleaved profiles (a busy shared machine adds noise to every op alike).
        print(f"\n-- which ops slow down: self CPU ms/step after {step} steps, flush off vs on "
              f"(median of 3 interleaved profiles of {len(pb)} steps) --")
        runs = {False: [], True: []}
        for _ in range(3):
            for flush in (False, True):
                rows, _ = profile_steps(model, optimizer, train_step, late, pb, tau_t, flush, 200)
                runs[flush].append({k: ms for k, _, ms in rows})
        med = {f: {k: statistics.median(r.get(k, 0.0) for r in runs[f]) for k in set().union(*runs[f])}
               for f in runs}
        diffs = sorted(((med[False].get(k, 0) - med[True].get(k, 0), k) for k in set(med[False]) | set(med[True])),
                       reverse=True)
        for d, k in diffs[:args.top]:
            print(f"  {k:42s} {med[False].get(k, 0):7.3f} vs {med[True].get(k, 0):7.3f}  ({d:+.3f})")


def print_tables(history, model, args):
    if not history:
        return
    steps = [h[0] for h in history]
    # Show at most ~12 columns, evenly spaced.
    pick = sorted(set(range(0, len(history), max(1, len(history) // 12))) | {len(history) - 1})
    hdr = "".join(f"{history[i][0]:>8d}" for i in pick)

    print(f"\n== subnormal values over training (column = the step probed; census every {args.every} steps) ==")
    print(f"{'loss':30s}" + "".join(f"{history[i][6]:8.1f}" for i in pick))
    print(f"{'tensor':30s}{hdr}")
    keys = [k for k in history[-1][1]]
    shown = False
    for key in keys:
        vals = [history[i][1].get(key, 0) for i in pick]
        if any(h[1].get(key, 0) for h in history):
            shown = True
            print(f"{key[0] + ' ' + key[1]:30s}" + "".join(f"{v:8d}" for v in vals))
    if not shown:
        print("  (no parameter, gradient or Adam state tensor held a subnormal)")
    kinds = sorted({k[1] for k in keys})
    never = [kd for kd in kinds if not any(h[1].get(k, 0) for h in history for k in keys if k[1] == kd)]
    print(f"(rows listed only where some census found one; always 0 for every tensor: {', '.join(never) or 'none'};"
          f" 'tiny grad' = gradients whose (1 - beta2) * grad^2 inside Adam is subnormal)")

    print(f"\n-- activations (act) and the gradients flowing into them (dact), on the probed step --")
    print(f"{'layer output':30s}{hdr}")
    layer_keys = list(history[-1][3].keys())
    for name in layer_keys:
        if "not a count" in name:
            vals = [history[i][3].get(name, 0) for i in pick]
            print(f"{name.replace(' (not a count)', ''):30s}" + "".join(f"{v:8.2g}" for v in vals))
            continue
        for label, col in (("act", 3), ("dact", 4)):
            vals = [history[i][col].get(name, 0) for i in pick]
            if any(h[col].get(name, 0) for h in history):
                print(f"{label + ' ' + name:30s}" + "".join(f"{v:8d}" for v in vals))
    print("(act/dact rows are listed only where some probe found a subnormal)")

    print(f"\n-- ATen ops whose outputs (or in-place writes) held subnormals: values per probed step --")
    ops = sorted({op for h in history for op in h[5]})
    print(f"{'op':30s}{hdr}")
    for op in ops:
        vals = [history[i][5].get(op, [0, 0])[1] for i in pick]
        print(f"{op:30s}" + "".join(f"{v:8d}" for v in vals))

    print(f"\n-- where (last probe, step {history[-1][0]}) --")
    for key, d in history[-1][2].items():
        print(f"  {key[0]:18s} {key[1]:10s} {d}")


def explain_exp_avg(model, optimizer, dead, rare, nz, pixel_axes):
    """For encoder.0: is exp_avg subnormal because the gradient was exactly 0 for a long time?"""
    p = model.encoder[0].weight
    st = optimizer.state.get(p)
    if not st:
        return
    m, v = st["exp_avg"], st["exp_avg_sq"]
    g = p.grad  # None when the state was loaded from a checkpoint
    print("\n-- encoder.0 (columns = pixels): gradient, exp_avg, exp_avg_sq per pixel class --")
    for label, cols in (("always-0 pixels", dead), ("rare pixels", rare), ("other pixels", ~dead & ~rare)):
        if cols.sum() == 0:
            continue
        sub = lambda t: int(subnormal_mask(t[:, cols]).sum())  # noqa: E731
        zero = lambda t: int((t[:, cols] == 0).sum())  # noqa: E731
        n = int(cols.sum()) * p.shape[0]
        gtxt = "grad n/a" if p.grad is None else f"grad ==0 {zero(g):6d} sub {sub(g):5d}"
        print(f"  {label:16s} ({int(cols.sum()):3d} px, {n:6d} values): {gtxt} | "
              f"exp_avg ==0 {zero(m):6d} sub {sub(m):5d} | exp_avg_sq ==0 {zero(v):6d} sub {sub(v):5d}")


if __name__ == "__main__":
    main()
