"""vae/settings/schema.py: keys outside a command's schema (`+key=`, `++key=`, `~key`) are refused, by every command."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir

from vae.training.plan import check_run
from vae.settings.config import CONFIG_DIR
from vae.common.errors import UserError
from vae.settings.schema import unknown_settings


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- `+key=`, `++key=` and `~key`: Hydra lets them past the schema; every command refuses them ------------------

@pytest.mark.parametrize("override, needle", [
    ("+lattent_dim=20", "lattent_dim is not a setting of this command (did you mean latent_dim?"),
    ("++lattent_dim=20", "lattent_dim is not a setting"),
    ("+data.rooot=/x", "data.rooot is not a setting of this command (did you mean data.root?"),
    ("+optimizer.bettas=[0.9,0.99]", "optimizer.bettas is not a setting"),
    ("~seed", "seed is a setting every run needs and cannot be deleted (~seed)"),
    ("~eval", "eval is a setting every run needs"),
])
def test_a_key_outside_the_schema_is_refused(override, needle):
    with pytest.raises(UserError) as e:
        check_run(composed(override))
    assert str(e.value).startswith(needle)


@pytest.mark.parametrize("config", ["config", "evaluate", "bench", "gradients", "study"])
def test_every_commands_own_config_has_only_known_keys(config):
    import vae.tools.bench_config  # noqa: F401  (each module registers its schema)
    import vae.evaluate  # noqa: F401
    import vae.gradients  # noqa: F401
    import vae.study  # noqa: F401

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config, return_hydra_config=True)
    assert unknown_settings(cfg) == ([], [])
    for overrides in (["experiment=paper"], ["experiment=reinmax", "shape=8x4"], ["hparams_search=optuna"],
                      ["debug=tiny"], ["optimizer=radam"], ["data=fashion_mnist"]):
        assert unknown_settings(composed(*overrides)) == ([], []), overrides


@pytest.mark.parametrize("script", ["train.py", "vae.evaluate", "vae.bench", "vae.baseline", "vae.gradients",
                                    "vae.data"])
def test_every_command_refuses_an_added_key_before_it_runs(tmp_path, script):
    from support import run_script

    run_dir = tmp_path / "run"
    proc = run_script(["+lattent_dim=20", f"hydra.run.dir={run_dir}"] if script == "train.py" else ["+lattent_dim=20"],
                      script=script, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lattent_dim is not a setting of this command ("), lines
    assert not run_dir.exists()
