"""TensorBoard helpers: image grids and the HParams entry of a run."""
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams
from torchvision.utils import make_grid

# The settings shown as columns in TensorBoard's HParams tab: those that change what is learned.
HPARAM_KEYS = ("latent_dim", "categorical_dim", "prior", "hard", "temperature", "temp_min", "anneal_rate",
               "anneal_interval", "batch_size", "epochs", "lr", "seed", "data.name", "data.binarize")


def image_grid(x: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Flat images [B, 784] in [0, 1] -> one [3, H, W] grid."""
    return make_grid(x.detach().reshape(-1, 1, 28, 28).clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)


def log_hparams(writer, cfg: DictConfig, metrics: dict) -> None:
    """Write the run's hyper-parameters into its own event file, so that TensorBoard's HParams tab pairs them with
    the run's scalars named in `metrics` (SummaryWriter.add_hparams would open a separate sub-run instead)."""
    values = {k: OmegaConf.select(cfg, k) for k in HPARAM_KEYS}
    exp, ssi, sei = hparams(values, metrics)
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
