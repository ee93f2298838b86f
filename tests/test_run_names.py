"""A single run's directory names its overrides: outputs/<date>/<time>_<overrides>, short and without paths."""
import re

from hydra import compose, initialize_config_dir

from vae.settings.config import CONFIG_DIR, run_suffix


def run_dir(*overrides) -> str:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.run.dir


def test_run_dir_carries_the_overrides_but_no_paths():
    plain = run_dir()
    assert re.search(r"/outputs/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d$", plain), plain  # no trailing "_"
    named = run_dir("temperature=2.0", "hard=true", "data.root=/scratch/data", "device=cpu", "data=fashion_mnist")
    # Hydra sorts the overrides; paths and plumbing (data.root, device, ...) stay out of the name.
    assert re.search(r"/\d\d-\d\d-\d\d_data=fashion_mnist,hard=true,temperature=2.0$", named), named


def test_short_suffixes_are_the_overrides_themselves():
    assert run_suffix("") == ""
    assert run_suffix("hard=true") == "_hard=true"
    assert run_suffix("data.system_path=/usr/share/mnist") == "_data.system_path=-usr-share-mnist"  # no nesting


def test_long_suffixes_keep_whole_overrides_and_a_hash_of_all():
    long = "anneal_rate=1e-4,categorical_dim=5,data.sources=[local,registry],hard=true,latent_dim=20,temperature=2.0"
    suffix = run_suffix(long, max_len=64)
    assert len(suffix) <= 1 + 64
    # Whole overrides only: the comma inside the list value is no place to cut ("...,data.sources=[local" fits).
    assert re.fullmatch(r"_anneal_rate=1e-4,categorical_dim=5\+[0-9a-f]{8}", suffix), suffix
    assert run_suffix(long, max_len=75).startswith("_anneal_rate=1e-4,categorical_dim=5,data.sources=[local,registry]+")
    # Runs that differ only past the cut still get different directories; the same overrides the same name.
    assert run_suffix(long.replace("2.0", "3.0")) != suffix and run_suffix(long) == suffix
    # One override longer than the limit is cut inside.
    assert re.fullmatch(r"_x{55}\+[0-9a-f]{8}", run_suffix("x" * 100, max_len=64))


def test_a_long_command_line_gives_a_bounded_directory_name():
    name = run_dir("anneal_rate=1e-4", "categorical_dim=5", "latent_dim=20", "temp_min=0.3", "temperature=2.0",
                   "hard=true", "prior=learned", "lr=3e-4").rsplit("/", 1)[1]
    assert len(name) <= len("12-00-00_") + 64 and re.search(r"\+[0-9a-f]{8}$", name), name
