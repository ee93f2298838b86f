"""Event files for the dashboard screenshot (docs/dashboard.md) until train.py logs the latents itself.

    python scripts/dashboard_demo.py <logdir> [--epochs 10] [--train-images 60000] [--data-root <repo>/data]

Two short runs on MNIST (soft and hard=true samples, defaults otherwise) with a plain Adam loop built from the
project's pieces, writing every tag the trainer writes plus the new latents/* ones and train/grad_norm.
"""
import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.tensorboard import SummaryWriter

from vae import latents, metrics
from vae.config import Config, run_suffix
from vae.data import load_splits
from vae.device_data import make_splits
from vae.gumbel import gumbel_softmax, one_hot_argmax, sample_gumbel
from vae.loss import negative_elbo
from vae.model import CategoricalVAE
from vae.schedule import tau_for
from vae.tensorboard import image_grid, log_hparams


def run(cfg, logdir: Path, train_split, test_split, device) -> None:
    torch.manual_seed(cfg.seed)
    model = CategoricalVAE(cfg.latent_dim, cfg.categorical_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    writer = SummaryWriter(str(logdir))
    writer.add_custom_scalars(latents.custom_scalars_layout())
    recon_x = test_split.batch(torch.arange(8, device=device))
    prior_noise = sample_gumbel((64, cfg.latent_dim, cfg.categorical_dim), generator=gen, device=device)
    step, sums, grad_norms = 0, torch.zeros(3, device=device), torch.zeros((), device=device)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(train_split.n, generator=gen, device=device)
        for i in range(train_split.n // cfg.batch_size):
            tau = tau_for(cfg, step)
            x = train_split.batch(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
            logits = model.encode(x)
            z = gumbel_softmax(logits, tau, hard=cfg.hard, generator=gen)
            loss, bce, kl = (t.mean() for t in negative_elbo(model.decode(z), x, logits, model.log_prior()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norms += torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.encoder.parameters()]))
            opt.step()
            sums += torch.stack([loss, bce, kl]).detach()
            step += 1
            if step % cfg.log_interval == 0:
                for tag, value in zip(("loss", "bce", "kl"), (sums / cfg.log_interval).tolist()):
                    writer.add_scalar(f"train/{tag}", value, step)
                writer.add_scalar("train/temperature", tau, step)
                writer.add_scalar("train/grad_norm", (grad_norms / cfg.log_interval).item(), step)
                sums.zero_()
                grad_norms.zero_()
        test = metrics.evaluate_split(model, test_split, tau=tau, hard=cfg.hard,
                                      generator=torch.Generator(device=device).manual_seed(0), batch_size=1000)
        for name, value in test.items():
            writer.add_scalar(f"test/{name}", value, step)
        with torch.no_grad():
            recon = torch.sigmoid(model.decode(one_hot_argmax(model.encode(recon_x))))
            writer.add_image("test/reconstructions", image_grid(torch.cat([recon_x, recon]), nrow=8), step)
            codes = one_hot_argmax(model.log_prior() + prior_noise)
            writer.add_image("samples/prior", image_grid(torch.sigmoid(model.decode(codes))), step)
        t0 = time.perf_counter()
        stats = latents.code_usage(model, test_split, batch_size=1000)
        seconds = time.perf_counter() - t0
        latents.log_latents(writer, stats, latents.traversal_grid(model, recon_x[0], stats["kl_per_variable"]),
                            step)
        print(f"{logdir.name} epoch {epoch + 1}: test loss {test['loss']:.2f} | active {stats['active']} | "
              f"perplexity {stats['perplexity_mean']:.2f} | confidence {stats['confidence']:.3f} | "
              f"code_usage {seconds * 1e3:.1f} ms", flush=True)
    iw = metrics.iw_bound(model, test_split, k=100, chunk=100, batch_size=1000,
                          generator=torch.Generator(device=device).manual_seed(0))
    writer.add_scalar("test/iw_bound", iw, step)
    log_hparams(writer, cfg, {"test/loss": test["loss"], "test/elbo_discrete": test["elbo_discrete"]})
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-images", type=int, default=60000, help="the first n training images (faster on a CPU)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = {"download": False, "sources": ["local"], **({"root": args.data_root} if args.data_root else {})}
    base = OmegaConf.merge(OmegaConf.structured(Config), {"epochs": args.epochs, "data": data})
    (train_images, _), (test_images, _) = load_splits(base.data, ("train", "test"))
    train_split, test_split = make_splits(train_images[:args.train_images], test_images, device, "none", 0)
    stamp = time.strftime("%H-%M-%S")
    for overrides in ("", "hard=true"):
        cfg = OmegaConf.merge(base, dict(o.split("=") for o in overrides.split(",") if o))
        run(cfg, args.logdir / time.strftime("%Y-%m-%d") / (stamp + run_suffix(overrides)), train_split, test_split, device)
    print("device:", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")


if __name__ == "__main__":
    main()
