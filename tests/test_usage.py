"""`python train.py --help`: our own page, derived from the config and the commands, so that it cannot drift from
them; `--hydra-help` stays Hydra's."""
from __future__ import annotations

import pytest
from omegaconf import DictConfig

from support import compose_train, run_train
from vae.settings.usage import commands, first_sentence, help_page, read_groups, read_settings
from vae.settings.config import CONFIG_DIR

# The commands the page must name (more may come: the list is found, not kept).
COMMANDS = ("vae.evaluate", "vae.gradients", "vae.sweep", "vae.bench", "vae.study", "vae.data", "vae.baseline")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_is_our_page(flag):
    proc = run_train([flag], timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = proc.stdout
    for needle in ("temperature=1.0", "estimator=gumbel", "gradient estimator", "== Config groups", "data=mnist",
                   "experiment=null", "== Other commands", "--hydra-help"):
        assert needle in page, needle
    for name in COMMANDS:
        assert f"python -m {name} " in page, name
    assert "Powered by Hydra" not in page


def test_help_shows_the_values_of_the_overrides_given_with_it():
    proc = run_train(["experiment=paper", "--help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "latent_dim=20 " in proc.stdout and "experiment=paper " in proc.stdout


def test_hydra_help_stays_hydras():
    proc = run_train(["--hydra-help"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "== Flags ==" in proc.stdout and "Hydra (" in proc.stdout


def test_every_setting_is_on_the_page_with_its_meaning():
    """A key added to the schema and config.yaml without a comment saying what it does fails here."""
    cfg = compose_train()
    page = help_page(cfg)
    settings = {s.key: s for section in read_settings((CONFIG_DIR / "config.yaml").read_text())
                for s in section.settings}
    groups = {g for g, _, _ in read_groups((CONFIG_DIR / "config.yaml").read_text())}

    def leaves(node: DictConfig, prefix=""):
        for key in node:
            value = node[key]
            if isinstance(value, DictConfig):
                if key not in groups:  # a group's keys are its files' business
                    yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    expected = [k for k in leaves(DictConfig({k: cfg[k] for k in cfg if k != "hydra"}))]
    assert [k for k in expected if k not in settings] == []
    assert [k for k, s in settings.items() if not s.meaning] == []
    for key in expected:
        assert f"  {key}=" in page, key


def test_every_group_and_option_is_listed():
    page = help_page(compose_train())
    for group, _, _ in read_groups((CONFIG_DIR / "config.yaml").read_text()):
        assert f"  {group}=" in page, group
        for option in (CONFIG_DIR / group).glob("*.yaml"):
            assert f"      {option.stem} " in page, option


def test_every_command_has_a_purpose():
    found = dict(commands())
    assert set(COMMANDS) <= set(found)
    for name, purpose in found.items():
        assert purpose and purpose[0].isupper() and not purpose.startswith("`"), (name, purpose)


@pytest.mark.parametrize("doc,sentence", [
    ("Score a checkpoint.\n\n    python -m x", "Score a checkpoint."),
    ("`python -m vae.data [x]`: fetch the files\nahead of training. More.", "Fetch the files ahead of training."),
    ("Adam (Kingma et al. 2015), fused. The rest.", "Adam (Kingma et al. 2015), fused."),
    ("The VAE of Liu et al. (2023): one shape. Next", "The VAE of Liu et al. (2023): one shape."),
])
def test_first_sentence(doc, sentence):
    assert first_sentence(doc) == sentence


def test_settings_are_read_with_sections_continuations_and_mappings():
    text = ("# header\ndefaults:\n  - data: mnist  # d\n\n# Model.\na: 1  # the a\nb: x  # one |\n"
            "              #   two\n\nc: null  # alone\n# Eval.\nev:\n  k: 3  # kk\nhydra:\n  run: 1  # no\n")
    sections = read_settings(text)
    assert [(s.title, [(x.key, x.value, x.meaning) for x in s.settings]) for s in sections] == [
        ("Model.", [("a", "1", "the a"), ("b", "x", "one | two")]),
        ("", [("c", "null", "alone")]),
        ("Eval.", [("ev.k", "3", "kk")]),
    ]
    assert read_groups(text) == [("data", "mnist", "d")]
